"""FiftyOne's Open Images download, bounded in time, never trusting a partial file, resumable.

What FiftyOne 1.22.1 does by itself (fiftyone/utils/openimages.py, fiftyone/utils/aws.py), and
what :func:`patched` changes while the download stage runs it (FiftyOne has no public way to
do it: the hooks go in through fiftyone_internals.py, the only module that touches FiftyOne's
private names):

- **Label and metadata files** (the class list, the split's image list and its box file, 2 GB
  for train) go through eta's ``download_file``: ``requests``
  with no timeout, so a server that stops answering hangs the run for ever; written in place
  under the final name; and any file that exists is taken as complete, so a download cut off
  midway leaves a truncated CSV that every later run trusts. Here they are fetched with
  ``requests`` and ``timeout`` seconds for the connection and for each read, into a partial
  sibling (``.<name>.part``) renamed when the byte count matches Content-Length and the MD5
  matches the one Google Cloud Storage states; a transfer cut off midway keeps what arrived,
  and the next run asks only for the rest (an HTTP range, appended only when the server answers
  with that range of the same object); each finished file is entered
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

- **Progress**: eta's bar (label files) and FiftyOne's (images) redraw on stdout up to ten
  times a second, which a pipe or ``dvc repro``'s log turns into a pile of frames. Here both
  go through stages/common/infra/progress.py on stderr: a bar on a terminal, else a line every
  ``PROGRESS_EVERY_S`` seconds; label files in bytes (a resumed one from where it stopped),
  images counted as the S3 client finishes each one in FiftyOne's thread pool.

So a network that goes silent stops the stage within about ``S3_ATTEMPTS`` x ``timeout``
(plus botocore's backoff of a few seconds, and the resolver's own DNS timeout), with one line.

The operator's view (disk, time, resuming): docs/downloading.md.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.common.infra import progress
from stages.common.infra.atomic import clean_stale, write_json
from stages.common.infra.digest import file_md5
from stages.common.infra.errors import StageError
from stages.download import fiftyone_internals

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


def partial_paths(path: Path) -> tuple[Path, Path]:
    """Where the bytes of ``path`` received so far wait, and what they were received from."""
    return path.with_name(f".{path.name}.part"), path.with_name(f".{path.name}.part.json")


def drop_partial(path: Path) -> None:
    for p in partial_paths(path):
        p.unlink(missing_ok=True)


def goog_md5(response: Any) -> str | None:
    """The MD5 that Google Cloud Storage states for the whole object (``x-goog-hash``), in hex."""
    for part in response.headers.get("x-goog-hash", "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "md5" and value:
            try:
                return base64.b64decode(value + "=" * (-len(value) % 4), validate=True).hex()
            except ValueError:
                return None
    return None


def resumes(response: Any, have: int, meta: dict[str, Any]) -> bool:
    """Is ``response`` (to ``Range: bytes=<have>-``) the rest of the object the partial file
    began? Only a 206 for exactly that range of an object of the same size and validators."""
    if response.status_code != 206:
        return False
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
    if not m or int(m[1]) != have or int(m[3]) != meta["bytes"] or int(m[2]) != meta["bytes"] - 1:
        return False
    stated = (("etag", response.headers.get("ETag")),
              ("last_modified", response.headers.get("Last-Modified")),
              ("md5", goog_md5(response)))
    return all(meta.get(key) is None or value is None or meta[key] == value
               for key, value in stated)


def fetch(url: str, path: str | Path, timeout: float, quiet: bool = False) -> int:
    """Download ``url`` to ``path``; return its size in bytes. ``path`` appears only whole.

    ``timeout`` bounds the connection and every read (so a silent server fails in about that
    long; a slow one that keeps sending is not cut off). The bytes go to ``.<name>.part`` beside
    ``path``, with what they came from (URL, size, ETag, Last-Modified, MD5) in
    ``.<name>.part.json``; the file is renamed into place when its size is the server's
    Content-Length and, where the server states one (Google Cloud Storage does), its MD5 matches.
    A transfer that breaks off keeps the partial file, and the next call asks only for the rest
    (``Range``, with ``If-Range``); the rest is appended only when the server answers with exactly
    that range of the same object, otherwise the file is fetched whole again.
    """
    import requests

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    part, meta_path = partial_paths(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        have = part.stat().st_size
        if not (isinstance(meta, dict) and meta.get("url") == url
                and isinstance(meta.get("bytes"), int) and 0 < have <= meta["bytes"]):
            raise ValueError("another download")
    except (OSError, ValueError):
        drop_partial(path)
        meta, have = {}, 0
    if meta and have == meta["bytes"]:
        return finish(url, path, meta)          # killed between the last byte and the rename
    headers = dict(HEADERS)
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("etag") or meta.get("last_modified"):
            headers["If-Range"] = meta.get("etag") or meta["last_modified"]
    with requests.get(url, stream=True, timeout=(timeout, timeout), headers=headers) as r:
        if have and not resumes(r, have, meta):
            if r.status_code != 200:             # 416, or a range of something else
                r.close()
                drop_partial(path)
                return fetch(url, path, timeout, quiet)
            drop_partial(path)
            have = 0
        r.raise_for_status()
        if not have:
            meta = {"url": url, "bytes": content_length(r), "etag": r.headers.get("ETag"),
                    "last_modified": r.headers.get("Last-Modified"), "md5": goog_md5(r)}
            if meta["bytes"] is not None:       # without a size a partial proves nothing
                write_json(meta_path, meta)
        total = meta["bytes"]
        written = have
        try:
            with part.open("ab" if have else "wb") as f, \
                    progress.Meter(f"download {shown(path)}", total, progress.BYTES,
                                   enabled=not quiet, initial=have) as meter:
                for chunk in body(r):
                    f.write(chunk)
                    written += len(chunk)
                    meter.update(len(chunk))
        except BaseException:
            if total is None:
                drop_partial(path)
            raise
        if total is not None and written != total:
            raise IncompleteDownload(f"{url}: the connection ended after {written} of {total} "
                                     f"bytes (kept; the next run fetches the rest)")
    if total is None:
        meta["bytes"] = written
    return finish(url, path, meta)


def body(response: Any) -> Iterator[bytes]:
    """The response body as it arrives. ``read1`` hands over every byte received before the
    connection broke off (``iter_content`` drops the last incomplete chunk, up to a CHUNK that
    the next run would fetch again); urllib3's errors become requests' (OSErrors), as in
    ``iter_content``."""
    import requests
    import urllib3.exceptions

    raw = response.raw
    if not hasattr(raw, "read1"):                 # urllib3 < 2.3
        yield from response.iter_content(chunk_size=CHUNK)
        return
    while True:
        try:
            chunk = raw.read1(CHUNK, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise requests.exceptions.ConnectionError(exc) from exc
        if not chunk:
            return
        yield chunk


def shown(path: Path) -> str:
    """What a progress line calls a label file: ``train/labels/detections.csv``."""
    return "/".join(path.parts[-3:])


def finish(url: str, path: Path, meta: dict[str, Any]) -> int:
    """Rename the partial file of ``path`` into place once it is proven whole."""
    part, meta_path = partial_paths(path)
    if meta.get("md5") and file_md5(part) != meta["md5"]:
        drop_partial(path)
        raise IncompleteDownload(f"{url}: the bytes received do not have the MD5 the server "
                                 f"states (removed; the next run fetches the file again)")
    os.replace(part, path)
    meta_path.unlink(missing_ok=True)
    return meta["bytes"]


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
                f"data.source: mirror and data.mirror: {path.parent.parent} to use that folder "
                "as it is") from None
        if remote == size:
            self.add(path, url, size)
            return True
        return False


@dataclass
class Session:
    """What :func:`patched` yields: ``ensure`` a file, and the images FiftyOne chose per split."""
    ensure: Callable[..., bool]
    chosen: dict[Path, list[str]] = field(default_factory=dict)
    images: progress.Meter | None = None    # the split's image downloads under way, if any

    def image_done(self) -> None:
        if self.images is not None:
            self.images.update(1)


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


def boto3_with_timeouts(timeout: float,
                        on_file: Callable[[], None] = lambda: None) -> types.SimpleNamespace:
    """A stand-in for the ``boto3`` module in fiftyone.utils.aws (which calls only
    ``boto3.client``): the client it returns waits ``timeout`` s per connect or read and gives
    up after ``S3_ATTEMPTS`` attempts per request and ``BODY_ATTEMPTS`` per image body, and
    calls ``on_file()`` after each file it downloaded whole (in the pool's threads)."""
    import boto3
    import botocore.config
    from boto3.s3.transfer import TransferConfig

    ours = botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                  retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS})
    transfer = TransferConfig(num_download_attempts=BODY_ATTEMPTS)

    def client(*args: Any, config: Any = None, **kwargs: Any) -> Any:
        s3 = boto3.client(*args, config=config.merge(ours) if config is not None else ours,
                          **kwargs)
        download = s3.download_file

        def download_file(*a: Any, **kw: Any) -> None:
            download(*a, Config=transfer, **kw)
            on_file()

        s3.download_file = download_file
        return s3

    return types.SimpleNamespace(client=client)


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold the zoo folder for the ``with`` block. Label files resume from a partial file of a
    fixed name and :func:`tidy` removes a killed run's temporaries, so two runs writing into
    one folder at once (two clones sharing a zoo folder on a big disk) would spoil each other's
    files: the second stops at once, saying so. An advisory lock on the folder itself
    (``flock``; released by the kernel when the process ends, however it ends), so nothing is
    left behind; where the filesystem has no locks the run goes on unguarded."""
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{root}: another download is writing into this folder (a second "
                             "run or clone sharing it); wait for it to end, then rerun") from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def patched(root: Path, timeout: float) -> Iterator[Session]:
    """FiftyOne's Open Images download as the module doc describes, for the ``with`` block."""
    import fiftyone as fo

    record = Record(root, timeout)

    def ensure(filepath: str | Path, url: str, quiet: int = -1, download: bool = True) -> bool:
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
        # Progress for every label file, whatever FiftyOne's ``quiet``: it would show a bar for
        # train's files only, but another split's box file is tens of MB too; a small file
        # ends before the first line is due.
        record.add(path, url, fetch(url, path, timeout))
        return True

    def label_file(original: Callable[..., bool], filepath: str, url: str, is_zip: bool = False,
                   quiet: int = -1, download: bool = True) -> bool:
        if is_zip:   # segmentation masks: this stage never asks for them
            return original(filepath, url, is_zip=is_zip, quiet=quiet, download=download)
        return ensure(filepath, url, quiet=quiet, download=download)

    session = Session(ensure=ensure)

    def download_images(original: Callable[..., int], image_ids: list[str], split: str,
                        dataset_dir: str, num_workers: int | None = None,
                        download: bool = True) -> int:
        session.chosen[Path(dataset_dir).resolve()] = list(image_ids)
        # FiftyOne fetches the chosen images not on disk (the same test as here); its bar is
        # silenced (below) and the client counts each image it finished into this meter.
        data = Path(dataset_dir) / "data"
        missing = sum(not (data / f"{image_id}.jpg").is_file() for image_id in image_ids)
        with progress.Meter(f"download {split} images", missing, "images") as meter:
            session.images = meter
            try:
                return original(image_ids, split, dataset_dir, num_workers=num_workers,
                                download=download)
            finally:
                session.images = None

    # FiftyOne's own image bar (eta's) redraws on stdout up to 10 times a second: on a
    # terminal it would fight ours, in a pipe it piles up frames. Ours replaces it.
    bars = fo.config.show_progress_bars
    fo.config.show_progress_bars = False
    try:
        with fiftyone_internals.hooked(
                label_file=label_file, images=download_images,
                on_disk=lambda dataset_dir: [],   # see "Which images" in the module doc
                s3=boto3_with_timeouts(timeout, session.image_done)):
            yield session
    finally:
        fo.config.show_progress_bars = bars
