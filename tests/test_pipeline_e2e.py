"""End to end: the real `dvc repro` / `dvc exp run` on a tiny sample, in a temporary git repo.

The slowest module: it trains twice, resnet18 (the first `dvc repro`) and mobilenet_v3_small
(the arch experiment: a family that is not a ResNet, through every stage after split as DVC
runs them); the recall-target test reruns calibrate onwards only, the queued sweep accept
only. It is the one module that shows the stages chain, cache and rerun as the README promises.
It asserts what is guaranteed (which stages ran, which keys exist, well-formed outputs), never
what a model happened to learn: another CPU or thread count trains other weights.

Marked `training` (rerun under OMP_NUM_THREADS=1 by `make test-threads`): only the two tests of
what the first `dvc repro` computed (metrics, operating point, ONNX parity, model card), which
sum floats. The others check DVC's bookkeeping (what reruns, caches, pushes, queues), the same
whatever the weights, so they run once.
"""
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from stages.common.alarm.statement import threshold_text
from stages.common.model.build import load_checkpoint, normalisation
from stages.common.model.onnx import verified_bytes
from stages.common.serving.classifiers import OnnxClassifier
from stages.common.config.params import NO_OUTPUT
from tests.tiny_project import copy_project

QUEUE_TIMEOUT_S = 300
# The arch experiment's: the cheapest family that is not a ResNet, so the experiment also shows
# another family's head, normalisation and ONNX metadata through train, calibrate, evaluate,
# conditions and export. Which stages rerun and what `dvc metrics diff` lines up do not depend on
# the arch; the README's resnet50 trains and exports slower for nothing more.
EXP_ARCH = "mobilenet_v3_small"
# The queued sweep's key and values: each value reruns accept alone (no site set: a second), none
# trains; the queue, its workers and exp show are the same whatever the key.
SWEEP_KEY, SWEEP_VALUES = "accept.batch_size", (16, 8)
TINY = {  # a few dozen pictures at 32 px: seconds per stage, every code path still taken
    "data": {"sample": {"images": 48, "max_side": 160}},
    "crops": {"size": 32, "min_box_px": 12, "workers": 1},
    "train": {"epochs": 2, "batch_size": 16, "num_workers": 0},
    "evaluate": {"batch_size": 16, "speed_runs": 3},
    # two conditions, every code path of the suite; the ten are tests/test_conditions.py's
    "conditions": {"measure": {"night": [1, 5], "fog": [3]}},
    "export": {"batch_size": 8, "speed_runs": 3},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git copy of the project with tiny params, after its first `dvc repro`."""
    path = copy_project(tmp_path_factory.mktemp("e2e") / "repo", TINY)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")

    def run(*args, check=True):
        proc = subprocess.run(args, cwd=path, env=env, capture_output=True, text=True,
                              timeout=600)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    run("git", "init", "-q", "-b", "main")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny pipeline")
    first = run(sys.executable, "-m", "dvc", "repro")
    return SimpleNamespace(path=path, run=run, env=env, first_output=first.stdout)


def dvc(repo, *args, check=True):
    return repo.run(sys.executable, "-m", "dvc", *args, check=check)


def _arch(repo) -> str:
    """The workspace's model.arch: TINY's resnet18, or EXP_ARCH once the arch experiment ran
    (tests may run in any order)."""
    return yaml.safe_load((repo.path / "params.yaml").read_text())["model"]["arch"]


@pytest.mark.training
def test_repro_runs_every_stage_and_writes_metrics_and_plots(repo):
    for stage in ["download", "extract_crops", "split", "train", "calibrate", "evaluate",
                  "conditions", "accept", "export"]:
        assert f"Running stage '{stage}'" in repo.first_output
    metrics = json.loads((repo.path / "metrics/eval.json").read_text())
    for key in ["accuracy", "macro_f1", "weighted_f1", "person_recall", "goals"]:
        assert key in metrics
    # the timings apart from the scores, each stage's in its own file
    speed = {stage: json.loads((repo.path / f"metrics/speed/{stage}.json").read_text())
             for stage in ("train", "eval", "export")}
    assert "speed" not in metrics and "train_seconds" not in json.loads(
        (repo.path / "metrics/train.json").read_text())
    # the person alarm, under the keys `dvc metrics diff` lines up across experiments
    op, cal = metrics["operating_point"], metrics["calibration"]
    assert {"threshold", "target_recall", "test_person_recall", "test_person_precision",
            "false_alarms_per_1000"} <= set(op)
    assert set(cal) == {"ece_before", "ece_after", "temperature", "nll_before", "nll_after",
                        "brier_before", "brier_after"}
    point = json.loads((repo.path / "data/calibration/operating_point.json").read_text())
    assert op["threshold"] == point["threshold"] and op["target_recall"] == 0.99
    assert op["point_sha256"] == point["point_sha256"]  # eval.json scored this very point
    assert cal["temperature"] == round(point["temperature"], 4) > 0
    assert 0 <= op["test_person_recall"] <= 1 and 0 <= cal["ece_after"] <= 1
    assert op["test_persons"] == metrics["per_class"]["person"]["support"]
    for csv in ["pr/person.csv", "pr/animal.csv", "pr/object.csv", "roc_person.csv",
                "reliability/before.csv", "reliability/after.csv"]:
        assert len((repo.path / "plots/eval" / csv).read_text().splitlines()) >= 2, csv
    assert set(metrics["per_class"]) == {"animal", "object", "person"}
    assert speed["eval"]["batch1_ms_q1"] <= speed["eval"]["batch1_ms_per_image"] \
        <= speed["eval"]["batch1_ms_q3"]
    assert speed["train"]["train_seconds"] > 0 and speed["export"]["onnxruntime"]["batch1_runs"]
    assert point["fitted_on"] == "data/split/calibration"  # the default share
    assert op["expected_recall"] == point["val"]["expected_recall"]
    assert op["target_verdict"] in ("met", "not shown", "not met")
    for split in ["train", "val", "calibration", "test"]:
        assert sorted(p.name for p in (repo.path / "data/split" / split).iterdir()) == \
            ["animal", "object", "person"]
    for png in ["confusion.png", "learning_curves.png", "mistakes.png", "alarm.png"]:
        assert (repo.path / "plots/eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert (repo.path / "dvc.lock").is_file()
    exported = json.loads((repo.path / "metrics/export.json").read_text())
    assert "speed" not in exported
    assert exported["parity"]["max_abs_logit_diff"] <= 1e-3
    assert exported["parity"]["test_crops"] == metrics["test_crops"]
    assert (repo.path / "data/export/model.onnx").stat().st_size > 1_000_000


@pytest.mark.training
def test_the_model_card_matches_the_metrics_and_the_lock(repo):
    card = (repo.path / "data/export/MODEL_CARD.md").read_text()
    metrics = json.loads((repo.path / "metrics/eval.json").read_text())
    split = json.loads((repo.path / "metrics/split.json").read_text())
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]
    for heading in ["## Intended use", "## Not for", "## Data", "## Recipe", "## Test figures",
                    "## Speed", "## Rebuild"]:
        assert heading in card
    assert f"Accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}" in card
    assert f"person recall\n{metrics['person_recall']:.4f}" in card
    person = metrics["per_class"]["person"]
    assert f"| person | {person['precision']:.4f} | {person['recall']:.4f}" in card
    test = split["crops"]["test"]
    assert f"| test | {test['animal']} | {test['object']} | {test['person']} | {test['total']} |" in card
    for stage in ["download", "extract_crops", "split"]:
        for out in lock[stage]["outs"]:
            assert f"| `{out['path']}` | `{out['md5']}` |" in card
    assert "not a detector" in card and f"\n  arch: {_arch(repo)}\n" in card
    op = metrics["operating_point"]
    assert "## Person alarm (operating point)" in card
    assert f"On test: person recall {op['test_person_recall']}" in card
    assert f"{op['false_alarms_per_1000']} false alarms per 1,000" in card
    said = " ".join(card.split())  # the statement, as evaluate recorded its figures
    assert f"(expected recall {op['expected_recall']:g})" in said
    assert f"{op['test_persons'] - op['test_persons_missed']} of {op['test_persons']} test " \
           f"persons (in {op['test_person_pictures']} picture" in said
    calibration = split["crops"]["calibration"]
    assert f"| calibration | {calibration['animal']} | {calibration['object']} | " \
           f"{calibration['person']} | {calibration['total']} |" in card
    carried = OnnxClassifier(repo.path / "data/export/model.onnx").operating_point
    assert f">= **{threshold_text(carried.threshold, carried.threshold_log_odds)}**" in card


def test_second_repro_does_nothing_and_status_is_clean(repo):
    again = dvc(repo, "repro")
    assert "Running stage" not in again.stdout
    assert "up to date" in dvc(repo, "status").stdout


def _commit_all(repo, message):
    repo.run("git", "add", "-A")
    if repo.run("git", "diff", "--cached", "--quiet", check=False).returncode:
        repo.run("git", "commit", "-qm", message)


def test_remote_push_then_fresh_clone_pull_is_up_to_date(repo, tmp_path):
    """README, "A shared cache": one machine pushes, another clones and pulls, nothing reruns."""
    remote = tmp_path / "dvc-remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    _commit_all(repo, "baseline run")
    dvc(repo, "push")
    assert any(remote.rglob("*")), "dvc push left the remote empty"

    clone = tmp_path / "clone"
    repo.run("git", "clone", "-q", str(repo.path), str(clone))
    other = SimpleNamespace(path=clone, run=lambda *a, check=True: _run_in(repo, clone, a, check))
    assert not (clone / "data/model/best.pt").exists()
    dvc(other, "pull")
    assert (clone / "data/model/best.pt").read_bytes() == \
        (repo.path / "data/model/best.pt").read_bytes()
    assert "up to date" in dvc(other, "status").stdout
    assert "Running stage" not in dvc(other, "repro").stdout


def _run_in(repo, cwd, args, check):
    proc = subprocess.run(args, cwd=cwd, env=repo.env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n"
                    f"{proc.stderr}")
    return proc


def test_arch_change_leaves_everything_upstream_of_train_cached(repo):
    params_file = repo.path / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["model"]["arch"] = "resnet50"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stale = json.loads(dvc(repo, "status", "--json").stdout)
    finally:
        params_file.write_text(original)
    # dvc status lists the stages whose own deps changed: train's params, and export's (its model
    # card states the recipe). evaluate reads train's outputs, so it reruns after train (shown
    # by the exp run test); nothing upstream is stale.
    assert set(stale) == {"train", "export"}


def _another(value):
    """A valid value other than ``value``, for a bool, int or float key."""
    return (not value) if isinstance(value, bool) else value + 1


def _stages_that_would_run(repo, *flags) -> set[str]:
    out = dvc(repo, "repro", "--dry", *flags).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_a_key_that_changes_no_output_reruns_nothing_and_the_arch_reruns_train_onwards(repo):
    params_file = repo.path / "params.yaml"
    original = params_file.read_text()
    try:
        # Every such key (crops.workers, train.num_workers...) changed at once: DVC reruns a
        # stage when the value of one of its params changed, so nothing to rerun for all of them
        # is nothing to rerun for each (one status and one dry run, not two per key).
        params = yaml.safe_load(original)
        for key in sorted(NO_OUTPUT):
            *sections, leaf = key.split(".")
            section = functools.reduce(dict.__getitem__, sections, params)
            section[leaf] = _another(section[leaf])
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert json.loads(dvc(repo, "status", "--json").stdout) == {}, sorted(NO_OUTPUT)
        assert _stages_that_would_run(repo) == set(), sorted(NO_OUTPUT)
        params = yaml.safe_load(original)
        params["model"]["arch"] = "resnet50"  # neither TINY's nor EXP_ARCH: a change in any order
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert _stages_that_would_run(repo, "--force-downstream") == {
            "train", "calibrate", "evaluate", "conditions", "accept", "export"}
    finally:
        params_file.write_text(original)


def test_a_new_recall_target_reruns_only_calibrate_and_what_follows(repo):
    _commit_all(repo, "baseline run")
    params_file = repo.path / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["calibrate"]["person_recall_target"] = 0.5
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert set(json.loads(dvc(repo, "status", "--json").stdout)) == {"calibrate"}
        out = dvc(repo, "repro").stdout
        ran = {line.split("'")[1] for line in out.splitlines()
               if line.startswith("Running stage")}
        assert ran == {"calibrate", "evaluate", "conditions", "accept", "export"}, out
        metrics = json.loads((repo.path / "metrics/eval.json").read_text())
        assert metrics["operating_point"]["target_recall"] == 0.5
    finally:
        params_file.write_text(original)
    # back to the commit as the README's recovery does: nothing left to run, nothing trains (a
    # `dvc repro` here restores calibrate and accept from DVC's run cache but runs evaluate,
    # conditions and export again: 20 s more)
    repo.run("git", "checkout", "--", "dvc.lock", "metrics", "plots")
    dvc(repo, "checkout")
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout
    assert json.loads((repo.path / "metrics/eval.json").read_text())[
        "operating_point"]["target_recall"] == 0.99


def test_exp_run_of_another_arch_reruns_train_onwards_and_metrics_diff_compares_both(repo):
    """README's `dvc exp run -S model.arch=...` (there resnet50, here EXP_ARCH): train, calibrate,
    evaluate, conditions and export run, the data stages come from the cache; the arch, its
    normalisation and its 3-way head reach the checkpoint, the metrics and the ONNX file (export
    fails if ONNX and PyTorch logits differ); `dvc metrics diff --all` lines up both runs'
    scores, speeds and ONNX sizes key by key, and `dvc exp show` lists the arch."""
    _commit_all(repo, "baseline run")
    exp = dvc(repo, "exp", "run", "-S", f"model.arch={EXP_ARCH}")
    out = exp.stdout + exp.stderr
    for stage in ["train", "calibrate", "evaluate", "conditions", "accept", "export"]:
        assert f"Running stage '{stage}'" in out
    for upstream in ["download", "extract_crops", "split"]:
        assert f"Running stage '{upstream}'" not in out
    assert f"model.zero_init_residual applies to resnet only; {EXP_ARCH} starts" in out
    model, meta = load_checkpoint(repo.path / "data/model/best.pt")
    assert meta.arch == EXP_ARCH and (meta.mean, meta.std) == normalisation(EXP_ARCH)
    assert model.classifier[-1][1].out_features == len(meta.classes) == 3
    for metrics in ("eval", "export"):
        assert json.loads((repo.path / f"metrics/{metrics}.json").read_text())["arch"] == EXP_ARCH
    _, stored, _ = verified_bytes(repo.path / "data/export/model.onnx")
    assert json.loads(stored["arch"]) == EXP_ARCH and json.loads(stored["mean"]) == meta.mean

    # --all: unchanged figures too. Whether EXP_ARCH scores other figures than resnet18 on this
    # tiny set depends on the machine's float sums; that both are compared, key by key, does not.
    diff = json.loads(dvc(repo, "metrics", "diff", "--all", "--json").stdout)
    scores = diff["metrics/eval.json"]
    for key in ["accuracy", "macro_f1", "person_recall", "per_class.person.recall",
                "per_class.animal.f1", "per_class.object.precision"]:
        assert {"old", "new"} <= set(scores[key]), key
        assert 0 <= scores[key]["old"] <= 1 and 0 <= scores[key]["new"] <= 1
    # the size of EXP_ARCH's file against resnet18's; the timings (they swing with the machine's
    # load) are no metrics: asked for by name, ONNX Runtime and eager side by side
    assert not [name for name in diff if name.startswith("metrics/speed/")], list(diff)
    exported = diff["metrics/export.json"]
    assert exported["onnx_mb"]["new"] < exported["onnx_mb"]["old"] / 3  # the smaller net's file
    timed = json.loads(dvc(repo, "metrics", "diff", "--all", "--json", "--targets",
                           "metrics/speed", "-R").stdout)
    assert set(timed) == {"metrics/speed/train.json", "metrics/speed/eval.json",
                          "metrics/speed/export.json"}
    for key in ["onnxruntime.batch1_ms_per_image", "pytorch_eager.batch1_ms_per_image",
                "onnxruntime.batch1_ms_q3", "onnxruntime.batch_images_per_s"]:
        assert {"old", "new"} <= set(timed["metrics/speed/export.json"][key]), key

    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    assert EXP_ARCH in json.dumps(shown)


def test_plots_show_renders_curves_confusion_and_images(repo, tmp_path):
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    assert {"Loss", "Accuracy", "plots/eval/confusion.csv", "plots/eval/confusion.png",
            "plots/eval/learning_curves.png", "plots/eval/mistakes.png", "Precision-recall",
            "Person-ROC", "Reliability", "plots/eval/alarm.png"} <= set(plots)
    pr = plots["Precision-recall"][0]["content"]["data"]["values"]
    assert {v["filename"].split("/")[-1] for v in pr} == {"person.csv", "animal.csv",
                                                         "object.csv"}
    reliability = plots["Reliability"][0]["content"]["data"]["values"]
    assert {v["filename"].split("/")[-1] for v in reliability} == {"before.csv", "after.csv"}
    for curve in ["Loss", "Accuracy"]:
        values = plots[curve][0]["content"]["data"]["values"]
        assert {v["filename"].split("/")[0] for v in values} == {"train", "val"}
        assert len(values) == 2 * TINY["train"]["epochs"]
    confusion = plots["plots/eval/confusion.csv"][0]["content"]["data"]["values"]
    n_test = json.loads((repo.path / "metrics/eval.json").read_text())["test_crops"]
    assert len(confusion) == n_test
    html_dir = tmp_path / "html"
    dvc(repo, "plots", "show", "-o", str(html_dir))
    assert (html_dir / "index.html").stat().st_size > 1000


def _queue_states(repo) -> list[str]:
    """The Status column of `dvc queue status`, one entry per queued experiment."""
    lines = dvc(repo, "queue", "status").stdout.splitlines()
    states = ["Queued", "Running", "Success", "Failed"]
    return [w for line in lines for w in line.split() if w in states]


def test_queued_sweep_runs_in_parallel_workers(repo):
    """docs/scale-out.md, "Parallel experiments": `dvc exp run --queue -S key=a,b` queues two
    experiments, `dvc queue start -j 2` runs them in two workers to Success, and `dvc exp show`
    lists each one's params and metrics. The docs sweep archs; this sweeps SWEEP_KEY, as the
    queue, its workers and exp show do not depend on the key, and then each experiment reruns
    only accept, its last stage, from the committed baseline's cached outputs (which its log
    shows: an experiment restores the cached outputs of the stages it skips, train and calibrate
    among them)."""
    _commit_all(repo, "the sweep's baseline")
    arch = _arch(repo)
    values = ",".join(map(str, SWEEP_VALUES))
    dvc(repo, "exp", "run", "--queue", "-S", f"{SWEEP_KEY}={values}")
    assert _queue_states(repo).count("Queued") == 2
    try:
        dvc(repo, "queue", "start", "-j", "2")
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while time.monotonic() < deadline:
            states = _queue_states(repo)
            if states.count("Success") + states.count("Failed") == 2:
                break
            time.sleep(3)
        assert states.count("Success") == 2, f"queue after {QUEUE_TIMEOUT_S} s: {states}"
    finally:
        dvc(repo, "queue", "stop", "--kill", check=False)
    shown = dvc(repo, "exp", "show", "--json").stdout
    section, key = SWEEP_KEY.split(".")
    runs = {e["data"]["params"]["params.yaml"]["data"][section][key]: e
            for e in _experiments(json.loads(shown))}
    assert set(runs) >= set(SWEEP_VALUES), sorted(runs)
    for value in SWEEP_VALUES:
        metrics = runs[value]["data"]["metrics"]
        assert metrics["metrics/eval.json"]["data"]["arch"] == arch, value
        assert "macro_f1" in metrics["metrics/eval.json"]["data"], value
        assert "no site set given" in metrics["metrics/accept.json"]["data"]["note"], value
        log = dvc(repo, "queue", "logs", runs[value]["name"]).stdout
        assert "Running stage 'accept'" in log, log
        for skipped in ("train", "calibrate", "evaluate", "conditions", "export"):
            assert f"Running stage '{skipped}'" not in log, (skipped, log)


def _experiments(shown: list) -> list[dict]:
    """Every experiment `dvc exp show --json` lists under any baseline commit."""
    return [exp for rev in shown for run in (rev.get("experiments") or [])
            for exp in run.get("revs", [])]
