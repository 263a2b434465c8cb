"""The suite runs the same on any user's machine: every git and DVC command it starts (the tests'
own and the stages' subprocesses, which inherit this environment) reads no global or system
configuration, so a user's remotes, cache settings or git hooks cannot change what a test sees.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings

# Set at import, before any test or fixture starts a process.
_HOME = Path(tempfile.mkdtemp(prefix="pcls-test-config-"))
(_HOME / "gitconfig").write_text("")
ISOLATED_ENV = {
    "DVC_GLOBAL_CONFIG_DIR": str(_HOME / "dvc-global"),
    "DVC_SYSTEM_CONFIG_DIR": str(_HOME / "dvc-system"),
    "DVC_NO_ANALYTICS": "1",
    "GIT_CONFIG_GLOBAL": str(_HOME / "gitconfig"),
    "GIT_CONFIG_NOSYSTEM": "1",
}
os.environ.update(ISOLATED_ENV)


# Every Hypothesis test draws the same examples on every run and machine (derandomize, seeded from
# the test's name): a failure in CI reproduces here. Settings a test gives itself inherit this.
settings.register_profile("derandomized", derandomize=True)
settings.load_profile("derandomized")


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(_HOME, ignore_errors=True)
