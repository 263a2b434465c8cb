"""Check params.yaml before DVC runs anything: ``python -m stages.check`` (``make check``).

    python -m stages.check [PARAMS_FILE]

Every stage checks the whole file when it starts (stages/common/config/params.py), but under
DVC that is too late or never: `dvc repro` runs only the stages whose deps or params changed,
so a stray key (``train.lrr``) beside an unchanged section passes as "up to date"; a renamed key
stops DVC itself ("Parameters 'train.lr' are missing"); and a bad value (``resnet51``) stops
train only after DVC deleted train's outputs. This runs the same check on the file alone, with
no DVC: ``params.yaml: ok`` and exit 0, or the first problem in one line and exit 2.
"""
from __future__ import annotations

import sys

from stages.common.config import params
from stages.common.infra.errors import ArgumentParser, main_guard


@main_guard
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.check", description=__doc__.splitlines()[0])
    parser.add_argument("params_file", nargs="?", default=str(params.PARAMS_FILE),
                        help="the params file to check (default: %(default)s)")
    args = parser.parse_args(argv)
    params.load(args.params_file)
    print(f"{args.params_file}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
