"""The Open Images V7 on-disk layout, as FiftyOne's zoo leaves one split of it.

    <root>/data/<ImageID>.jpg
    <root>/labels/detections.csv     ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,
                                     IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside
    <root>/metadata/classes.csv      no header: MID,DisplayName   (e.g. /m/01g317,Person)

``data/raw/`` is written in this layout whatever the source, so extract_crops reads one format.

Every CSV of a mirror is read through :func:`read_csv` / :func:`csv_chunks`, by the download
stage and by extract_crops alike, as spreadsheet tools write them: a UTF-8 byte-order mark
("CSV UTF-8"), CRLF line ends and quoted fields with commas. A file that is not well-formed CSV
stops the stage with one line naming the file and the line.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
from pathlib import Path
from typing import Iterator

import pandas as pd

from stages.common.infra.errors import StageError

DATA_DIR = "data"
DETECTIONS = Path("labels") / "detections.csv"
CLASSES = Path("metadata") / "classes.csv"

DETECTION_COLUMNS = [
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside",
]
# What extract_crops cannot work without; the other columns are optional.
REQUIRED_COLUMNS = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"]
FLAG_COLUMNS = ["IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
# ImageIDs become file names (data/<ImageID>.jpg, crops/<label>/<ImageID>_<k>.jpg). Open Images'
# are 16 hex digits; anything that could leave a folder ("../x", "/etc/x", "a\\b"), hide a file
# (".x") or carry control characters is refused and never joined into a path.
SAFE_IMAGE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
BOX_COLUMNS = ["XMin", "XMax", "YMin", "YMax"]


def is_safe_image_id(image_id: object) -> bool:
    return isinstance(image_id, str) and SAFE_IMAGE_ID.fullmatch(image_id) is not None


def refuse_link_out(root: Path, part: str | Path) -> None:
    """Stop, in one line, when ``root/part`` (data/, a label or class file) leads out of
    ``root`` through a symbolic link (its own or a folder's on the way): as with a picture that
    is a link (images_on_disk), it could point anywhere on the machine. A link that stays
    inside ``root``, or ``root`` itself being a link, is followed."""
    parts = Path(part).parts
    for depth in range(1, len(parts) + 1):  # the folder first: name the link that leads out
        path = root.joinpath(*parts[:depth])
        real = path.resolve()
        if not real.is_relative_to(root.resolve()):
            raise StageError(f"{path}: a symbolic link out of {root} (to {real}); refusing to "
                             f"follow it; copy what it points at into {root}")


def images_on_disk(root: str | Path) -> dict[str, Path]:
    """{ImageID: file} for the ``<ImageID>.jpg`` files in ``root/data`` with a safe ImageID.

    Only regular files count: a symlink could point anywhere on the machine.
    """
    folder = Path(root) / DATA_DIR
    if not folder.is_dir():
        raise StageError(f"{folder}: image folder not found; rerun the download stage")
    with os.scandir(folder) as entries:
        return {e.name[:-4]: Path(e.path) for e in entries
                if e.name.lower().endswith(".jpg") and is_safe_image_id(e.name[:-4])
                and e.is_file(follow_symlinks=False)}


# A byte-order mark first is what spreadsheet tools save as "CSV UTF-8"; read as plain UTF-8 it
# would become part of the first MID (or column name), and that class would silently vanish.
ENCODING = "utf-8-sig"


def _locate(path: Path, exc: BaseException) -> str:
    """Where ``path`` stops being well-formed: 'line N (why)', lines as an editor numbers them.

    Runs only after pandas failed, so a second pass over the file costs nothing in a good run.
    The csv module names the line a bad record starts on; pandas counts records, not lines,
    and only its number is left when the csv module finds nothing wrong (a row with more
    fields than the header)."""
    if isinstance(exc, UnicodeDecodeError):
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"line {number} (not UTF-8 text)"
    with path.open(encoding=ENCODING, errors="replace", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as error:
            return f"line {start} ({error})"
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    found = re.search(r"\b(line|row) (\d+)", text)
    if found is None:
        return f"({text})"
    number = int(found[2]) + (found[1] == "row")  # pandas' rows count from 0 at the header
    return f"line {number} ({text.split('C error: ')[-1]})"


@contextlib.contextmanager
def _csv_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except pd.errors.EmptyDataError:
        raise StageError(f"{path}: empty or not a CSV file; rerun the download stage or fix "
                         "the file") from None
    except (pd.errors.ParserError, csv.Error, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a well-formed CSV at {_locate(path, exc)}; rerun the "
                         "download stage or fix the file") from None


def read_csv(path: Path, **options) -> pd.DataFrame:
    """The whole of a mirror CSV (see the module's docstring)."""
    with _csv_errors(path):
        return pd.read_csv(path, encoding=ENCODING, **options)


def csv_chunks(path: Path, chunksize: int = 1_000_000, **options) -> Iterator[pd.DataFrame]:
    """A mirror CSV in chunks of rows, so a 2 GB file is never held whole."""
    with _csv_errors(path):
        yield from pd.read_csv(path, encoding=ENCODING, chunksize=chunksize, **options)


def read_classes(path: str | Path) -> dict[str, str]:
    """``classes.csv`` as {MID: DisplayName}."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: class list not found; rerun the download stage")
    rows = read_csv(path, header=None, dtype=str, keep_default_na=False)
    if rows.empty or rows.shape[1] < 2 or rows.iloc[:, :2].isna().any(axis=None):
        raise StageError(f"{path}: expected rows 'MID,DisplayName' with no header")
    return dict(zip(rows[0], rows[1]))


def mids_for_names(classes: dict[str, str], names: list[str], where: str) -> dict[str, str]:
    """Map exact Open Images display names to MIDs; an unknown name stops the run, naming it."""
    by_name = {name: mid for mid, name in classes.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise StageError(
            f"{where}: class name(s) {', '.join(map(repr, unknown))} are not Open Images "
            "boxable classes; use the exact DisplayName from metadata/classes.csv")
    return {by_name[n]: n for n in names}


def detection_columns(path: str | Path) -> list[str]:
    """The Open Images columns ``detections.csv`` has; a missing required one is an error."""
    header = read_csv(Path(path), nrows=0).columns.tolist()
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise StageError(f"{path}: missing required column(s) {', '.join(missing)}")
    return [c for c in DETECTION_COLUMNS if c in header]


def read_detections(path: str | Path, mids: set[str] | None = None,
                    stats: dict[str, int] | None = None,
                    known: set[str] | None = None) -> pd.DataFrame:
    """Read ``detections.csv``, keeping only rows whose LabelName is in ``mids`` (when given).

    Reads in chunks with only the columns we use, so a 2 GB file of the full train split is
    filtered without being held in memory whole. A coordinate that is not a number becomes NaN
    (the crop stage skips the box and counts it) instead of failing the whole file. ``stats``,
    when given, receives ``rows`` (all data rows) and, with ``known`` (every MID of
    classes.csv), ``rows_unknown_label``.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: detections file not found; rerun the download stage")
    usecols = detection_columns(path)
    strings = {c: "string" for c in ("ImageID", "LabelName", "Source") if c in usecols}
    try:
        frame = _read_chunks(path, usecols, {**strings, **{c: "float64" for c in BOX_COLUMNS}},
                             mids, stats, known)
    except ValueError:
        # Some coordinate is not a number: read them as text and coerce (slower, rare).
        frame = _read_chunks(path, usecols, {**strings, **{c: "string" for c in BOX_COLUMNS}},
                             mids, stats, known)
        for col in BOX_COLUMNS:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in FLAG_COLUMNS:
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0).astype("int8")
        else:
            frame[col] = 0
    return frame


def _read_chunks(path: Path, usecols: list[str], dtypes: dict[str, str], mids: set[str] | None,
                 stats: dict[str, int] | None, known: set[str] | None) -> pd.DataFrame:
    chunks, rows, unknown = [], 0, 0
    for chunk in csv_chunks(path, usecols=usecols, dtype=dtypes):
        rows += len(chunk)
        if known is not None:
            unknown += int((~chunk["LabelName"].isin(known)).sum())
        if mids is not None:
            chunk = chunk[chunk["LabelName"].isin(mids)]
        chunks.append(chunk)
    if stats is not None:
        stats["rows"] = rows
        if known is not None:
            stats["rows_unknown_label"] = unknown
    if not chunks:
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in usecols})
    return pd.concat(chunks, ignore_index=True)


# ----- writing the layout (the download stage; the benchmarks' synthetic sets) -----------------

def write_classes(out: Path, classes: dict[str, str]) -> None:
    """``metadata/classes.csv``: no header, sorted by MID, like class-descriptions-boxable.csv."""
    path = out / CLASSES
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(sorted(classes.items()))


def write_detections(out: Path, rows: pd.DataFrame) -> None:
    path = out / DETECTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    rows[DETECTION_COLUMNS].to_csv(path, index=False, lineterminator="\n")
