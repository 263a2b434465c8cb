"""FiftyOne's Open Images download, bounded in time, never trusting a partial file, resumable.

What FiftyOne 1.22.1 does by itself (fiftyone/utils/openimages.py, fiftyone/utils/aws.py), and
what :func:`patched` changes while the download stage runs it:

- **Label and metadata files** (``_download_file_if_necessary``: the class list, the split's
  image list and its box file, 2 GB for train) go through eta's ``download_file``: ``requests``
  with no timeout, so a server that stops answering hangs the run for ever; written in place
  under the final name; and any file that exists is taken as complete, so a download cut off
  midway leaves a truncated CSV that every later run trusts. Here they are fetched with
  ``requests`` and ``timeout`` seconds for the connection and for each read, into a temporary
  sibling renamed when the byte count matches Content-Length, and each finished file is entered
  in ``download-record.json`` (path, URL, bytes) in the zoo folder. A file on disk is complete
  when the record holds it at that size. One without an entry (a folder that FiftyOne filled by
  itself, or a run killed between the rename and the record) is compared with the server's
  Content-Length (one HEAD request) and fetched again unless it matches; without the network it
  cannot be checked, and the stage stops saying so.
- **Images** go through boto3's ``download_file`` (s3transfer), which writes
  ``<ImageID>.jpg.<8 hex>`` and renames it when complete: an image file is never partial. Its
  waits are botocore's defaults (60 s per connect or read, 5 attempts in legacy retry mode, and
  s3transfer tries a broken body 5 times over). Here the client waits ``timeout`` seconds per
  connect or read, makes at most ``S3_ATTEMPTS`` attempts per request (botocore's standard
  mode) and ``BODY_ATTEMPTS`` per image body; the temporaries of a killed run are removed.
- **Which images**: FiftyOne shuffles the candidates with the seed but puts the images already
  on disk first, so a rerun after an interruption picks another set than an uninterrupted run.
  Here FiftyOne is told that no image is on disk (it still skips each file it finds), so the
  choice depends on the params and the label files only, and the images it chose are reported
  back (:attr:`Session.chosen`) so that the stage keeps exactly those.

So a network that goes silent stops the stage within about ``S3_ATTEMPTS`` x ``timeout``
(plus botocore's backoff of a few seconds, and the resolver's own DNS timeout), with one line.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.common.atomic import atomic_file, clean_stale, write_json
from stages.common.params import StageError

RECORD = "download-record.json"
S3_ATTEMPTS = 3          # botocore attempts per request (HEAD, GET) of an image
BODY_ATTEMPTS = 2        # s3transfer attempts at an image body that breaks off midway
CHUNK = 1 << 20
# Plain bytes, so the length on disk is the Content-Length the server states.
HEADERS = {"Accept-Encoding": "identity", "User-Agent": "perimeter-download"}
# What s3transfer names an image while it is being written (utils.random_file_extension).
S3_TEMP = re.compile(r"\.jpg\.[0-9A-Fa-f]{8}$")

logger = logging.getLogger("fiftyone.utils.openimages")


class IncompleteDownload(OSError):
    """The connection ended before the server's Content-Length was reached."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line; a wrapper's last underlying error is named too."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    last = getattr(exc, "last_exception", None)   # boto3 / s3transfer RetriesExceededError
    return f"{text} ({one_line(last)})" if isinstance(last, BaseException) else text


def content_length(response: Any) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        return None
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def fetch(url: str, path: str | Path, timeout: float, quiet: bool = False) -> int:
    """Download ``url`` to ``path`` atomically; return its size in bytes.

    ``timeout`` bounds the connection and every read (so a silent server fails in about that
    long; a slow one that keeps sending is not cut off). A body shorter than Content-Length is
    an error. On any error ``path`` is left as it was (absent) and the temporary is removed.
    """
    import eta.core.utils as etau
    import requests

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    with requests.get(url, stream=True, timeout=(timeout, timeout), headers=HEADERS) as r:
        r.raise_for_status()
        expected = content_length(r)
        written = 0
        with atomic_file(path, "wb") as f, \
                etau.ProgressBar(8 * expected if expected else None, use_bits=True,
                                 quiet=quiet) as bar:
            for chunk in r.iter_content(chunk_size=CHUNK):
                f.write(chunk)
                written += len(chunk)
                bar.update(8 * len(chunk))
            if expected is not None and written != expected:
                raise IncompleteDownload(f"{url}: the connection ended after {written} of "
                                         f"{expected} bytes")
    return written


def remote_size(url: str, timeout: float) -> int | None:
    """The server's Content-Length for ``url`` (a HEAD request), or None if it states none."""
    import requests

    r = requests.head(url, timeout=(timeout, timeout), headers=HEADERS, allow_redirects=True)
    return content_length(r) if r.status_code == 200 else None


class Record:
    """``<zoo>/open-images-v7/download-record.json``: the files whose download finished."""

    def __init__(self, root: Path, timeout: float) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / RECORD
        self.timeout = timeout
        self.files: dict[str, dict[str, Any]] = {}
        try:
            files = json.loads(self.path.read_text(encoding="utf-8"))["files"]
            if isinstance(files, dict):
                self.files = {k: v for k, v in files.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            pass   # unreadable: nothing is proven complete; files are checked against the server

    def key(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    def add(self, path: Path, url: str, size: int) -> None:
        key = self.key(path)
        if key is not None:
            self.files[key] = {"url": url, "bytes": size}
            write_json(self.path, {"files": self.files})

    def complete(self, path: Path, url: str) -> bool:
        """Is the existing file ``path`` the whole of ``url``?"""
        import requests

        key = self.key(path)
        if key is None:
            return True   # outside the zoo folder: one of FiftyOne's fresh temporary folders
        size = path.stat().st_size
        entry = self.files.get(key)
        if entry is not None:
            return entry.get("url") == url and entry.get("bytes") == size
        try:
            remote = remote_size(url, self.timeout)
        except requests.RequestException as exc:
            raise StageError(
                f"{path}: no record that its download finished, and its size cannot be checked "
                f"against {url} ({one_line(exc)}); run the stage once with the network, or set "
                f"data.source to {path.parent.parent} to use that folder as it is") from None
        if remote == size:
            self.add(path, url, size)
            return True
        return False


@dataclass
class Session:
    """What :func:`patched` yields: ``ensure`` a file, and the images FiftyOne chose per split."""
    ensure: Callable[..., bool]
    chosen: dict[Path, list[str]] = field(default_factory=dict)


def tidy(root: Path, splits: tuple[str, ...] | list[str]) -> None:
    """Remove what a killed run can leave that FiftyOne would trip over or keep forever: JSON
    files it writes in place (info.json, hierarchy.json) cut off midway, and temporaries."""
    root = Path(root)
    for path in [root / "info.json", *(root / sp / "metadata" / "hierarchy.json" for sp in splits)]:
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                path.unlink()   # FiftyOne writes it again
    for split in splits:
        data = root / split / "data"
        if data.is_dir():
            with os.scandir(data) as entries:
                for e in entries:
                    if S3_TEMP.search(e.name) and e.is_file(follow_symlinks=False):
                        os.unlink(e.path)
        for sub in ("labels", "metadata"):
            folder = root / split / sub
            if folder.is_dir():
                for stale in folder.glob(".*.tmp-*"):
                    if stale.is_file():
                        stale.unlink()


def boto3_with_timeouts(timeout: float) -> types.SimpleNamespace:
    """A stand-in for the ``boto3`` module in fiftyone.utils.aws (which calls only
    ``boto3.client``): the client it returns waits ``timeout`` s per connect or read and gives
    up after ``S3_ATTEMPTS`` attempts per request and ``BODY_ATTEMPTS`` per image body."""
    import boto3
    import botocore.config
    from boto3.s3.transfer import TransferConfig

    ours = botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                  retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS})
    transfer = TransferConfig(num_download_attempts=BODY_ATTEMPTS)

    def client(*args: Any, config: Any = None, **kwargs: Any) -> Any:
        s3 = boto3.client(*args, config=config.merge(ours) if config is not None else ours,
                          **kwargs)
        s3.download_file = functools.partial(s3.download_file, Config=transfer)
        return s3

    return types.SimpleNamespace(client=client)


@contextlib.contextmanager
def patched(root: Path, timeout: float) -> Iterator[Session]:
    """FiftyOne's Open Images download as the module doc describes, for the ``with`` block."""
    import fiftyone.utils.aws as foua
    import fiftyone.utils.openimages as fouo

    record = Record(root, timeout)
    original_file = fouo._download_file_if_necessary
    original_images = fouo._download_images_if_necessary

    def ensure(filepath: str | Path, url: str, is_zip: bool = False, quiet: int = -1,
               download: bool = True) -> bool:
        if is_zip:   # segmentation masks: this stage never asks for them
            return original_file(filepath, url, is_zip=is_zip, quiet=quiet, download=download)
        path = Path(filepath)
        if path.is_file() and not record.complete(path, url):
            logger.info("'%s' is incomplete (an interrupted download); fetching it again", path)
            path.unlink()
        if path.is_file():
            return False
        if not download:
            raise ValueError(f"File '{filepath}' is not downloaded")
        if quiet < 1:
            logger.info("Downloading '%s' to '%s'", url, filepath)
        record.add(path, url, fetch(url, path, timeout, quiet=quiet != -1))
        return True

    session = Session(ensure=ensure)

    def download_images(image_ids: list[str], split: str, dataset_dir: str,
                        num_workers: int | None = None, download: bool = True) -> int:
        session.chosen[Path(dataset_dir).resolve()] = list(image_ids)
        return original_images(image_ids, split, dataset_dir, num_workers=num_workers,
                               download=download)

    swaps = [(fouo, "_download_file_if_necessary", ensure),
             (fouo, "_get_downloaded_image_ids", lambda dataset_dir: []),
             (fouo, "_download_images_if_necessary", download_images),
             (foua, "boto3", boto3_with_timeouts(timeout))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, value in swaps:
        setattr(module, name, value)
    try:
        yield session
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
