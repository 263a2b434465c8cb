"""Checksums of files, read in blocks so a 2 GB label file costs no memory."""
from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """The ``algorithm`` (hashlib's name) digest of ``path``'s bytes, in hex."""
    h = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_md5(path: Path) -> str:
    """The MD5 of ``path``'s bytes, in hex (what GCS's ``x-goog-hash`` states, base64-decoded)."""
    return file_digest(path, "md5")


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, in hex (torch.hub's files carry its first digits in
    their names)."""
    return file_digest(path, "sha256")
