"""An offline report: `python -m stages.report [--rev REV ...] [--out dvc_plots/report.html]`.

Not a DVC stage: a command to run after `dvc repro` (or `dvc exp apply`). `dvc plots show` writes a
page that loads Vega from a CDN, so on an air-gapped machine it stays blank. This renders the same
plots (the Vega-Lite specs DVC fills from dvc.yaml's ``plots:``) to SVG here, with vl-convert's
bundled Vega, and writes ONE self-contained HTML file: every plot and PNG inlined as a data: URI,
the metrics as tables, no script, and a Content-Security-Policy that forbids any fetch. Copy the
file anywhere and open it in any browser. Where metrics/eval.json has an ``operating_point``
(evaluate's chosen alarm threshold), the page states what it gives, in the words evaluate and the
model card use (stages.common.alarm.statement).

Without ``--rev`` the page shows the workspace (`dvc plots show`, `dvc metrics show`). Each
``--rev`` (a git commit, branch or tag, a DVC experiment name, or ``workspace``) is a revision to
compare, as `dvc plots diff` and `dvc metrics diff` do: every plot overlays the revisions, image
plots stand side by side labelled by revision, and each metrics file is one table with a column
per revision and, for numbers, the change from the first one: the scores (dvc.yaml's metrics)
first, then the timings of metrics/speed/, which `dvc metrics diff` leaves out. What a revision
lacks (a plot or metrics file, a plot dvc.yaml did not define yet) is shown as missing and named
on stderr; the rest still renders. A revision DVC cannot resolve, or an empty ``--rev ''``, is
refused in one line, exit code 2, before anything is written.

A plot that cannot be rendered, a metrics file DVC cannot parse ("unreadable: <why>", never
"missing") and an operating point whose figures are not finite numbers in range or contradict
one another (NaN, Infinity, a string, a bound of 5, a ``target_met`` its bound denies: "invalid")
are named in the page and on stderr, the rest still comes out; the exit code
is then 1. ``--out -`` writes the page to stdout (closed, or its reader gone: one line, exit code
2); an ``--out`` that is a symbolic link or not a regular file (``/dev/stdout`` is a link) is
refused in one line, exit code 2, because the atomic rename would replace the link or the device
node itself.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.common.alarm.statement import (InconsistentFigures, problem, statement,
                                           threshold_text)
from stages.common.config.paths import EVAL_METRICS, MODEL_TABLE, SPEED_FILES
from stages.common.infra import dvc_internals
from stages.common.infra.atomic import atomic_file, refuse_odd_destination
from stages.common.infra.errors import ArgumentParser, ParamError, StageError, main_guard
from stages.common.infra.jsonfile import JsonProblem, parse_json, read_json

DEFAULT_OUT = Path("dvc_plots/report.html")  # beside dvc plots show's index.html, git-ignored
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".svg": "image/svg+xml", ".gif": "image/gif"}
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure.plot { margin: 0; padding: .5em; border: 1px solid #ddd; }
figure.plot img { display: block; max-width: 100%; }
figcaption { font-size: .85em; color: #555; margin-top: .3em; }
table { border-collapse: collapse; font-size: .85em; margin-bottom: 1em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.error { color: #a00; border: 1px solid #a00; padding: .5em; }
section.group { margin-bottom: 1.5em; } section.group h3 { font-size: 1em; margin: .3em 0; }
.missing { color: #777; font-style: italic; }
div.missing { border: 1px dashed #bbb; padding: 2em 1em; align-self: center; }
td.change { color: #555; }
"""


def dvc_json(*args: str, cwd: Path, revs: tuple[str, ...] | list[str] = ()) -> dict:
    """`dvc ARGS --json [-- REVS]`'s output; the revisions after `--`, never read as options."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args, "--json",
                           *(["--", *revs] if revs else [])], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StageError(f"`dvc {' '.join([*args, *revs])}` failed in {cwd} ({last}); run it "
                         "from the repository root after `dvc repro`")
    try:
        return parse_json(proc.stdout or "{}")
    except JsonProblem as exc:  # e.g. a revision's metrics file holding a 400-digit integer
        raise StageError(f"`dvc {' '.join([*args, *revs])}` in {cwd} answered what cannot be "
                         f"used ({exc}); fix the metrics files of those revisions") from None


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def render_plot(entry: dict) -> tuple[str, str]:
    """(data: URI, kind) of one plot of `dvc plots show --json`: Vega-Lite -> SVG, image inlined."""
    if entry["type"] == "vega":
        import vl_convert

        return data_uri("image/svg+xml", vl_convert.vegalite_to_svg(entry["content"]).encode()), \
            "svg"
    if entry["type"] == "image":
        path = Path(entry["url"])
        mime = IMAGE_TYPES.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"unsupported image type {path.suffix}")
        return data_uri(mime, path.read_bytes()), path.suffix.lower().lstrip(".")
    raise ValueError(f"unsupported plot type {entry['type']!r}")


def figure_html(plot_id: str, entry: dict, label: str, failed: list[str],
                rev: str | None = None) -> str:
    """One plot as a <figure>, or a named error box when it cannot be rendered."""
    try:
        uri, kind = render_plot(entry)
    except Exception as exc:  # one bad plot must not cost the others
        failed.append(f"{plot_id}: {type(exc).__name__}: {exc}")
        return (f'<div class="error">{html.escape(plot_id)}: could not be rendered '
                f'({html.escape(str(exc))})</div>')
    rev_attr = f' data-rev="{html.escape(rev)}"' if rev is not None else ""
    return (f'<figure class="plot" data-plot="{html.escape(plot_id)}"{rev_attr}>'
            f'<img src="{uri}" alt="{html.escape(label)}">'
            f'<figcaption>{html.escape(label)} ({kind})</figcaption></figure>')


def entry_revisions(entry: dict) -> set[str]:
    """The revisions whose data one plot of `dvc plots diff --json` holds."""
    if entry["type"] == "image":
        return set(entry.get("revisions", []))
    values = (entry.get("content") or {}).get("data", {}).get("values", [])
    return {row.get("rev") for row in values if isinstance(row, dict)}


def compared_plots_html(shown: dict, revs: list[str], failed: list[str],
                        missing: list[str]) -> list[str]:
    """A section per plot of `dvc plots diff`: the overlay (Vega) or one image per revision
    side by side, and what each revision lacks (its file, or the plot's definition)."""
    lacking: dict[str, dict] = {}  # plot id -> {(revision, file): None}, from DVC's errors
    for error in shown.get("errors", []) or []:
        if error.get("type") == "FileNotFoundError":  # absent in that revision: expected
            lacking.setdefault(error["name"], {})[(error["rev"], error["source"])] = None
        else:
            failed.append(f"dvc: {error}")
    data = shown.get("data", {})
    sections = []
    for plot_id in [*data, *(p for p in lacking if p not in data)]:
        entries = data.get(plot_id, [])
        present = set().union(*map(entry_revisions, entries)) if entries else set()
        notes = list(lacking.get(plot_id, {}))
        notes += [(rev, "no data for this plot") for rev in revs  # not in its dvc.yaml yet?
                  if rev not in present and rev not in {r for r, _ in notes}]
        notes.sort(key=lambda note: revs.index(note[0]) if note[0] in revs else len(revs))
        missing += [f"{plot_id}: {what} in {rev}" for rev, what in notes]
        cells = []
        if entries and all(e["type"] == "image" for e in entries):
            by_rev = {r: e for e in entries for r in e.get("revisions", [])}
            for rev in revs:  # side by side, in the order given, a gap where one lacks it
                cells.append(figure_html(plot_id, by_rev[rev], rev, failed, rev) if rev in by_rev
                             else f'<div class="missing" data-rev="{html.escape(rev)}">'
                                  f'{html.escape(rev)}: missing</div>')
        else:
            cells = [figure_html(plot_id, e, ", ".join(e.get("revisions", [])), failed,
                                 " ".join(e.get("revisions", []))) for e in entries]
        note_html = "".join(f'<p class="missing">missing in {html.escape(rev)}: '
                            f'{html.escape(what)}</p>' for rev, what in notes)
        sections.append(f'<section class="group" data-plot="{html.escape(plot_id)}">'
                        f'<h3>{html.escape(plot_id)}</h3><div class="plots">{"".join(cells)}'
                        f'</div>{note_html}</section>')
    return sections


def flatten(tree, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) pairs of nested metrics, as `dvc metrics diff` names them."""
    if isinstance(tree, dict):
        return [row for key in sorted(tree) for row in flatten(tree[key], f"{prefix}{key}.")]
    return [(prefix.rstrip("."), tree)]


def as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def operating_point_problem(point: dict) -> str | None:
    """Why ``point`` (eval.json's ``operating_point`` in one revision) cannot be put into words:
    a figure that is no finite number in range, or figures that contradict one another (a
    ``target_met`` its own bound denies); None when it can. A figure it lacks is no problem (an
    older eval.json)."""
    return problem(point)


def operating_point_sentence(point: dict) -> str | None:
    """What eval.json's ``operating_point`` means at the perimeter: the alarm's statement
    (stages.common.alarm.statement, as evaluate and the model card say it), after the threshold
    as it can be copied into ``--person-threshold``; None when it holds nothing to state."""
    try:
        said = statement(point)
    except InconsistentFigures:
        return None
    if not said or "threshold" not in point:
        return None
    shown = threshold_text(point["threshold"], point.get("threshold_log_odds"))
    return f"At threshold {shown}: " + " ".join(said)


def operating_point_html(points: dict[str, dict]) -> str:
    """The sentence per revision ({revision label: operating_point}); empty when none has one."""
    lines = [(label, f"invalid operating point: {problem}" if (problem := operating_point_problem(
        point)) else operating_point_sentence(point)) for label, point in points.items()]
    items = "".join(f"<li>{f'<b>{html.escape(label)}</b>: ' if len(points) > 1 else ''}"
                    f"{html.escape(sentence)}</li>" for label, sentence in lines if sentence)
    return f'<h2>Operating point</h2>\n<ul class="operating-point">{items}</ul>\n' if items else ""


def unreadable_reason(exc: BaseException) -> str:
    """Why DVC could not read a metrics file: the parser's own words (line, column) where it
    gave them; DVC's message names the file by a path inside its own temporary tree."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def revision_metrics(repo: Path, rev: str) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """({metrics file: {dotted key: value}}, {metrics file: why it is unreadable}) of one
    revision (``workspace``: the files as they are now); a file it lacks is in neither.

    DVC's Python API, one revision a call: `dvc metrics diff --json` drops a file it cannot
    parse (it would read as missing), and two names of one commit would be merged into one.
    dvc.yaml's metrics (the scores), then the timings (paths.SPEED_FILES: outs, not metrics)."""
    shown = dvc_internals.metrics_of(repo, rev)
    if "error" in shown:
        raise StageError(f"--rev {rev}: DVC cannot read its metrics "
                         f"({unreadable_reason(shown['error'])}); check dvc.yaml in {rev}")
    timed = dvc_internals.metrics_of(repo, rev, [path.as_posix() for path in SPEED_FILES])
    values: dict[str, dict[str, object]] = {}
    unreadable: dict[str, str] = {}
    for name, content in {**(shown.get("data") or {}), **(timed.get("data") or {})}.items():
        if isinstance(content.get("error"), (FileNotFoundError, KeyError)):
            continue  # not in this revision (KeyError: DVC's index of outputs lacks it)
        if "error" in content:
            unreadable[name] = unreadable_reason(content["error"])
        else:
            values[name] = dict(flatten(content.get("data") or {}))
    return values, unreadable


def compare_metrics(repo: Path, revs: list[str]) -> tuple[dict[str, dict[str, dict]],
                                                          dict[str, dict[str, str]]]:
    """({metrics file: {dotted key: {revision: value}}}, {metrics file: {revision: why it is
    unreadable}}); a value a revision lacks is absent."""
    table: dict[str, dict[str, dict]] = {}
    unreadable: dict[str, dict[str, str]] = {}
    for rev in revs:
        values, broken = revision_metrics(repo, rev)
        for name, keys in values.items():
            for key, value in keys.items():
                table.setdefault(name, {}).setdefault(key, {})[rev] = value
        for name, reason in broken.items():
            unreadable.setdefault(name, {})[rev] = reason
    return table, unreadable


def change(old, new) -> str:
    """new - old when both are numbers (not flags), else empty."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new)):
        return ""
    return "0" if new == old else f"{new - old:+.6g}"  # 6 digits: no float noise like 0.0499999


TIMINGS = {path.as_posix() for path in SPEED_FILES}


def scores_first(name: str) -> tuple[bool, str]:
    """Sort key of the metrics files: the scores, then the timings (metrics/speed/), which swing
    with the machine's load and must not lead a comparison; by name within each."""
    return name in TIMINGS, name


def compared_metrics_html(table: dict, unreadable: dict, revs: list[str], missing: list[str],
                          failed: list[str]) -> str:
    """One table per metrics file: a column per revision, a change column after each but the
    first, "missing" where a revision lacks the value or the whole file, "unreadable: <why>"
    where DVC could not parse the file in that revision (named in ``failed`` too)."""
    header = "".join(f"<th>{html.escape(r)}</th>" + ("<th>change</th>" if i else "")
                     for i, r in enumerate(revs))
    parts = []
    for name in sorted(set(table) | set(unreadable), key=scores_first):
        rows, broken = table.get(name, {}), unreadable.get(name, {})
        absent = [rev for rev in revs if rev not in broken
                  and not any(rev in values for values in rows.values())]
        missing += [f"{name} in {rev}" for rev in absent]
        failed += [f"{name} in {rev}: unreadable: {why}" for rev, why in broken.items()]
        body = ""
        for key in sorted(rows):
            values = rows[key]
            cells = ""
            for i, rev in enumerate(revs):
                value = values.get(rev)
                cells += (f'<td class="missing">unreadable: {html.escape(broken[rev])}</td>'
                          if rev in broken else '<td class="missing">missing</td>'
                          if rev not in values else f"<td>{html.escape(as_text(value))}</td>")
                if i:
                    cells += f'<td class="change">{change(values.get(revs[0]), value)}</td>'
            body += f"<tr><td>{html.escape(key)}</td>{cells}</tr>"
        note = (f'<p class="missing">missing in {html.escape(", ".join(absent))}</p>'
                if absent else "")
        note += "".join(f'<p class="error">unreadable in {html.escape(rev)}: '
                        f'{html.escape(why)}</p>' for rev, why in broken.items())
        parts.append(f"<h3>{html.escape(name)}</h3>{note}<table><tr><th>metric</th>{header}</tr>"
                     f"{body}</table>")
    return "\n".join(parts) or "<p>no metrics in these revisions</p>"


def pareto(points: list[dict]) -> list[dict]:
    """The points no other beats on both axes (faster and at least as high a recall bound),
    fastest first: the only rows worth choosing between."""
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p["ms"], -p["recall"])):
        if not front or p["recall"] > front[-1]["recall"]:
            front.append(p)
    return front


def model_table_html(repo: Path, failed: list[str]) -> str:
    """The table that picks a model (benchmarks/model_table.py's JSON, when present): the
    person-recall lower bound against ms/image at batch 1 with the cores decoding video (quiet
    where the table has no loaded column), each row a point, the Pareto front drawn; rows
    without a trained checkpoint have no recall and are counted, not drawn."""
    path = repo / MODEL_TABLE
    try:
        table = read_json(path)
        machine = table["machine"]
        when = "loaded" if table.get("load_cores") else "quiet"
        points = [{"ms": r[when]["batch1_ms_per_image"],
                   "recall": r["recall"]["person_recall_lower_95"],
                   "row": f"{r['arch']} {r['format']}"
                          + ("" if r["threads"] is None else f" {r['threads']} threads")}
                  for r in table["rows"] if r.get("recall")]
        untrained = sum(1 for r in table["rows"] if not r.get("recall"))
        where = f"{machine['cpu']}, {machine['cores']} cores, {machine['date']}"
    except FileNotFoundError:
        return ""
    except (OSError, JsonProblem, KeyError, TypeError) as exc:
        failed.append(f"{MODEL_TABLE}: unreadable ({type(exc).__name__}: {exc})")
        return (f'<h2>The table that picks a model</h2><p class="error">{MODEL_TABLE}: '
                f"unreadable ({html.escape(str(exc))})</p>")
    condition = (f"with {table['load_cores']} cores decoding video" if when == "loaded"
                 else "quiet")
    caption = (f"Person-recall 95 % lower bound (test, at the operating point) against batch-1 "
               f"ms/image {condition} ({where}); the line is the Pareto front. {untrained} rows "
               f"without a trained checkpoint are not drawn: their speed is in {MODEL_TABLE}.")
    if not points:
        return (f"<h2>The table that picks a model</h2><p>No row of {MODEL_TABLE} has a "
                f"trained checkpoint, so there is no recall to plot ({where}).</p>")
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "width": 420, "height": 280,
            "layer": [
                {"data": {"values": points}, "mark": {"type": "point", "filled": True},
                 "encoding": {"x": {"field": "ms", "type": "quantitative", "scale": {"type": "log"},
                                    "title": f"ms/image, batch 1, {condition} (log)"},
                              "y": {"field": "recall", "type": "quantitative",
                                    "scale": {"domain": [0, 1]},
                                    "title": "person-recall lower bound"},
                              "color": {"field": "row", "type": "nominal"}}},
                {"data": {"values": pareto(points)}, "mark": {"type": "line", "color": "#555"},
                 "encoding": {"x": {"field": "ms", "type": "quantitative"},
                              "y": {"field": "recall", "type": "quantitative"}}}]}
    figure = figure_html("model_table", {"type": "vega", "content": spec},
                         "recall lower bound vs ms/image", failed)
    return (f'<h2>The table that picks a model</h2><p>{html.escape(caption)}</p>'
            f'<div class="plots">{figure}</div>')


def build(repo: Path, revs: list[str] | None = None) -> tuple[str, list[str], list[str]]:
    """The report's HTML, what failed (a plot, an unreadable metrics file, an invalid operating
    point), and what the revisions lack."""
    failed: list[str] = []
    missing: list[str] = []
    figures = []
    with tempfile.TemporaryDirectory() as tmp:  # dvc copies image plots there
        if revs:
            # With one revision `dvc plots diff` adds the workspace; named twice it shows one.
            shown = dvc_json("plots", "diff", "-o", tmp, cwd=repo,
                             revs=revs if len(revs) > 1 else revs * 2)
            figures = compared_plots_html(shown, revs, failed, missing)
        else:
            shown = dvc_json("plots", "show", "-o", tmp, cwd=repo)
            for error in shown.get("errors", []) or []:
                failed.append(f"dvc: {error}")
            for plot_id, entries in shown.get("data", {}).items():
                for entry in entries:
                    label = plot_id if len(entries) == 1 else \
                        f"{plot_id} ({', '.join(entry.get('revisions', []))})"
                    figures.append(figure_html(plot_id, entry, label, failed))
    columns = revs or ["workspace"]
    table, unreadable = compare_metrics(repo, columns)
    metrics_part = compared_metrics_html(table, unreadable, columns, missing, failed)
    prefix = "operating_point."
    points = {rev: {key[len(prefix):]: values[rev]
                    for key, values in table.get(EVAL_METRICS.as_posix(), {}).items()
                    if key.startswith(prefix) and rev in values} for rev in columns}
    failed += [f"{EVAL_METRICS} in {rev}: invalid operating point: {problem}"
               for rev, point in points.items() if (problem := operating_point_problem(point))]
    if revs:
        what = (f", the revisions overlaid ({len(figures)} plots); metrics side by side, each "
                f"change against {html.escape(revs[0])}. Revisions: {html.escape(', '.join(revs))}")
    else:
        what = f" ({len(figures)} plots); metrics of the workspace"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Pipeline report: {html.escape(repo.resolve().name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Pipeline report: {html.escape(repo.resolve().name)}</h1>
<p>Plots of dvc.yaml rendered offline{what}. This file
needs no network.</p>
{operating_point_html(points)}<h2>Plots</h2>
<div class="plots">
{chr(10).join(figures)}
</div>
{model_table_html(repo, failed)}
<h2>Metrics</h2>
{metrics_part}
</body></html>
"""
    return page, failed, missing


def check_revisions(repo: Path, revs: list[str]) -> None:
    """Stop in one line, before any rendering, at a revision DVC would not find. DVC's own
    resolution: git commits, branches and tags, and experiment names."""
    try:
        resolve = dvc_internals.revision_resolver(repo)
    except dvc_internals.NoRepository as exc:
        raise StageError(f"--rev needs a git repository ({exc}); run without --rev for the "
                         "workspace alone") from None
    for rev in revs:
        if rev == "workspace":  # DVC's name for the files as they are now
            continue
        try:
            resolve(rev)
        except dvc_internals.UnknownRevision as exc:
            raise StageError(f"--rev {rev}: {exc}; give a git commit, branch or tag, an "
                             "experiment name (`dvc exp list`) or workspace") from None


STDOUT_CLOSED = "--out -: standard output is closed; give a file with --out"


def write_stdout(page: str) -> None:
    """The page on stdout; a closed or broken one (the reader gone: `| head`) is one line."""
    try:
        sys.stdout.write(page)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError) as exc:  # ValueError: closed by Python itself
        # Python flushes stdout again at exit; point it at nothing so that says nothing more.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StageError(f"--out -: cannot write the page to standard output ({why}); give a "
                         "file with --out") from None


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"HTML file to write, - for stdout (default {DEFAULT_OUT})")
    parser.add_argument("--repo", type=Path, default=Path("."),
                        help="DVC project root (default: here)")
    parser.add_argument("--rev", action="append", default=[], metavar="REV",
                        help="a revision to compare: git commit, branch or tag, DVC experiment "
                             "name, or workspace; repeat it (default: the workspace alone)")
    args = parser.parse_args(argv)
    revs = list(dict.fromkeys(args.rev))  # a revision named twice is one column
    if any(not rev.strip() for rev in revs):
        raise ParamError("--rev: an empty revision name would be a column without a name; give "
                         "a git commit, branch or tag, an experiment name or workspace")
    if not (args.repo / "dvc.yaml").is_file():
        raise StageError(f"{args.repo / 'dvc.yaml'}: not found; run from the repository root")
    to_stdout = str(args.out) == "-"
    if to_stdout and sys.stdout is None:  # Python's stdout when the shell closed it (>&-)
        raise StageError(STDOUT_CLOSED)
    if not to_stdout:
        refuse_odd_destination(args.out)  # before the minutes of rendering, not after
    if revs:
        check_revisions(args.repo, revs)
    page, failed, missing = build(args.repo, revs)
    if to_stdout:
        write_stdout(page)
    else:
        with atomic_file(args.out) as f:
            f.write(page)
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    of_revs = f" of {len(revs)} revisions" if revs else ""
    print(f"{'stdout' if to_stdout else args.out}: {page.count('<figure class=')} plots{of_revs}, "
          f"{len(page) // 1024} KiB, self-contained (no network needed)",
          file=sys.stderr if to_stdout else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
