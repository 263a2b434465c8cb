"""A library that binds its log handler to sys.stderr when first imported, inside a test that
captures output, must not break a later test's log line, whatever the order (tests/conftest.py);
DVC did: `pytest tests/test_report.py tests/test_internals.py` failed with "I/O operation on
closed file"."""
from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = '''
import io
import logging
import sys


def test_imports_a_library(capsys):
    logging.getLogger("lib").addHandler(logging.StreamHandler(sys.stderr))  # as DVC at import
    logging.getLogger("lib").warning("first")
    assert capsys.readouterr().err == "first\\n"


def test_logs_later(capsys):
    logging.getLogger("lib").warning("second")
    assert capsys.readouterr().err == "second\\n"
'''


def test_a_handler_bound_to_a_tests_capture_follows_the_next_tests(pytester):
    pytester.makepyfile(test_order=TESTS)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)
    # Control: without the conftest the second test's line is lost on the closed stream.
    (pytester.path / "conftest.py").unlink()
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_logs_later*"])


def test_a_handler_left_on_a_closed_stream_fails_the_test_that_left_it(pytester):
    pytester.makepyfile(test_closed='''
import io
import logging


def test_leaves_one():
    stream = io.StringIO()
    logging.getLogger("lib2").addHandler(logging.StreamHandler(stream))
    stream.close()


def test_after():
    pass
''')
    pytester.makeconftest(CONFTEST.read_text())
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_one*",
                                 "*log handlers left on a closed stream by this test: ['lib2: *"])
