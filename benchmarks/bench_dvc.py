"""DVC incremental runs: `dvc exp run -S model.arch=resnet50` after a full `dvc repro`.

    python -m benchmarks.bench_dvc            # with the project's venv: .venv/bin/python -m ...

Copies the working tree (tracked and untracked, not ignored files) into a temporary git
repository, times a full ``dvc repro --force`` and then ``dvc exp run -S model.arch=resnet50``,
and lists which stages each one ran and which it skipped.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    # The stages' commands say `python` and `dvc`: this interpreter's environment comes first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, out.stdout + out.stderr


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def stages(log: str) -> tuple[list[str], list[str]]:
    ran = re.findall(r"Running stage '([^']+)'", log)
    skipped = re.findall(r"Stage '([^']+)' didn't change, skipping", log)
    return ran, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    try:
        copy_tree(tmp)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
                     "commit", "-qm", "bench"]):
            sh(cmd, tmp)
        full_s, full_log = sh(["dvc", "repro", "--force"], tmp)
        exp_s, exp_log = sh(["dvc", "exp", "run", "-S", "model.arch=resnet50"], tmp)
        again_s, again_log = sh(["dvc", "repro"], tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp)
    for name, seconds, log in [("dvc repro --force (full)", full_s, full_log),
                               ("dvc exp run -S model.arch=resnet50", exp_s, exp_log),
                               ("dvc repro (nothing changed)", again_s, again_log)]:
        ran, skipped = stages(log)
        print(f"  {name:36s} {seconds:7.1f} s   ran: {', '.join(ran) or '-'}; "
              f"skipped: {', '.join(skipped) or '-'}")
    print(f"exp run / full repro: {exp_s / full_s:.2f} of the time")


if __name__ == "__main__":
    main()
