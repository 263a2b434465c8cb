"""The suite runs the same on any user's machine: every git and DVC command it starts (the tests'
own and the stages' subprocesses, which inherit this environment) reads no global or system
configuration, so a user's remotes, cache settings or git hooks cannot change what a test sees.

And in any order: DVC, DVCLive, FiftyOne and torch bind their log handlers to sys.stdout /
sys.stderr as they are when first imported. Imported inside a test that captures output (capsys,
capfd), they would keep that test's capture stream, closed once it ends, and a later test's log
line would fail on it ("I/O operation on closed file"). Each handler bound to the test's stream
is re-pointed to whatever sys.stdout / sys.stderr is at each write (what the library sees in its
own process), and a handler still left on a closed stream fails the test that left it, naming it
(tests/test_log_handlers.py).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest
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

class CurrentStream:
    """sys.stdout or sys.stderr as it is at each write, for a log handler to hold."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str):
        return getattr(getattr(sys, self.name), attr)

    def __repr__(self) -> str:
        return f"<sys.{self.name} at each write>"


def stream_handlers():
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # a PlaceHolder has none
            # logging.lastResort's stream is a property that reads sys.stderr already
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    getattr(type(handler), "stream", None), property):
                yield logger, handler


def follow_current_streams() -> None:
    """Re-points each log handler that holds this moment's sys.stdout / sys.stderr."""
    for _, handler in stream_handlers():
        for name in ("stdout", "stderr"):
            if handler.stream is getattr(sys, name):
                handler.stream = CurrentStream(name)  # not setStream: it would flush the old one


# trylast: inside the capture plugin's wrapper, so sys.stdout is still the test's capture stream.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    finally:
        follow_current_streams()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    finally:
        follow_current_streams()


# tryfirst: outside the capture plugin's wrapper, after the test's capture streams are closed.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    left = []
    for logger, handler in stream_handlers():
        if getattr(handler.stream, "closed", False):
            left.append(f"{logger.name or 'root'}: {handler!r}")
            handler.stream = CurrentStream("stderr")  # so that only this test fails for it
    if left:
        raise RuntimeError(f"log handlers left on a closed stream by this test: {left}; see "
                           "tests/conftest.py")
    return result


@pytest.fixture
def main_in_process(capsys):
    """``in_process(main)``: a runner of ``python -m stages.<command> ARGS`` for that command's
    ``main``, in this process: exit code, stdout and stderr."""
    from types import SimpleNamespace

    def in_process(main):
        def run(*args):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code
            out = capsys.readouterr()
            return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
        return run
    return in_process


@pytest.fixture
def predict_in_process(main_in_process):
    """``python -m stages.predict ARGS`` run in this process: exit code, stdout and stderr."""
    from stages import predict

    return main_in_process(predict.main)


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """Run from an empty folder: the project's own data/calibration must not answer here (a
    module that needs it: ``pytestmark = pytest.mark.usefixtures("elsewhere")``)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def tiny_pipeline_to_train(tmp_path_factory):
    """tests/tiny_project.py's build_tiny_pipeline, once per session: test_crash_safety and
    test_interrupted_experiment start from the same tiny run (each test copies what it changes).
    Once a test asked for ``tiny_pipeline``, its repo holds the whole run."""
    from tests.tiny_project import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_to_train):
    """The same repo after the whole pipeline ran and was committed (finish_tiny_pipeline)."""
    from tests.tiny_project import finish_tiny_pipeline

    return finish_tiny_pipeline(tiny_pipeline_to_train)


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(_HOME, ignore_errors=True)
