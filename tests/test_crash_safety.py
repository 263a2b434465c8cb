"""Crash safety (issue #3): SIGKILL extract_crops, split or train at any moment; every output is
then complete or absent, DVC never takes a partial one as up to date, and the next `dvc repro`
completes with the same bytes as an uninterrupted run.

What each stage writes, and how (audit):

  extract_crops  data/crops/ (crops, manifest.csv)   atomic_dir: built in data/.crops.tmp-<pid>,
                                                     renamed into place when complete
                 metrics/crops.json                  write_json: temp file + os.replace
  split          data/split/ (copies, manifest.csv)  atomic_dir, as above
                 metrics/split.json                  write_json
  train          data/model/best.pt                  saved (itself via a temp file) inside
                                                     data/.model.tmp-<pid>; the directory is
                                                     renamed into place after the last epoch
                 plots/train/ (DVCLive)              IN PLACE: one .tsv per metric, appended
                                                     each epoch, and metrics.json rewritten
                 metrics/speed/train.json,           write_json, after data/model is in place
                 metrics/train.json                  (timings, then scores)
                 data/train_resume/<key>.pt          atomic_file per epoch; no DVC out, so DVC
                                                     neither deletes it nor checks another
                                                     one out over it: a killed train resumes

A kill leaves, at worst, a temporary sibling (data/.crops.tmp-<pid>, metrics/.crops.json.tmp-
<pid>): never inside a non-persist output, and removed by the next run (atomic.clean_stale;
a kill inside write_json must not leave metrics/.<name>.json.tmp-<pid> in the git-tracked
metrics/ for good). A kill between the rename of
the output directory and the metrics file leaves a complete output with no metrics: the stage is
still not recorded, so it reruns. extract_crops' worker processes (crops.workers > 1) die with
the stage; one of them killed alone fails the stage at once (multiprocessing.Pool, used before
this test, waited for that worker's task forever: dvc repro hung).

Why DVCLive writing plots/train in place is safe: DVC writes an output's hash into dvc.lock (and
the run cache, and the cache) only after the stage's command exits 0, and before it runs a stage
it deletes the stage's non-persist outputs, `cache: false` ones included (DVCLive also clears
its directory when it starts without resume). So a killed train leaves at most a partial history
(even a half-written plots/train/metrics.json) that no dvc.lock entry matches (`dvc status`
reports train changed), that never reaches the cache, and that the rerun deletes first. Its only
reader, evaluate, is downstream of train, so `dvc repro` reruns train before it. (Running
`python -m stages.evaluate` by hand right after a killed train is the one way to read it; under
DVC data/model is then absent, so evaluate stops at the missing checkpoint.)

How the tests kill: every kill is a real SIGKILL of the real stage process, started by
`dvc repro -s <stage>` in a temporary git + DVC copy of the project on a tiny config. Either
from outside (the whole process group: dvc, the stage and its workers; or the stage's main
process alone, or one of its workers, as the OOM killer would), at a moment seen from outside
(the stage's process up for a moment, its first crop on disk, its first epoch line); or from
inside, at an exact point a poll cannot hit on data this small (half of a crop / copy /
checkpoint / metrics file written, right after the output directory is renamed into place): a
sitecustomize.py on PYTHONPATH, active only in the process `python -m <stage>` and only when
CRASH_AT says so, wraps one function to SIGKILL its own process there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from stages.common.config.paths import TRAIN_RESUME
from tests import paramfile
from tests.tiny_project import BY_STAGE, KEPT_BEFORE, pipeline_env

STAGES = list(BY_STAGE)  # download, extract_crops, split, train
KILLED = list(KEPT_BEFORE)  # extract_crops, split, train
DATA = {"extract_crops": "data/crops", "split": "data/split", "train": "data/model"}
METRICS = {"extract_crops": "metrics/crops.json", "split": "metrics/split.json",
           "train": "metrics/train.json"}
TIMING_KEYS = {"train_seconds", "train_images_per_s"}  # the only fields a rerun changes
WAIT_S = 120
HANG_S = 60  # a killed stage (or dvc) that has not ended by then hangs

SITECUSTOMIZE = r'''
"""Crash-test hook: SIGKILL this process at an exact point (tests/test_crash_safety.py)."""
import os
import sys

_SPEC = os.environ.get("CRASH_AT", "")  # "<stage module>|<point>|<arg>"


def _install():
    import signal
    stage, point, arg = _SPEC.split("|")
    if sys.orig_argv[1:3] != ["-m", stage]:
        return  # dvc itself, worker processes, anything else: untouched

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    count = [0]

    def nth():  # True on the arg-th call
        count[0] += 1
        return count[0] == int(arg)

    if point == "write_bytes":  # the arg-th crop: half its bytes on disk, then killed
        import pathlib
        orig = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if nth():
                with open(self, "wb") as f:
                    f.write(bytes(data)[:len(data) // 2])
                die()
            return orig(self, data)
        pathlib.Path.write_bytes = write_bytes
    elif point == "copyfile":  # the arg-th copied crop: half of it, then killed
        import shutil
        orig = shutil.copyfile

        def copyfile(src, dst, *a, **k):
            if nth():
                with open(src, "rb") as s, open(dst, "wb") as d:
                    data = s.read()
                    d.write(data[:len(data) // 2])
                die()
            return orig(src, dst, *a, **k)
        shutil.copyfile = copyfile
    elif point == "json":  # the first JSON file whose path contains arg: half of it, killed
        import json
        orig = json.dump

        def dump(obj, fp, *a, **k):
            if arg in str(getattr(fp, "name", "")):
                text = json.dumps(obj, *a, **k)
                fp.write(text[:len(text) // 2])
                fp.flush()
                die()
            return orig(obj, fp, *a, **k)
        json.dump = dump
    elif point == "torch_save":  # the first torch.save to a file whose name contains arg
        import io
        import torch
        orig = torch.save

        def save(obj, f, *a, **k):
            if arg in str(getattr(f, "name", f)):
                buf = io.BytesIO()
                orig(obj, buf, *a, **k)
                f.write(buf.getvalue()[:buf.tell() // 2])
                f.flush()
                die()
            return orig(obj, f, *a, **k)
        torch.save = save
    elif point == "renamed":  # right after a rename onto a path named arg
        import pathlib
        orig = pathlib.Path.rename

        def rename(self, target):
            out = orig(self, target)
            if pathlib.Path(target).name == arg:
                die()
            return out
        pathlib.Path.rename = rename
    else:
        raise SystemExit(f"sitecustomize: unknown CRASH_AT point {point!r}")


if _SPEC:
    _install()
'''


# ---------------------------------------------------------------------------------------------
# A temporary git + DVC copy of the project.

def _outputs(repo: Path) -> dict[str, dict[str, bool]]:
    """{stage: {path: persist}}: every out and metric dvc.yaml declares for the stage."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    found = {}
    for stage in KILLED:
        outs = {}
        for entry in stages[stage].get("outs", []) + stages[stage].get("metrics", []):
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            outs[path] = bool((opts or {}).get("persist", False))
        found[stage] = outs
    return found


def _env(hook_dir: Path) -> dict:
    """The reference build's environment (one torch thread: the checkpoint's bytes depend on the
    thread count, so every run here must use the same one), with the hook on PYTHONPATH."""
    env = pipeline_env()
    env["PYTHONPATH"] = str(hook_dir)  # sitecustomize: inert unless CRASH_AT is set
    env.pop("CRASH_AT", None)
    return env


def _run(path: Path, env: dict, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=path, env=env, capture_output=True, text=True,
                          timeout=WAIT_S)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n"
                    f"{proc.stderr}")
    return proc


def _dvc(path: Path, env: dict, *args, check=True) -> subprocess.CompletedProcess:
    return _run(path, env, sys.executable, "-m", "dvc", *args, check=check)


def _digest(path: Path) -> dict[str, str] | None:
    """{relative file: md5} of a file or a directory tree (dot files included); None if absent."""
    if path.is_file():
        return {"": hashlib.md5(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return None
    return {str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}


def _snapshot(repo: Path, outputs: dict[str, bool]) -> dict:
    """The stage's outputs in comparable form (metrics without their timing fields)."""
    return {out: _json(repo / out) if out.endswith(".json") else _digest(repo / out)
            for out in outputs}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def ref(tiny_pipeline_to_train, tmp_path_factory):
    """One uninterrupted run, stage by stage, with a copy of the repo kept before each of
    extract_crops, split and train (where that stage is about to run for the first time):
    conftest's, which test_interrupted_experiment continues to the end in place (its later
    stages write none of these stages' outputs, so the bytes expected are the same either way,
    and train is recorded either way). Each test here works on a copy."""
    base = tmp_path_factory.mktemp("crash")
    hook_dir = base / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    repo = tiny_pipeline_to_train.repo
    outputs = _outputs(repo)
    expected = {stage: _snapshot(repo, outputs[stage]) for stage in KILLED}
    assert expected["train"]["data/model"], "the reference run wrote no checkpoint"
    return SimpleNamespace(base=base, env=_env(hook_dir), repo=repo,
                           before=tiny_pipeline_to_train.before, expected=expected, outputs=outputs)


# ---------------------------------------------------------------------------------------------
# Starting, watching and killing a stage.

def _stage_process(dvc_proc: subprocess.Popen, stage: str) -> psutil.Process | None:
    """The `python -m stages.<stage>` process under dvc: not its shell, and not a worker
    forked from it (a forked worker has the same command line, and it as parent)."""
    try:
        children = psutil.Process(dvc_proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    found = {}
    for child in children:
        try:
            cmd, ppid = child.cmdline(), child.ppid()
        except psutil.Error:
            continue
        if any(a == "-m" and b == f"stages.{stage}" for a, b in zip(cmd, cmd[1:])):
            found[child.pid] = (child, ppid)
    mains = [child for child, ppid in found.values() if ppid not in found]
    return mains[0] if mains else None


def _workers(main: psutil.Process) -> list[psutil.Process]:
    """The stage's worker processes: its leaf descendants (forked from it, or from a
    forkserver), not multiprocessing's resource tracker."""
    try:
        descendants = main.children(recursive=True)
    except psutil.Error:
        return []
    leaves = []
    for p in descendants:  # one that ends while we look is skipped, not the whole list lost
        try:
            if not p.children() and "resource_tracker" not in " ".join(p.cmdline()):
                leaves.append(p)
        except psutil.Error:
            continue
    return leaves


def _wait_for(what: str, cond, proc: subprocess.Popen, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the stage ended (exit {proc.returncode}) before {what}")
        time.sleep(0.005)
    pytest.fail(f"no {what} within {timeout} s")


def _wait_group_gone(pgid: int, timeout: float = 30) -> None:
    """Wait until no live process of the group is left (orphaned workers included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        if not alive:
            return
        time.sleep(0.05)
    for pid in alive:  # do not leave them behind; then say so
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pytest.fail(f"processes {alive} of the killed stage still alive after {timeout} s")


def _first_crop(repo: Path) -> bool:
    return any(any(tmp.glob("*/*.jpg")) for tmp in (repo / "data").glob(".crops.tmp-*"))


def _kill_from_outside(repo: Path, env: dict, stage: str, when: str, whom: str,
                       args: tuple = ()) -> str:
    """`dvc repro -s <stage>` in its own process group; SIGKILL at ``when``: 'started+<s>'
    (the stage's process up for s seconds), 'first_crop' (a crop in the temporary directory),
    'epoch1' (the first epoch line printed). ``whom``: 'group' (dvc, the stage and its
    workers), 'stage' (the stage's main process alone; dvc sees it fail) or 'worker' (one of
    the stage's worker processes: the stage must fail, not wait for it forever)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args, "-s", stage],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = []
    try:
        target = _wait_for(f"stages.{stage} process", lambda: _stage_process(proc, stage), proc)
        if when.startswith("started+"):
            time.sleep(float(when.split("+")[1]))
        elif when == "first_crop":
            _wait_for("crop in data/.crops.tmp-*", lambda: _first_crop(repo), proc)
            if whom == "worker":
                workers = _wait_for("2 worker processes",
                                    lambda: (lambda w: w if len(w) >= 2 else None)(
                                        _workers(target)), proc)
        elif when == "epoch1":
            for line in proc.stdout:
                out.append(line)
                if line.startswith("[01] train:"):
                    break
        else:
            raise ValueError(when)
        assert target.is_running() and proc.poll() is None, \
            "the stage ended before the kill:\n" + "".join(out)
        if whom == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        elif whom == "stage":
            target.send_signal(signal.SIGKILL)
        else:
            workers[0].send_signal(signal.SIGKILL)  # the ones seen alive above
        try:  # until dvc ends and every process holding its output pipe is gone
            out.append(proc.communicate(timeout=HANG_S)[0] or "")
        except subprocess.TimeoutExpired:
            pytest.fail(f"dvc repro -s {stage} or a process of the stage still running "
                        f"{HANG_S} s after the kill")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_group_gone(proc.pid)
    log = "".join(out)
    if whom == "group":
        assert proc.returncode == -signal.SIGKILL, log
    else:
        assert proc.returncode != 0 and "failed to reproduce" in log, log
    return log


def _kill_from_inside(repo: Path, env: dict, stage: str, point: str, arg: str) -> str:
    """`dvc repro -s <stage>` with the sitecustomize hook armed: the stage kills itself."""
    proc = _dvc(repo, {**env, "CRASH_AT": f"stages.{stage}|{point}|{arg}"},
                "repro", "-s", stage, check=False)
    log = proc.stdout + proc.stderr
    # DVC runs the command through $SHELL: bash execs it and DVC sees the signal (-9); a shell
    # that stays as the parent (dash, /bin/sh when SHELL is unset) reports 128 + 9.
    killed = "exited with -9" in log or "exited with 137" in log
    assert proc.returncode != 0 and killed, \
        f"the stage was not SIGKILLed at {point} {arg}:\n{log}"
    return log


# ---------------------------------------------------------------------------------------------
# What must hold after a kill, and after the next `dvc repro`.

def _leftovers(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for top in ["data", "metrics", "plots"]
                  for p in (repo / top).rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def _check_after_kill(ref, repo: Path, stage: str) -> dict:
    """Every output absent or complete; DVC does not call the stage up to date."""
    outputs = ref.outputs[stage]
    got = _snapshot(repo, outputs)
    for out, persist in outputs.items():
        if persist:  # kept for the rerun (a resume state): whole files only, or none
            for pt in (repo / out).rglob("*.pt"):
                if ".tmp-" not in pt.name:
                    assert zipfile.ZipFile(pt).testzip() is None, f"{pt}: damaged"
            continue
        inside = [p for p in _leftovers(repo) if p.startswith(out + "/")]
        assert not inside, f"temporaries inside {out}: {inside}"
        if got[out] is None or out == "plots/train":  # absent; or DVCLive's in-place history
            continue
        assert got[out] == ref.expected[stage][out], f"{out}: present but not complete"
    if stage == "train":  # its resume state, no DVC out: whole files only, or none
        for pt in (repo / TRAIN_RESUME).glob("*.pt"):
            assert zipfile.ZipFile(pt).testzip() is None, f"{pt}: damaged"
    status = json.loads(_dvc(repo, ref.env, "status", "--json").stdout or "{}")
    assert stage in status, f"dvc status calls the killed {stage} up to date: {status}"
    return got


def _check_rerun(ref, repo: Path, stage: str) -> None:
    """The next `dvc repro` completes and gives the reference bytes; nothing left over."""
    target = "split" if stage == "extract_crops" else stage  # and split on top of the crops
    _dvc(repo, ref.env, "repro", target)
    for done in STAGES[STAGES.index(stage):STAGES.index(target) + 1]:
        got = _snapshot(repo, ref.outputs[done])
        for out in ref.outputs[done]:
            assert got[out] == ref.expected[done][out], f"{out}: the rerun differs"
    assert json.loads(_dvc(repo, ref.env, "status", "--json", target).stdout or "{}") == {}
    assert _leftovers(repo) == []


# ---------------------------------------------------------------------------------------------
# The kills.

OUTSIDE = [  # stage, when, whom
    pytest.param("extract_crops", "started+0.2", "group", id="extract_crops-starting-group"),
    pytest.param("extract_crops", "first_crop", "stage", id="extract_crops-first-crop-stage"),
    pytest.param("extract_crops", "first_crop", "worker", id="extract_crops-first-crop-worker"),
    pytest.param("split", "started+0.3", "group", id="split-running-group"),
    pytest.param("train", "epoch1", "stage", id="train-after-epoch1-stage"),
]


@pytest.mark.parametrize("stage, when, whom", OUTSIDE)
def test_sigkill_from_outside(ref, tmp_path, stage, when, whom):
    repo = _copy(ref.before[stage], tmp_path / "repo")
    if when == "first_crop":
        # 2 worker processes (crops.workers is no DVC param: the crops do not depend on it).
        # The main one killed alone: they die with it, never touching data/crops. A worker
        # killed alone: the stage fails at once, saying why.
        paramfile.write(repo, paramfile.merge(yaml.safe_load((repo / "params.yaml").read_text()),
                                              {"crops": {"workers": 2}}))
    log = _kill_from_outside(repo, ref.env, stage, when, whom)
    if whom == "worker":
        assert "a crop worker process died" in log, log
    _check_after_kill(ref, repo, stage)
    _check_rerun(ref, repo, stage)


INSIDE = [  # stage, point, arg
    pytest.param("extract_crops", "write_bytes", "20", id="extract_crops-half-a-crop"),
    pytest.param("extract_crops", "json", "crops.json", id="extract_crops-half-its-metrics"),
    pytest.param("split", "copyfile", "30", id="split-half-a-copy"),
    pytest.param("split", "renamed", "split", id="split-output-renamed-no-metrics"),
    pytest.param("train", "torch_save", "best.pt", id="train-half-a-checkpoint"),
    pytest.param("train", "json", "plots/train/metrics.json",
                 id="train-half-dvclive-summary-in-place"),
    pytest.param("train", "renamed", "model", id="train-model-renamed-no-metrics"),
    pytest.param("train", "torch_save", "train_resume", id="train-half-a-resume-state"),
]


@pytest.mark.parametrize("stage, point, arg", INSIDE)
def test_sigkill_at_an_exact_point(ref, tmp_path, stage, point, arg):
    repo = _copy(ref.before[stage], tmp_path / "repo")
    _kill_from_inside(repo, ref.env, stage, point, arg)
    got = _check_after_kill(ref, repo, stage)
    if point == "renamed" or arg == Path(METRICS[stage]).name:
        # the output directory is complete and in place, its metrics are not
        assert got[DATA[stage]] == ref.expected[stage][DATA[stage]]
        assert got[METRICS[stage]] is None
    else:  # killed before the rename: the output directory is not there at all
        assert got[DATA[stage]] is None, "a half-written output is in place"
    if point == "json" and stage != "train":  # the half-written file is a temporary sibling
        assert any(p.startswith(f"metrics/.{arg}.tmp-") for p in _leftovers(repo))
    if arg == "plots/train/metrics.json":  # DVCLive's own summary, half-written in place
        with pytest.raises(json.JSONDecodeError):
            json.loads((repo / arg).read_text())
    _check_rerun(ref, repo, stage)


def test_sigkill_train_rerun_over_recorded_outputs(ref, tmp_path):
    """`dvc repro -f` of a recorded train, killed with dvc after its first epoch line: DVC
    deleted the old outputs before running it, so none is left half old, half new, and none
    counts as current; the next dvc repro drops the dead dvc's read/write locks itself."""
    repo = _copy(ref.repo, tmp_path / "repo")
    _kill_from_outside(repo, ref.env, "train", "epoch1", "group", args=("-f",))
    got = _check_after_kill(ref, repo, "train")
    assert got["data/model"] is None and got["metrics/train.json"] is None
    _check_rerun(ref, repo, "train")
