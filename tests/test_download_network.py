"""The zoo download against a network that fails: bounded waits, partial files, resuming.

Each stage run is a fresh process (as DVC runs it) whose sockets may reach 127.0.0.1 only, with
FiftyOne's real download code: its label URLs are pointed at a local HTTP server standing in for
storage.googleapis.com, and boto3's S3 endpoint (AWS_ENDPOINT_URL_S3) at the same server
standing in for the open-images-dataset bucket. The server counts every request, so a test can
say exactly what a run fetched.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stages.common.infra import progress
from stages.download import zoo
from tests import paramfile
from tests.test_download import REAL_MIDS, ZOO_URLS, make_zoo_split, tree_digest, write_params
from tests.tiny_project import copy_project

REPO = Path(__file__).resolve().parents[1]
GOOGLE = "https://storage.googleapis.com"
BUCKET = "/open-images-dataset/train/"

# Sockets may reach 127.0.0.1 only (also a sitecustomize.py, for a stage that DVC starts).
GUARD = """
import socket
LOOPBACK = ("127.0.0.1", "::1", "localhost")
def _guard(host):
    if host not in LOOPBACK:
        raise OSError("network disabled by the test")
_connect = socket.socket.connect
def connect(self, address):
    _guard(address[0] if isinstance(address, tuple) else address)
    return _connect(self, address)
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    _guard(host)
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
"""
HARNESS = GUARD + """
import os, sys, time
from stages.download import fiftyone_internals
def point(node, origin):
    for key, value in node.items():
        if isinstance(value, dict):
            point(value, origin)
        elif isinstance(value, str) and value.startswith("https://storage.googleapis.com/"):
            node[key] = origin + value[len("https://storage.googleapis.com"):]
point(fiftyone_internals.label_urls(), os.environ["TEST_ORIGIN"])
import runpy
start = time.monotonic()
try:
    runpy.run_module("stages.download", run_name="__main__")
finally:
    with open("elapsed.txt", "w") as f:
        f.write(str(time.monotonic() - start))
"""


def run_stage(cwd: Path, zoo_dir: Path, origin: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(FIFTYONE_DATASET_ZOO_DIR=str(zoo_dir), PYTHONPATH=str(REPO),
               FIFTYONE_DO_NOT_TRACK="true", TEST_ORIGIN=origin, AWS_ENDPOINT_URL_S3=origin,
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(cwd / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(cwd / "no-aws-credentials"))
    return subprocess.run([sys.executable, "-c", HARNESS], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def elapsed(cwd: Path) -> float:
    """Seconds the stage itself ran (after Python and FiftyOne were imported)."""
    return float((cwd / "elapsed.txt").read_text())


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------- fake servers

class Handler(http.server.BaseHTTPRequestHandler):
    server: "Origin"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.serve(body=False)

    def do_GET(self) -> None:
        self.serve(body=True)

    def serve(self, body: bool) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        with srv.lock:
            srv.counts[self.command, path] += 1
            srv.ranges.append((path, self.headers.get("Range")))
        data = srv.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        start = 0
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes=") and self.headers.get("If-Range", etag) == etag:
            start = int(asked[len("bytes="):].rstrip("-"))   # GCS honours ranges
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.send_header("x-goog-hash", f"crc32c=AAAAAA==, md5={md5}")
        self.end_headers()
        if not body:
            return
        if not path.startswith(BUCKET):
            if path in srv.cut_once:   # the connection breaks off after this many bytes
                self.wfile.write(data[start:start + srv.cut_once.pop(path)])
                self.wfile.flush()
                self.close_connection = True
                return
            piece = -(-(len(data) - start) // srv.label_pieces) or 1
            for at in range(start, len(data), piece):   # in pieces, a pause between them
                if at > start:
                    time.sleep(srv.piece_delay)
                self.wfile.write(data[at:at + piece])
                self.wfile.flush()
            return
        with srv.lock:
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            srv.release.wait(srv.image_delay)
            if srv.stall_images:   # half the body, then silence
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                srv.release.wait(120)
                return
            self.wfile.write(data)
        finally:
            with srv.lock:
                srv.inflight -= 1


class Origin(http.server.ThreadingHTTPServer):
    """storage.googleapis.com and the S3 bucket in one: ``files`` maps URL paths to bytes."""
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], image_delay: float = 0.0,
                 stall_images: bool = False, label_pieces: int = 1,
                 piece_delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.image_delay = image_delay
        self.label_pieces = label_pieces     # a label file's body in this many writes,
        self.piece_delay = piece_delay       # this long apart (a slow link)
        self.stall_images = stall_images
        self.counts: Counter[tuple[str, str]] = Counter()
        self.ranges: list[tuple[str, str | None]] = []   # (path, Range header) of each request
        self.cut_once: dict[str, int] = {}               # label path -> bytes sent, once
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.inflight = self.max_inflight = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def fetched(self, method: str = "GET") -> Counter[str]:
        return Counter({p: n for (m, p), n in self.counts.items() if m == method})

    def image_gets(self) -> set[str]:
        return {p[len(BUCKET):-4] for p in self.fetched() if p.startswith(BUCKET)}


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


# ---------------------------------------------------------------------------- a small Open Images

def open_images(n_wanted: int = 18, n_other: int = 6) -> tuple[dict[str, bytes], list[str]]:
    """A train split of ``n_wanted`` images with wanted classes and ``n_other`` with a Tree only,
    as the server holds it: label files at FiftyOne's URL paths, images in the bucket."""
    wanted = [REAL_MIDS[n] for n in ("Person", "Man", "Dog", "Cat", "Handgun", "Knife")]
    ids = [f"ffff{i:012x}" for i in range(n_wanted + n_other)]
    rows = ["ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
            "IsGroupOf,IsDepiction,IsInside"]
    for i, image_id in enumerate(ids):
        labels = [wanted[i % len(wanted)], REAL_MIDS["Tree"]] if i < n_wanted \
            else [REAL_MIDS["Tree"]]
        for k, mid in enumerate(labels):
            rows.append(f"{image_id},xclick,{mid},1,0.{k + 1}00000,0.900000,0.1{i % 10},0.95,"
                        f"0,0,0,0,0")
    classes = "".join(f"{mid},{name}\n" for name, mid in REAL_MIDS.items())
    image_ids = "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author," \
        "Title,OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation\n" + "".join(
            f"{i},train,https://example.invalid/{i}.jpg,,,,,,1,,,0.0\n" for i in ids)
    hierarchy = json.dumps({"LabelName": "/m/0bl9f",
                            "Subcategory": [{"LabelName": REAL_MIDS["Person"]}]})
    files = {urlsplit(ZOO_URLS["train/metadata/classes.csv"]).path: classes.encode(),
             urlsplit(ZOO_URLS["train/metadata/image_ids.csv"]).path: image_ids.encode(),
             urlsplit(ZOO_URLS["train/labels/detections.csv"]).path: ("\n".join(rows) + "\n").encode(),
             "/openimages/2018_04/bbox_labels_600_hierarchy.json": hierarchy.encode()}
    for image_id in ids:
        files[f"{BUCKET}{image_id}.jpg"] = f"jpeg bytes of {image_id} ".encode() * 50
    return files, ids[:n_wanted]


def label_path(rel: str) -> str:
    return urlsplit(ZOO_URLS[rel]).path


def record_labels(zoo_dir: Path, origin: str) -> None:
    """download-record.json saying the label files are complete, fetched from ``origin``."""
    root = zoo_dir / "open-images-v7"
    files = {rel: {"url": origin + label_path(rel), "bytes": (root / rel).stat().st_size}
             for rel in ZOO_URLS}
    (root / zoo.RECORD).write_text(json.dumps({"files": files}))


# ---------------------------------------------------------------------------- bounded waits

def test_silent_label_server_stops_the_stage_within_the_timeout(work: Path,
                                                                silent_port: int) -> None:
    """FiftyOne fetches label files with requests and no timeout: a server that accepts and
    never answers would hang it for ever. Here it ends after data.zoo.timeout, in one line."""
    write_params(work, source="open-images-v7", timeout=1)
    result = run_stage(work, work / "zoo", f"http://127.0.0.1:{silent_port}")
    err = one_error_line(result)
    assert "cannot get the class list" in err and "timed out" in err, err
    assert "data.zoo.timeout (1 s)" in err
    # measured 1.04 s; the slack is for a loaded CI machine (without the bound: for ever)
    assert elapsed(work) < 1 + 9, elapsed(work)
    split = work / "zoo/open-images-v7/train"
    assert not (split / "metadata/classes.csv").exists()
    assert not [p for p in split.rglob("*") if p.is_file()], "partial or temporary files left"
    assert not (work / "data/raw").exists()


@pytest.mark.parametrize("failure", ["silent", "stall"])
def test_image_network_failure_stops_the_stage_within_a_bound(work: Path, silent_port: int,
                                                              failure: str) -> None:
    """Images go through boto3 (60 s waits and several retries by default). ``silent``: the S3
    endpoint never answers; ``stall``: it sends half an image and goes quiet. Either way the
    stage ends within about 3 x data.zoo.timeout, leaving no partial image."""
    files, wanted = open_images(n_wanted=6, n_other=0)
    images = {i: [(REAL_MIDS["Dog"], "0.1")] for i in wanted}
    make_zoo_split(work / "zoo", images, record=False)
    data = work / "zoo/open-images-v7/train/data"
    shutil.rmtree(data)
    data.mkdir()                                             # no image yet
    origin = Origin(files, stall_images=True)
    try:
        write_params(work, source="open-images-v7", timeout=1, num_workers=3)
        url = f"http://127.0.0.1:{silent_port}" if failure == "silent" else origin.url
        record_labels(work / "zoo", url)                     # label files complete, recorded
        result = run_stage(work, work / "zoo", url)
    finally:
        origin.stop()
    err = one_error_line(result)
    assert "download into" in err and "rerun to resume" in err, err
    assert "data.zoo.timeout (1 s)" in err, err
    # silent: 3 attempts of 1 s plus botocore's backoff (< 1 s, then < 2 s), measured 3.3 s;
    # stall: 2 attempts at the body, measured 2.3 s. FiftyOne's defaults: 3 to 5 minutes.
    # 10 s of slack for a loaded CI machine; still far below any default.
    assert elapsed(work) < 3 * 1 + 3 + 10, elapsed(work)
    assert list(data.iterdir()) == [], "a partial image or a temporary was left"
    if failure == "stall":
        assert origin.image_gets(), "the stalled server was never asked for an image"
        assert not [p for p in origin.fetched() if not p.startswith(BUCKET)], \
            "label files were fetched again"


# ---------------------------------------------------------------------------- resuming

def test_interrupted_download_resumes_and_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    files, wanted = open_images()
    origin = Origin(files)
    try:
        # An uninterrupted run into an empty zoo folder.
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        write_params(fresh, source="open-images-v7", max_samples=8, shuffle=True, timeout=5)
        result = run_stage(fresh, fresh / "zoo", origin.url)
        assert result.returncode == 0, result.stderr
        gets = origin.fetched()
        for rel in ZOO_URLS:
            assert gets[label_path(rel)] == 1, rel
        chosen = origin.image_gets()
        assert len(chosen) == 8 and chosen <= set(wanted)
        split = fresh / "zoo/open-images-v7/train"
        record = json.loads((split.parent / zoo.RECORD).read_text())["files"]
        assert record == {rel: {"url": f"{origin.url}{label_path(rel)}",
                                "bytes": (split.parent / rel).stat().st_size}
                          for rel in ZOO_URLS}

        # What a run killed midway leaves: half the chosen images, a box file cut off in the
        # middle of a row, no record, temporaries of the image and label downloads; and two
        # images of wanted classes left by an earlier run with other params.
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(fresh / "zoo", resumed / "zoo")
        split = resumed / "zoo/open-images-v7/train"
        missing = sorted(chosen)[:4]
        for image_id in missing:
            (split / f"data/{image_id}.jpg").unlink()
        stale = sorted(set(wanted) - chosen)[:2]
        for image_id in stale:
            (split / f"data/{image_id}.jpg").write_bytes(files[f"{BUCKET}{image_id}.jpg"])
        (split / f"data/{missing[0]}.jpg.1a2B3c4D").write_bytes(b"half an image")
        boxes = split / "labels/detections.csv"
        whole = boxes.read_bytes()
        cut = whole.index(b"\n", len(whole) // 2) + 20
        boxes.write_bytes(whole[:cut])
        (split / "labels/.detections.csv.tmp-99999").write_bytes(whole[:100])
        (split.parent / zoo.RECORD).unlink()

        origin.counts.clear()
        write_params(resumed, source="open-images-v7", max_samples=8, shuffle=True, timeout=5)
        result = run_stage(resumed, resumed / "zoo", origin.url)
        assert result.returncode == 0, result.stderr
        gets = origin.fetched()
        # The cut box file is fetched again; the complete label files are only sized (HEAD).
        assert gets[label_path("train/labels/detections.csv")] == 1
        assert gets[label_path("train/metadata/image_ids.csv")] == 0
        assert gets[label_path("train/metadata/classes.csv")] == 0
        heads = origin.fetched("HEAD")
        assert all(heads[label_path(rel)] == 1 for rel in ZOO_URLS)
        # Exactly the missing images are fetched, the stale ones are not used.
        assert origin.image_gets() == set(missing)
        assert sum(n for p, n in gets.items() if p.startswith(BUCKET)) == len(missing)
        assert boxes.read_bytes() == whole
        assert tree_digest(resumed / "data/raw") == tree_digest(fresh / "data/raw")
        assert (resumed / "metrics/download.json").read_bytes() == \
            (fresh / "metrics/download.json").read_bytes()
        assert not list(split.rglob("*.jpg.*")) and not list(split.rglob(".*.tmp-*"))
        assert json.loads((split.parent / zoo.RECORD).read_text())["files"] == record
    finally:
        origin.stop()

    # The folder is now complete and recorded: a third run needs no network at all.
    origin.counts.clear()
    result = run_stage(resumed, resumed / "zoo", origin.url)   # the server is gone
    assert result.returncode == 0, result.stderr
    assert tree_digest(resumed / "data/raw") == tree_digest(fresh / "data/raw")


def test_box_file_cut_off_midway_is_resumed_by_the_next_run(work: Path) -> None:
    """The connection breaks off in the middle of the box file: the stage stops with one line,
    nothing appears under the final name, and the rerun asks for the rest only."""
    files, wanted = open_images()
    boxes = label_path("train/labels/detections.csv")
    half = len(files[boxes]) // 2
    origin = Origin(files)
    origin.cut_once[boxes] = half
    try:
        write_params(work, source="open-images-v7", max_samples=8, shuffle=True, timeout=5)
        err = one_error_line(run_stage(work, work / "zoo", origin.url))
        assert "rerun to resume" in err, err
        final = work / "zoo/open-images-v7/train/labels/detections.csv"
        part, _ = zoo.partial_paths(final)
        assert not final.exists() and part.read_bytes() == files[boxes][:half]
        result = run_stage(work, work / "zoo", origin.url)
    finally:
        origin.stop()
    assert result.returncode == 0, result.stderr
    assert [r for p, r in origin.ranges if p == boxes] == [None, f"bytes={half}-"]
    assert final.read_bytes() == files[boxes]
    assert not part.exists()
    assert len(origin.image_gets()) == 8


def test_second_download_into_the_same_zoo_folder_stops_at_once(work: Path) -> None:
    """Another process holds the zoo folder (a download running from a second clone): the
    stage stops with one line before touching the folder or the network."""
    files, _ = open_images()
    root = work / "zoo/open-images-v7"
    (root / "train/labels").mkdir(parents=True)
    theirs = root / "train/labels/.detections.csv.part"
    theirs.write_bytes(b"ImageID,")                       # the other run's partial file
    origin = Origin(files)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        write_params(work, source="open-images-v7", max_samples=8, timeout=5)
        err = one_error_line(run_stage(work, work / "zoo", origin.url))
        assert str(root) in err and "another download is writing into this folder" in err, err
        assert origin.counts == Counter(), "the network was used"
        assert theirs.read_bytes() == b"ImageID,"
    finally:
        holder.kill()
        holder.wait()
    try:
        result = run_stage(work, work / "zoo", origin.url)   # the lock died with its holder
    finally:
        origin.stop()
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- workers

def test_num_workers_is_how_many_images_download_at_once(work: Path) -> None:
    """data.zoo.num_workers reaches FiftyOne's S3 thread pool: with each image answered
    after 0.4 s, the server sees exactly that many image downloads at once."""
    files, wanted = open_images(n_wanted=9, n_other=0)
    origin = Origin(files, image_delay=0.4)
    try:
        write_params(work, source="open-images-v7", max_samples=9, num_workers=3, timeout=5)
        result = run_stage(work, work / "zoo", origin.url)
    finally:
        origin.stop()
    assert result.returncode == 0, result.stderr
    assert origin.image_gets() == set(wanted)
    assert origin.max_inflight == 3


# ---------------------------------------------------------------------------- under DVC

def test_a_download_that_fails_under_dvc_keeps_the_last_data_raw(tmp_path: Path) -> None:
    """DVC deletes a stage's outputs before its command runs. The report's recipe on a machine
    with no network (`cp configs/report-resnet18.yaml params.yaml && dvc exp run`) stopped in
    download with data/raw and metrics/download.json gone; dvc.yaml declares them persist, so
    the failed run ends in one line within data.zoo.timeout and leaves them as they were:
    with the params put back, DVC finds nothing to do."""
    small = {"data": {"sample": {"images": 24, "max_side": 160}}}
    project = copy_project(tmp_path / "p", small)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GUARD)          # for every process DVC starts
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               PYTHONPATH=f"{hook}{os.pathsep}{REPO}", FIFTYONE_DATASET_ZOO_DIR=str(tmp_path / "zoo"),
               FIFTYONE_DO_NOT_TRACK="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)

    for args in (["git", "init", "-q"], ["dvc", "repro", "download"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "sample"]):
        done = run(*args)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    raw, metrics = tree_digest(project / "data/raw"), (project / "metrics/download.json").read_bytes()
    committed = (project / "params.yaml").read_bytes()

    paramfile.write(project, {"data": {**small["data"], "source": "open-images-v7",
                                       "zoo": {"timeout": 1}}})
    started = time.monotonic()
    failed = run("dvc", "repro", "download")
    took = time.monotonic() - started
    assert failed.returncode != 0
    errors = [l for l in failed.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "cannot get the class list" in errors[0] \
        and "network disabled by the test" in errors[0], failed.stderr
    assert took < 60, took   # DVC's start and the stage's imports; the wait itself is 1 s at most
    assert tree_digest(project / "data/raw") == raw
    assert (project / "metrics/download.json").read_bytes() == metrics

    (project / "params.yaml").write_bytes(committed)
    status = run("dvc", "status", "--json", "download")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout


# ---------------------------------------------------------------------------- progress

BYTES_LINE = (r"download train/labels/detections\.csv: [\d.,]+ k?B/{size} \((\d+)%\), "
              r"[\d.,]+ [kMG]?B/s, ETA \d+:\d\d")
IMAGES_LINE = r"download train images: (\d)/8 images \(\d+%\), \d+ images/s, ETA \d+:\d\d"


def test_progress_shows_as_plain_lines_when_stderr_is_a_pipe(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `dvc repro` or a pipe the download says how far it is, in lines on stderr: the box
    file in bytes (sent in 4 pieces), the images one by one (FiftyOne's thread pool), each
    with done/total, %, rate and ETA; FiftyOne's own redrawn bars are gone from stdout, and
    the files are the server's bytes."""
    monkeypatch.setenv("PROGRESS_EVERY_S", "0")            # a line at every step but the last
    files, wanted = open_images()
    boxes = label_path("train/labels/detections.csv")
    origin = Origin(files, image_delay=0.05, label_pieces=4, piece_delay=0.1)
    try:
        write_params(work, source="open-images-v7", max_samples=8, num_workers=3, timeout=5)
        result = run_stage(work, work / "zoo", origin.url)
    finally:
        origin.stop()
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    size = re.escape(progress.bytes_text(len(files[boxes])))
    label_lines = [re.fullmatch(BYTES_LINE.format(size=size), l) for l in err
                   if l.startswith("download train/labels/detections.csv")]
    assert label_lines and all(label_lines), err
    percents = [int(m[1]) for m in label_lines]
    assert percents == sorted(percents) and percents[-1] < 100, err
    image_lines = [re.fullmatch(IMAGES_LINE, l) for l in err if l.startswith("download train images")]
    assert all(image_lines) and [int(m[1]) for m in image_lines] == list(range(1, 8)), err
    assert "\r" not in result.stdout and "files/s" not in result.stdout, result.stdout
    split = work / "zoo/open-images-v7/train"
    for rel in ZOO_URLS:
        assert (split.parent / rel).read_bytes() == files[label_path(rel)], rel
    raw = sorted((work / "data/raw/data").iterdir())
    assert len(raw) == 8
    for picture in raw:
        assert picture.read_bytes() == files[f"{BUCKET}{picture.name}"]
        assert (split / "data" / picture.name).read_bytes() == picture.read_bytes()


# ---------------------------------------------------------------------------- units

def test_fetch_of_a_cut_off_body_leaves_no_file(tmp_path: Path) -> None:
    """A server that closes the connection before Content-Length: an error, no file under the
    final name (a server that states no validators: the received bytes wait in .part)."""
    class Short(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 400)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "labels/detections.csv"
        with pytest.raises(OSError):
            zoo.fetch(f"http://127.0.0.1:{srv.server_address[1]}/x.csv", target, 2, quiet=True)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == \
        [".detections.csv.part", ".detections.csv.part.json"]


BOXES = "/openimages/v7/oidv7-train-annotations-bbox.csv"


def cut_then_resume(tmp_path: Path, files: dict[str, bytes], cut: int,
                    change: bytes | None = None) -> tuple[Origin, Path, bytes]:
    """Fetch BOXES through a connection that breaks off after ``cut`` bytes, then again (after
    the object became ``change``, if given); return the server, the file and the bytes."""
    origin = Origin(files)
    origin.cut_once[BOXES] = cut
    target = tmp_path / "labels/detections.csv"
    url = origin.url + BOXES
    try:
        with pytest.raises(OSError, match="connection|Connection|IncompleteRead|ended"):
            zoo.fetch(url, target, 5, quiet=True)
        assert not target.exists()
        part, meta = zoo.partial_paths(target)
        assert part.read_bytes() == files[BOXES][:cut]
        assert json.loads(meta.read_text())["bytes"] == len(files[BOXES])
        if change is not None:
            files[BOXES] = change
        assert zoo.fetch(url, target, 5, quiet=True) == len(files[BOXES])
    finally:
        origin.stop()
    assert sorted(p.name for p in target.parent.iterdir()) == ["detections.csv"]
    return origin, target, files[BOXES]


def test_cut_off_label_file_is_resumed_from_where_it_stopped(tmp_path: Path) -> None:
    """The second call asks for the rest only (Range after the bytes kept, If-Range with the
    ETag) and the file ends byte-identical, checked against the MD5 the server states."""
    whole = bytes(range(256)) * 4000                       # 1 MB, not a multiple of a chunk
    origin, target, expected = cut_then_resume(tmp_path, {BOXES: whole}, cut=300_001)
    assert target.read_bytes() == whole
    assert origin.ranges == [(BOXES, None), (BOXES, "bytes=300001-")]


def test_changed_object_is_fetched_whole_again(tmp_path: Path) -> None:
    """The object changed between the two calls: the server's If-Range check sends it whole
    (200), and the stale partial bytes are not mixed in."""
    whole = b"a,b,c\n" * 50_000
    changed = b"x,y,z\n" * 60_000
    origin, target, expected = cut_then_resume(tmp_path, {BOXES: whole}, cut=100_000,
                                               change=changed)
    assert target.read_bytes() == changed
    assert origin.ranges == [(BOXES, None), (BOXES, "bytes=100000-")]


def test_range_of_another_object_is_refused(tmp_path: Path) -> None:
    """A server that ignores If-Range answers 206 with the range of a changed object: the
    ETag and size differ from the partial's, so the file is fetched whole instead."""
    whole = b"a,b,c\n" * 50_000
    target = tmp_path / "labels/detections.csv"
    part, meta = zoo.partial_paths(target)
    target.parent.mkdir(parents=True)
    part.write_bytes(whole[:1000])
    meta.write_text(json.dumps({"url": "U", "bytes": len(whole), "etag": '"old"',
                                "last_modified": None, "md5": None}))
    origin = Origin({BOXES: whole})
    url = origin.url + BOXES
    meta.write_text(meta.read_text().replace('"U"', json.dumps(url)))
    try:
        assert zoo.fetch(url, target, 5, quiet=True) == len(whole)   # If-Range "old": 200
    finally:
        origin.stop()
    assert target.read_bytes() == whole
    assert origin.ranges == [(BOXES, "bytes=1000-")]

    class NoIfRange:   # a 206 for a different object of another size
        status_code = 206
        headers = {"Content-Range": f"bytes 1000-{len(whole) + 9}/{len(whole) + 10}",
                   "ETag": '"new"'}
    assert not zoo.resumes(NoIfRange(), 1000, {"bytes": len(whole), "etag": '"old"'})
    NoIfRange.headers = {"Content-Range": f"bytes 1000-{len(whole) - 1}/{len(whole)}",
                         "ETag": '"new"'}
    assert not zoo.resumes(NoIfRange(), 1000, {"bytes": len(whole), "etag": '"old"'})
    assert zoo.resumes(NoIfRange(), 1000, {"bytes": len(whole), "etag": '"new"'})
    assert not zoo.resumes(NoIfRange(), 999, {"bytes": len(whole), "etag": '"new"'})


def test_bytes_whose_md5_differs_are_never_renamed_into_place(tmp_path: Path) -> None:
    """A partial file whose kept bytes were damaged: the joined file's MD5 is not the one the
    server states, so it is removed, nothing appears under the final name, and the next call
    fetches the file whole."""
    whole = bytes(range(256)) * 2000
    origin = Origin({BOXES: whole})
    origin.cut_once[BOXES] = 200_000
    target = tmp_path / "labels/detections.csv"
    url = origin.url + BOXES
    part, meta = zoo.partial_paths(target)
    try:
        with pytest.raises(OSError):
            zoo.fetch(url, target, 5, quiet=True)
        damaged = bytearray(part.read_bytes())
        damaged[1234] ^= 0xFF
        part.write_bytes(bytes(damaged))
        with pytest.raises(OSError, match="MD5"):
            zoo.fetch(url, target, 5, quiet=True)
        assert not target.exists() and not part.exists() and not meta.exists()
        assert zoo.fetch(url, target, 5, quiet=True) == len(whole)
    finally:
        origin.stop()
    assert target.read_bytes() == whole
    assert [r for _, r in origin.ranges] == [None, "bytes=200000-", None]


def test_partial_that_is_whole_is_renamed_without_the_network(tmp_path: Path) -> None:
    """Killed between the last byte and the rename: the next call finishes it offline."""
    whole = b"ImageID,LabelName\n" * 100
    target = tmp_path / "labels/detections.csv"
    part, meta = zoo.partial_paths(target)
    target.parent.mkdir(parents=True)
    part.write_bytes(whole)
    meta.write_text(json.dumps({"url": "http://127.0.0.1:9/x", "bytes": len(whole),
                                "md5": hashlib.md5(whole).hexdigest()}))
    assert zoo.fetch("http://127.0.0.1:9/x", target, 1, quiet=True) == len(whole)
    assert target.read_bytes() == whole and not part.exists() and not meta.exists()


def test_goog_md5_reads_gcs_hash_header() -> None:
    class R:
        headers = {"x-goog-hash": "crc32c=n03x6A==, md5=Ojk9c3dhfxgoKVVHYwFbHQ=="}
    assert zoo.goog_md5(R()) == base64.b64decode("Ojk9c3dhfxgoKVVHYwFbHQ==").hex()
    R.headers = {"x-goog-hash": "crc32c=n03x6A=="}
    assert zoo.goog_md5(R()) is None


def test_record_decides_without_the_network_when_it_has_an_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "remote_size", lambda *a: pytest.fail("asked the network"))
    root = tmp_path / "open-images-v7"
    f = root / "train/labels/detections.csv"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"a" * 10)
    rec = zoo.Record(root, 1)
    rec.add(f, "http://x/d.csv", 10)
    again = zoo.Record(root, 1)                       # read back from disk
    assert again.complete(f, "http://x/d.csv")
    f.write_bytes(b"a" * 4)                           # cut off after the record was written
    assert not again.complete(f, "http://x/d.csv")
    f.write_bytes(b"a" * 10)
    assert not again.complete(f, "http://x/other.csv")   # another URL: another file


def test_tidy_removes_temporaries_and_cut_json(tmp_path: Path) -> None:
    root = tmp_path / "open-images-v7"
    (root / "train/data").mkdir(parents=True)
    (root / "train/metadata").mkdir()
    (root / "train/data/ffff000000000001.jpg").write_bytes(b"whole")
    (root / "train/data/ffff000000000002.jpg.9aF0c3D1").write_bytes(b"half")
    (root / "train/metadata/hierarchy.json").write_text('{"LabelName": "En')
    (root / "train/metadata/.image_ids.csv.tmp-4242").write_text("ImageID\n")
    (root / "info.json").write_text("{}")
    zoo.tidy(root, ["train"])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == \
        ["info.json", "train/data/ffff000000000001.jpg"]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
