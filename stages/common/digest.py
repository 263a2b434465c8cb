"""Checksums of files, read in blocks so a 2 GB label file costs no memory."""
from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def file_md5(path: Path) -> str:
    """The MD5 of ``path``'s bytes, in hex (what GCS's ``x-goog-hash`` states, base64-decoded)."""
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()
