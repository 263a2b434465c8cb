"""What an adapter that reaches into a library's private names needs from the installed library.

Where a library has no public way to do what the pipeline needs (FiftyOne's download has no
timeout or resume; DVCLive cannot be opened in a git repository without a commit; DVC resolves
experiment names only in ``dvc.scm``), one adapter module per library touches its internals:
stages/download/fiftyone_internals.py and stages/common/infra/dvc_internals.py, nowhere else
(tests/test_layout.py). Each declares a :class:`Library`: the version its code was written
against (the pin in requirements.txt, tests/test_internals.py) and every private name it uses,
with the parameters it calls it with. :func:`require` refuses, in one line, to run an adapter on
another version or on a library that lacks one of those names, instead of a traceback, a hang or a
silent change of behaviour deep in a download or a training run.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass

from stages.common.infra.errors import StageError


@dataclass(frozen=True)
class Private:
    """One name an adapter uses: ``module.name``, and what it must be."""
    module: str
    name: str
    params: tuple[str, ...] | None = None   # a callable taking exactly these, in this order
    is_a: type | None = None                # an instance of this (a dict, a module)
    subclass_of: type | None = None         # a class derived from this (an exception)

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Library:
    """A distribution, the version an adapter was written against, and what it uses of it."""
    dist: str
    pinned: str
    adapter: str                 # the adapter's file, named in the refusal
    needs: tuple[Private, ...]
    instead: str = ""            # what else a user can do when the adapter refuses, if anything


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fault(need: Private) -> str | None:
    """Why the installed library does not hold ``need`` as declared, or None if it does."""
    try:
        obj = getattr(importlib.import_module(need.module), need.name)
    except ImportError as exc:
        return f"cannot import {need.module} ({exc})"
    except AttributeError:
        return "missing"
    if need.params is not None:
        if not callable(obj):
            return f"not callable ({type(obj).__name__})"
        try:
            got = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return "callable, but with no signature to check"
        if got != need.params:
            return f"takes ({', '.join(got)}), not ({', '.join(need.params)})"
    if need.is_a is not None and not isinstance(obj, need.is_a):
        return f"a {type(obj).__name__}, not a {need.is_a.__name__}"
    if need.subclass_of is not None and not (isinstance(obj, type)
                                             and issubclass(obj, need.subclass_of)):
        return f"not a subclass of {need.subclass_of.__name__}"
    return None


def problems(lib: Library, *names: str) -> list[str]:
    """One sentence per difference between the installed library and what ``lib`` declares (or
    its ``names`` alone), each naming the version the adapter was written for; empty when the
    adapter can run."""
    version = installed(lib.dist)
    if version != lib.pinned:
        return [f"{lib.dist} {version or '(not installed)'} is installed, but {lib.adapter} was "
                f"written against {lib.dist} {lib.pinned}'s internals"]
    found = ((need, fault(need)) for need in lib.needs if not names or need.name in names)
    return [f"{lib.dist} {lib.pinned}: {need.where} {why} ({lib.adapter} needs it)"
            for need, why in found if why is not None]


def require(lib: Library, *names: str) -> None:
    """Stop in one line unless the installed library is the one ``lib``'s adapter was written
    for and holds what it declares (or its ``names`` alone: what one function of the adapter
    uses, checked while another has swapped something of the library for a stand-in)."""
    found = problems(lib, *names)
    if found:
        raise StageError(f"{'; '.join(found)}; install the pinned version "
                         f"(pip install {lib.dist}=={lib.pinned}, as requirements.txt says)"
                         + (f", or {lib.instead}" if lib.instead else ""))
