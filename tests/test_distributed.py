"""The train stage under DDP: 2 gloo processes on the CPU against 1 process, same tiny data.

What may legitimately differ between the two runs: each rank sees half of every epoch's batches
(other batch compositions, other per-rank BatchNorm statistics), so the weights differ and the
val loss is not comparable to 1e-5. What must not differ:
- the reduction: the val loss the 2-process run reports for its best epoch is that of the weights
  it saved, over the whole val set, so one process re-scoring the checkpoint gets it to 1e-5
  (float32 sums in another order; the loss is ~1e-2..1, so 1e-5 is far below any real change);
- the outcome: the set is easy (one solid colour per class, plus noise), so both runs classify
  all of val correctly: accuracies within one val crop of each other (ACC_TOL).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.inference.batches import CropSet, batches
from stages.common.model.build import load_checkpoint
from stages.train import stage as train
from stages.train.distributed import World, shard_indices
from stages.train.recipe import FocalLoss
from tests import paramfile
from tests.tiny_project import write_colour_split


pytestmark = pytest.mark.training  # CI reruns these under OMP_NUM_THREADS=1 (make test-threads)

ROOT = Path(__file__).resolve().parents[1]
N_VAL = 8  # per class
ACC_TOL = 1 / (3 * N_VAL) + 1e-9  # one val crop
RUN_TIMEOUT_S = 300


def _run_stage(tmp: Path, nproc: int) -> subprocess.CompletedProcess:
    # the report's recipe: BatchNorm trains in layer4 (per-rank stats), frozen and fast below
    paramfile.write(tmp, {
        "model": {"arch": "resnet18", "weights": "none", "trainable": ["layer4", "fc"]},
        "train": {"epochs": 3, "batch_size": 8, "num_workers": 0, "device": "cpu",
                  "nproc": nproc, "patience": 3}})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"nproc={nproc} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same data and params trained by 1 and by 2 processes."""
    out = {}
    for nproc in (1, 2):
        tmp = tmp_path_factory.mktemp(f"nproc{nproc}")
        write_colour_split(tmp, np.random.default_rng(0), {"train": 24, "val": N_VAL}, 40)
        proc = _run_stage(tmp, nproc)
        metrics = json.loads((tmp / "metrics/train.json").read_text())
        out[nproc] = {"dir": tmp, "stdout": proc.stdout, "metrics": metrics}
    return out


def test_two_processes_run_and_only_rank_0_writes_and_prints(runs):
    two = runs[2]
    assert two["metrics"]["processes"] == 2 and runs[1]["metrics"]["processes"] == 1
    assert two["stdout"].count("train: resnet18 on cpu") == 1  # rank 1 prints nothing
    assert "2 processes" in two["stdout"]
    assert two["stdout"].count("[03] train:") == 1
    # the resume state is removed once the outputs are in place, its folder with it
    assert sorted(p.name for p in (two["dir"] / "data").iterdir()) == ["model", "split"]
    assert [p.name for p in (two["dir"] / "data/model").iterdir()] == ["best.pt"]


def test_checkpoint_format_is_that_of_one_process(runs):
    one = torch.load(runs[1]["dir"] / "data/model/best.pt", weights_only=True)
    two = torch.load(runs[2]["dir"] / "data/model/best.pt", weights_only=True)
    assert set(one) == set(two)
    assert set(one["model_state"]) == set(two["model_state"])  # no "module." prefix from DDP
    load_checkpoint(runs[2]["dir"] / "data/model/best.pt")


def _score_alone(checkpoint: Path, val_dir: Path) -> tuple[float, float]:
    model, meta = load_checkpoint(checkpoint)
    crops = CropSet.load(val_dir, torch.device("cpu"))
    cpu = torch.device("cpu")  # another batching than training's (5), on purpose
    loader = batches(crops, torch.arange(len(crops)), 5, cpu, meta["mean"], meta["std"])
    params = meta["params"]
    return train.validate(model, loader, FocalLoss(params["focal_alpha"], params["focal_gamma"]),
                          cpu)


def test_reduced_val_metrics_are_those_of_the_saved_weights_on_the_whole_val_set(runs):
    two = runs[2]
    loss, acc = _score_alone(two["dir"] / "data/model/best.pt", two["dir"] / "data/split/val")
    assert abs(two["metrics"]["best_val_loss"] - loss) < 1e-5
    # float32 mean (one process) vs an exact count over float64 (reduced)
    assert two["metrics"]["best_val_acc"] == pytest.approx(acc, abs=1e-6)


def test_two_processes_reach_the_accuracy_of_one(runs):
    acc1, acc2 = (runs[n]["metrics"]["best_val_acc"] for n in (1, 2))
    assert acc1 >= 1 - ACC_TOL and acc2 >= 1 - ACC_TOL, (acc1, acc2)
    assert abs(acc1 - acc2) <= ACC_TOL


def test_val_shards_cover_every_item_once():
    for n, size in [(7, 2), (8, 2), (3, 4)]:
        shards = [shard_indices(n, World(rank=r, local_rank=r, size=size)) for r in range(size)]
        assert sorted(i for s in shards for i in s) == list(range(n))
