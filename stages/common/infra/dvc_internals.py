"""The one place the project touches DVC's and DVCLive's internals (tests/test_layout.py).

DVC's public Python API (``dvc.api``) and DVCLive's (``dvclive.Live``) lack two things:

- **Resolving a revision name** as ``dvc plots diff`` does (a git commit, branch or tag, or a DVC
  experiment name), so that ``python -m stages.report --rev`` can refuse a bad one in one line
  before minutes of rendering: DVC does it in ``dvc.scm`` (``SCM``, ``resolve_rev``).
- **Reading one revision's metrics with each file's parse error kept**: ``dvc metrics diff
  --json`` drops a file it cannot parse (it would read as missing); ``dvc.repo.Repo``
  (``Repo.metrics.show``) keeps the error beside the file.
- **Reading a YAML text as DVC reads params.yaml** (``dvc.utils.serialize.parse_yaml``), so
  the tests can hold params.load's values (ruamel.yaml, YAML 1.2) to DVC's own.
- **Opening DVCLive in a git repository with no commit yet**: DVCLive 3.49 asks git for HEAD
  before it checks whether there is one, and fails ("Empty git repo"). The train stage saves no
  experiment, so it opens DVCLive as DVCLive runs where DVC is not installed (no repository),
  which writes the same files: ``dvclive.live.get_dvc_repo`` answers None for that moment.

:data:`DVC` and :data:`DVCLIVE` declare what is used; each function refuses in one line
(``internals.require``) on a version other than the pinned one, or one that lacks a name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from stages.common.infra.internals import Library, Private, require

T = TypeVar("T")
ADAPTER = "stages/common/infra/dvc_internals.py"
DVC = Library(
    dist="dvc", pinned="3.67.1", adapter=ADAPTER,
    needs=(
        Private("dvc.scm", "SCM", params=("root_dir", "search_parent_directories", "no_scm")),
        Private("dvc.scm", "resolve_rev", params=("scm", "rev")),
        Private("dvc.scm", "SCMError", subclass_of=Exception),
        Private("dvc.scm", "RevError", subclass_of=Exception),
        Private("dvc.repo", "Repo", subclass_of=object),
        Private("dvc.utils.serialize", "parse_yaml", params=("text", "path", "typ")),
    ),
    instead="run without --rev for the workspace alone")
DVCLIVE = Library(
    dist="dvclive", pinned="3.49.1", adapter=ADAPTER,
    needs=(
        Private("dvclive.live", "get_dvc_repo", params=()),
        # what DVCLive raises in a repository without a commit (scmrepo comes with DVC)
        Private("scmrepo.exceptions", "SCMError", subclass_of=Exception),
    ))


class NoRepository(Exception):
    """The folder is not in a git repository (DVC's message)."""


class UnknownRevision(Exception):
    """DVC cannot resolve the revision name (DVC's message)."""


def revision_resolver(repo: Path) -> Callable[[str], str]:
    """A function that resolves a revision name in ``repo`` to a commit, as DVC does: a git
    commit, branch or tag, or an experiment name. Raises :class:`NoRepository` here, and
    :class:`UnknownRevision` from the function."""
    require(DVC)
    from dvc.scm import SCM, RevError, SCMError, resolve_rev

    try:
        scm = SCM(str(repo))
    except SCMError as exc:
        raise NoRepository(str(exc)) from None

    def resolve(rev: str) -> str:
        try:
            sha = resolve_rev(scm, rev)
        except RevError as exc:
            raise UnknownRevision(str(exc)) from None
        # git also resolves trees and blobs (HEAD^{tree}, HEAD:params.yaml); DVC then answers
        # with its help text, so such a name is refused here.
        try:
            scm.resolve_commit(sha)
        except Exception:  # pygit2 or dulwich, each its own way (AttributeError, KeyError...)
            raise UnknownRevision(f"'{rev}' names a git object that is not a commit "
                                  f"({sha[:12]})") from None
        return sha

    return resolve


def metrics_of(repo: Path, rev: str, targets: list[str] | None = None) -> dict:
    """DVC's ``metrics show`` result for one revision (``workspace`` included): ``{"data":
    {file: {"data": ...} or {"error": exception}}}``, or ``{"error": exception}``. ``targets``:
    these files (repository-relative) instead of dvc.yaml's metrics, as `--targets` reads them."""
    require(DVC)
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.metrics.show(targets=targets, revs=[rev],
                                     hide_workspace=False).get(rev) or {}


def open_live(make: Callable[[], T]) -> T:
    """``make()``, which opens a ``dvclive.Live`` that saves no experiment; in a git repository
    with no commit yet, opened without DVC's repository (the module doc says why)."""
    require(DVCLIVE)
    import dvclive.live
    from scmrepo.exceptions import SCMError

    try:
        return make()
    except SCMError:
        original = dvclive.live.get_dvc_repo
        dvclive.live.get_dvc_repo = lambda: None
        try:
            return make()
        finally:
            dvclive.live.get_dvc_repo = original


def params_as_dvc_reads(text: str):
    """The values of a params.yaml text exactly as DVC reads them to track params."""
    require(DVC, "parse_yaml")
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(text, "params.yaml", typ="safe")
