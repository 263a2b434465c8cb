"""Progress inside long work: plain lines where stderr is not a terminal (a pipe, `dvc repro`'s
log, CI), every PROGRESS_EVERY_S seconds, with the count, the rate and the time left."""
import io
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from stages.common.infra import progress
from tests import paramfile
from tests.tiny_project import ROOT, write_colour_split


def test_a_line_every_interval_with_rate_and_eta(monkeypatch):
    monkeypatch.setenv("PROGRESS_EVERY_S", "5")
    ticks = itertools.count(0, 2)  # each item takes 2 s on this clock
    out = io.StringIO()
    items = list(progress.tracked(range(10), "train epoch 1/3", 40, size=lambda item: 4,
                                  stream=out, clock=lambda: next(ticks)))
    assert items == list(range(10))
    assert out.getvalue().splitlines() == [
        "train epoch 1/3: 12/40 images (30%), 2 images/s, ETA 0:14",
        "train epoch 1/3: 24/40 images (60%), 2 images/s, ETA 0:08",
        "train epoch 1/3: 36/40 images (90%), 2 images/s, ETA 0:02",
    ]


def test_work_shorter_than_the_interval_prints_nothing_and_disabled_prints_nothing():
    out = io.StringIO()
    assert list(progress.tracked("abc", "predict", 3, stream=out)) == ["a", "b", "c"]
    assert list(progress.tracked("abc", "predict", 3, stream=out, enabled=False,
                                 clock=lambda: 1e9)) == ["a", "b", "c"]
    assert out.getvalue() == ""


@pytest.mark.parametrize("value,expected", [("2.5", 2.5), ("0", 0.0), ("-1", 10.0),
                                            ("soon", 10.0)])
def test_the_interval_comes_from_the_environment_and_a_bad_value_is_ignored(
        monkeypatch, value, expected):
    monkeypatch.setenv("PROGRESS_EVERY_S", value)
    assert progress.interval() == expected


def test_durations_and_a_line_without_a_rate():
    assert progress.duration(3725) == "1:02:05" and progress.duration(61) == "1:01"
    assert progress.line("evaluate", 0, 10, "images", 0.0) == "evaluate: 0/10 images (0%), 0 images/s"


def test_the_train_stage_shows_progress_inside_each_epoch_when_not_on_a_terminal(tmp_path):
    """A progress line after each batch but an epoch's last, with rate and ETA, on a stderr that
    is a pipe. Not marked `training`: the lines count batches, whatever floats training sums."""
    write_colour_split(tmp_path, np.random.default_rng(0), {"train": 8, "val": 2}, 40)
    paramfile.write(tmp_path, {"model": {"arch": "resnet18", "weights": "none"},
                               "train": {"epochs": 2, "batch_size": 4, "num_workers": 1,
                                         "device": "cpu", "nproc": 1}})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROGRESS_EVERY_S": "0"}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # stderr: a pipe
    assert proc.returncode == 0, proc.stderr[-2000:]
    for epoch in (1, 2):
        lines = [l for l in proc.stderr.splitlines() if l.startswith(f"train epoch {epoch}/2: ")]
        # 24 crops in batches of 4: a line after each batch but the last
        assert [l.split(":")[1].split()[0] for l in lines] == \
            ["4/24", "8/24", "12/24", "16/24", "20/24"], proc.stderr
        assert all("images/s" in l and "ETA" in l for l in lines)


def test_bytes_are_shown_scaled_and_a_resumed_part_does_not_count_toward_the_rate(monkeypatch):
    """A label file resumed at 1.5 GB of 2.1 GB: the rate is what this run fetched, 100 MB in
    10 s, so the ETA is for the 0.6 GB left at 10 MB/s."""
    monkeypatch.setenv("PROGRESS_EVERY_S", "5")
    ticks = iter([0, 10])
    out = io.StringIO()
    with progress.Meter("download train/labels/detections.csv", 2_100_000_000, progress.BYTES,
                        stream=out, initial=1_500_000_000, clock=lambda: next(ticks)) as meter:
        meter.update(100_000_000)
    assert out.getvalue() == ("download train/labels/detections.csv: 1.6 GB/2.1 GB (76%), "
                              "10.0 MB/s, ETA 0:50\n")
    assert progress.line("download x.csv", 999, None, progress.BYTES, 1.0) == \
        "download x.csv: 999 B, 999 B/s"                      # no size stated: no % nor ETA
    assert progress.line("download x", 12, None, "images", 4.0) == "download x: 12 images, 3 images/s"


def test_a_meter_counts_updates_from_many_threads(monkeypatch):
    """Images finish in a thread pool: every update counts once, and the lines go up."""
    import threading

    monkeypatch.setenv("PROGRESS_EVERY_S", "0")
    out = io.StringIO()
    with progress.Meter("download train images", 8 * 500, stream=out) as meter:
        workers = [threading.Thread(target=lambda: [meter.update() for _ in range(500)])
                   for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert meter.done == 8 * 500
    counts = [int(l.split(": ")[1].split("/")[0].replace(",", "")) for l in out.getvalue().splitlines()]
    assert counts == list(range(1, 8 * 500)), "a count lost, repeated or out of order"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_meter_draws_a_bar_in_bytes():
    out = Terminal()
    with progress.Meter("download train/labels/detections.csv", 4_000_000, progress.BYTES,
                        stream=out, initial=1_000_000) as meter:
        meter.update(1_000_000)
    drawn = out.getvalue()
    # drawn at once with the resumed part (tqdm redraws at most every 0.1 s)
    assert "download train/labels/detections.csv" in drawn and "1.00M/4.00M" in drawn, drawn
    assert "B/s" in drawn
    assert "\r" in drawn and "ETA" not in drawn               # tqdm's bar, not our lines
