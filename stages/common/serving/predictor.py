"""Applying a classifier (stages.common.serving.classifiers) to picture files: shared by
predict and review.

A picture is prepared exactly as extract_crops prepares a training crop (the same decoder,
with the EXIF orientation applied; aspect ratio kept, padded with the median corner colour) but
placed in the centre, not at a random spot, so the answer for a file never changes. A crop that
is already S x S passes through unchanged. The batch is then normalised as every crop is
(stages.common.inference.batches.normalise), on the device the model runs on.

Reading, decoding and preparing run in a small pool of threads, a bounded number of pictures
ahead of the model, while it classifies the batch before (OpenCV, PIL, ONNX Runtime and
PyTorch release the GIL while they work): the answers are those of one picture after another,
in input order, and memory holds a few batches of prepared pictures whatever the number of
files. No torch here: the edge runtime answers with this module.
"""
from __future__ import annotations

import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from stages.common.alarm.calibration import softmax
from stages.common.model.checkpoint import ModelMeta, check_logits
from stages.common.pictures import decode as pictures
from stages.common.pictures.crops import letterbox
from stages.common.pictures.decode import (DEFAULT_MAX_IMAGE_PIXELS, PICTURE_SUFFIXES,
                                           SIGNATURE_BYTES, picture_format)


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """BGR uint8 pixels, EXIF orientation applied (an operator's photo as taken). The file is
    refused before any decode, as extract_crops refuses its pictures, when its header says it
    is empty, not a picture, above ``max_pixels`` or cut off."""
    problem = not_a_file(path)
    if problem:
        raise ValueError(problem)
    data = path.read_bytes()
    header, problem = pictures.examine(data, max_pixels)
    kind = picture_format(data[:SIGNATURE_BYTES]) if problem == "not_an_image" else None
    if kind in ("HEIF", "HEIF/AVIF"):  # AVIF decodes here: a HEIF, or a damaged AVIF
        raise ValueError(f"a {'HEIF picture' if kind == 'HEIF' else 'HEIF or damaged AVIF'} "
                         "(a phone's .heic is HEIF), which no library here decodes; convert it "
                         "to JPEG or PNG (the phone's 'most compatible' setting)")
    if problem:
        raise ValueError(pictures.describe(problem, header, max_pixels))
    try:
        return pictures.decode(data, 1, pictures.EXIF, pictures.BGR, checked=True)
    except pictures.Undecodable:
        raise ValueError(pictures.describe("decode_failed", header, max_pixels)) from None


def prepare(image_bgr: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """A centred letterbox of the checkpoint's size: uint8 RGB, 3 x S x S."""
    canvas = letterbox(image_bgr, meta.image_size, rng=None)
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be a picture file (missing, or a device, FIFO, folder...), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return f"not a regular file ({kind})"


# File systems that hold the machine's state, not files: /proc, /sys, /dev and their kin. A link
# to /proc inside a walked folder walked the whole machine (every process's open files, as root).
PSEUDO_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
                       "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl",
                       "mqueue", "hugetlbfs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs",
                       "autofs"})
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")


def pseudo_devices() -> frozenset[int]:
    """``st_dev`` of every mounted pseudo-filesystem (Linux's mountinfo), and of /proc, /sys
    and /dev themselves wherever they are mounts of their own (never the root's: in a chroot
    /dev may be a plain folder, and every folder beside it would look like a device's)."""
    devices = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for row in f:
                fields = row.split()
                if " - " not in row or len(fields) < 3:
                    continue
                fstype = row.split(" - ", 1)[1].split()[0]
                if fstype in PSEUDO_FS:
                    major, minor = fields[2].split(":")
                    devices.add(os.makedev(int(major), int(minor)))
    except (OSError, ValueError):
        pass
    try:
        top = os.stat("/").st_dev
    except OSError:
        top = None
    for root in PSEUDO_ROOTS:
        try:
            device = os.stat(root).st_dev
        except OSError:
            continue
        if device != top:
            devices.add(device)
    return frozenset(devices - {top})


@dataclass
class Skipped:
    """A thing inside a given folder that gets no answer, and why: a file that is not a picture
    by name or content, a link to a folder already walked (``walked_as``), or a folder on a
    pseudo-filesystem such as /proc (``pseudo``)."""
    path: Path
    walked_as: Path | None = None
    pseudo: bool = False


def expand(inputs: Iterable[str | Path], skipped: list[Skipped] | None = None
           ) -> list[tuple[Path, str | None]]:
    """(path, error) per input: files as given, folders walked (sorted). In a folder, links are
    followed and each real folder is walked once (a loop, or a second link to one, is appended
    to ``skipped``); a file is a picture when its name or its first bytes say so
    (:data:`PICTURE_SUFFIXES`, :func:`picture_format`), any other file goes to ``skipped``; a
    link to nothing, or a file or folder that cannot be read, is an input with its error."""
    skipped = [] if skipped is None else skipped
    out: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if path.stat().st_dev in pseudo_devices():
                out.append((path, "a folder of a pseudo-filesystem (/proc, /sys, /dev), not "
                                  "pictures; not walked"))
                continue
            found = _walk(path, skipped)
            if not found:
                found.append((path, "folder holds no pictures (by name or content)"))
            out.extend(found)
        else:
            out.append((path, not_a_file(path)))
    return out


def _walk(folder: Path, skipped: list[Skipped]) -> list[tuple[Path, str | None]]:
    """Every picture under ``folder``, links followed, each real folder once (by device and
    inode, so loops end and n links to one folder cost one walk), under its own name when it
    has one there: the folders themselves first, then those reached only through links."""
    st = folder.stat()
    walked = {(st.st_dev, st.st_ino): folder}
    pseudo = pseudo_devices()
    found: list[tuple[Path, str | None]] = []
    todo: list[Path] = [folder]  # not recursion: a tree thousands of folders deep is walked
    links: list[tuple[Path, tuple[int, int]]] = []
    while todo or links:
        if not todo:
            link, key = links.pop(0)
            _visit(link, key, walked, todo, skipped)
            continue
        current = todo.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError as exc:
            found.append((current, f"cannot list the folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            try:
                st = entry.stat()  # the link's target, for a link
            except OSError as exc:  # a link to nothing, a loop of links, no permission
                why = ("a link to nothing" if isinstance(exc, FileNotFoundError) else
                       f"cannot read it ({exc.strerror or exc})")
                found.append((entry, why))
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev in pseudo:  # a link to /proc, or /dev bind-mounted in
                    skipped.append(Skipped(entry, pseudo=True))
                    continue
                key = (st.st_dev, st.st_ino)
                if entry.is_symlink():
                    links.append((entry, key))
                else:
                    _visit(entry, key, walked, todo, skipped)
                continue
            verdict = _picture_or_not(entry, st)
            if verdict is False:
                skipped.append(Skipped(entry))
            else:
                found.append((entry, verdict))
    return sorted(found, key=lambda item: item[0])


def _visit(entry: Path, key: tuple[int, int], walked: dict[tuple[int, int], Path],
           todo: list[Path], skipped: list[Skipped]) -> None:
    """Walk the folder ``entry`` next, unless it was walked already (under another name)."""
    first = walked.setdefault(key, entry)
    if first is entry:
        todo.append(entry)
    else:
        skipped.append(Skipped(entry, walked_as=first))


def _picture_or_not(path: Path, st: os.stat_result) -> str | None | bool:
    """None: a picture (read_image decides the rest); an error text; False: not a picture."""
    named = path.suffix.lower() in PICTURE_SUFFIXES
    if not stat.S_ISREG(st.st_mode):  # a pipe or a device: never opened (a read may block)
        return "not a regular file" if named else False
    if named:
        return None
    try:
        with path.open("rb") as f:
            head = f.read(SIGNATURE_BYTES)
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    return None if picture_format(head) else False


def shown(path: Path | str) -> str:
    """A path as text that can always be written and read back: a byte that is not UTF-8 (a
    file name from another system) is written ``\\xNN`` and a backslash ``\\\\``, so no name
    is mistaken for another (``e\\xff.jpg``: an e and the byte 0xff; ``e\\\\xff.jpg``: an e, a
    backslash and the letters xff). predict's CSV and JSON and accept's JSON carry it."""
    return "".join(_escape(ch, controls=False) for ch in str(path))


def printable(text: str) -> str:
    """:func:`shown`, and control and other non-printable characters (newline, ESC, bidi
    overrides) escaped too, so a name can neither fake a row nor drive the terminal."""
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str, controls: bool = True) -> str:
    if ch == "\\":
        return "\\\\"
    if "\udc80" <= ch <= "\udcff":  # how Python holds a file name's undecodable byte
        return f"\\x{ord(ch) - 0xdc00:02x}"
    return ascii(ch)[1:-1] if controls and not ch.isprintable() else ch


@dataclass
class Prediction:
    path: Path
    probs: np.ndarray | None = None  # one probability per class, checkpoint order
    logits: np.ndarray | None = None
    error: str | None = None
    grey: bool | None = None  # a grey picture (a near-infrared camera's): is_grey


# A grey picture's channels differ only by what its encoding added (a JPEG's chroma noise, a
# few levels); a colour overlay (a camera's timestamp) covers a small share of the picture.
GREY_TOLERANCE = 12  # levels of 255 between the highest and the lowest channel of a pixel
GREY_SHARE = 0.99  # share of pixels within it


def is_grey(pixels) -> bool:
    """Whether uint8 RGB 3 x H x W ``pixels`` (the prepared picture) are grey: at least
    GREY_SHARE of the pixels have their three channels within GREY_TOLERANCE."""
    rgb = np.asarray(pixels).astype(np.int16)
    spread = rgb.max(axis=0) - rgb.min(axis=0)
    return bool(np.mean(spread <= GREY_TOLERANCE) >= GREY_SHARE)


def file_error(exc: Exception) -> str:
    """One file's failure in one line: our own reasons as they are, anything else by type."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if type(exc) is ValueError:  # read_image's own reasons
        return first
    return f"cannot read the file ({type(exc).__name__}{': ' + first if first else ''})"


def prepared(path: Path, meta: ModelMeta, max_pixels: int) -> np.ndarray | str:
    """One picture file as the model's uint8 pixels, or why it cannot be used (in one line)."""
    try:
        return prepare(read_image(path, max_pixels), meta)
    except Exception as exc:  # this file's answer, never the run's
        return file_error(exc)


def workers() -> int:
    """Threads that read and prepare pictures, and ONNX runs predict makes at once: the CPUs
    this process may use, 2 to 8 (one keeps a file's read or decode from stalling the next;
    past 8 the model is the bottleneck)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(max(cpus, 2), 8)


def predict_paths(classifier, items: list[tuple[Path, str | None]], batch_size: int = 32,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, runs: int = 1
                  ) -> Iterator[Prediction]:
    """Predictions in input order, each batch's as soon as it is classified; probabilities are
    calibrated by the classifier's operating point (``softmax(logits / temperature)``; T = 1
    without one). A file that cannot be used, for whatever reason its read
    or decode raises (OpenCV's errors, MemoryError, OSError), comes back with ``error`` set and
    the others go on.

    Pictures are prepared in :func:`workers` threads, up to ``batch_size`` + 2 x workers files
    ahead of the one being answered: the next batch is read while this one is classified.
    ``runs``: batches classified at once, each in a thread of its own (an ONNX session of one
    thread each: no thread pool to synchronise inside a run, so less CPU per picture than one
    run on every core); their answers still come out in input order."""
    point = getattr(classifier, "operating_point", None)
    temperature = point.temperature if point else 1.0
    pending: list[Prediction] = []
    arrays: list[np.ndarray] = []
    running: deque[tuple[list[Prediction], Future | np.ndarray, int]] = deque()

    def answered(batch: list[Prediction], logits: Future | np.ndarray, rows: int
                 ) -> list[Prediction]:
        if rows:
            logits = logits.result() if isinstance(logits, Future) else logits
            check_logits(logits, rows, len(classifier.meta.classes), classifier.path)
            probs = softmax(logits, temperature)
            k = 0
            for p in batch:
                if p.error is None:
                    p.logits, p.probs = logits[k], probs[k]
                    k += 1
        return batch

    def flush(model: ThreadPoolExecutor | None, last: bool = False) -> Iterator[Prediction]:
        if arrays:
            batch = np.stack(arrays)
            logits = (model.submit(classifier.classify, batch) if model else
                      classifier.classify(batch))
            running.append((pending[:], logits, len(arrays)))
        elif pending:
            running.append((pending[:], np.empty(0), 0))
        pending.clear()
        arrays.clear()
        while running and (last or len(running) >= runs):
            yield from answered(*running.popleft())

    threads = workers()
    ahead = batch_size + 2 * threads
    todo = iter(items)
    queued: deque[tuple[Prediction, Future | None]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="prepare") as pool, \
            ThreadPoolExecutor(runs, thread_name_prefix="classify") as model:
        concurrent = model if runs > 1 else None  # one run: in this thread, as it always was
        try:
            while True:
                for path, error in todo:  # top the queue up
                    job = None if error else pool.submit(prepared, path, classifier.meta,
                                                         max_pixels)
                    queued.append((Prediction(path, error=error), job))
                    if len(queued) >= ahead:
                        break
                if not queued:
                    break
                result, job = queued.popleft()
                if job is not None:
                    pixels = job.result()
                    if isinstance(pixels, str):
                        result.error = pixels
                    else:
                        result.grey = is_grey(pixels)
                        arrays.append(pixels)
                pending.append(result)
                if len(arrays) >= batch_size:
                    yield from flush(concurrent)
            yield from flush(concurrent, last=True)
        finally:  # the caller stopped early (a closed stdout, a model that failed): no more work
            for _, job in queued:
                if job is not None:
                    job.cancel()
            for _, logits, _ in running:
                if isinstance(logits, Future):
                    logits.cancel()
