"""An offline report: `python -m stages.report [--out dvc_plots/report.html]`.

Not a DVC stage: a command to run after `dvc repro` (or `dvc exp apply`). `dvc plots show` writes a
page that loads Vega from a CDN, so on an air-gapped machine it stays blank. This renders the same
plots (the Vega-Lite specs DVC fills from dvc.yaml's ``plots:``) to SVG here, with vl-convert's
bundled Vega, and writes ONE self-contained HTML file: every plot and PNG inlined as a data: URI,
the metrics as tables, no script, and a Content-Security-Policy that forbids any fetch. Copy the
file anywhere and open it in any browser. Where metrics/eval.json has an ``operating_point``
(evaluate's chosen alarm threshold), the page says in one sentence what it means for an operator.

A plot that cannot be rendered is named in the page and on stderr, the others still come out;
the exit code is then 1. ``--out -`` writes the page to stdout; an ``--out`` that is a symbolic
link or not a regular file (``/dev/stdout`` is a link) is refused in one line, exit code 2,
because the atomic rename would replace the link or the device node itself.
"""
from __future__ import annotations

import base64
import html
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.common.atomic import atomic_file, refuse_odd_destination
from stages.common.errors import ArgumentParser, StageError, main_guard

DEFAULT_OUT = Path("dvc_plots/report.html")  # beside dvc plots show's index.html, git-ignored
EVAL_METRICS = "metrics/eval.json"  # evaluate's, where the operating point is
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
"""


def dvc_json(*args: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StageError(f"`dvc {' '.join(args)}` failed in {cwd} ({last}); run it from the "
                         "repository root after `dvc repro`")
    return json.loads(proc.stdout or "{}")


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


def flatten(tree, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, dict):
        return [row for key in sorted(tree) for row in flatten(tree[key], f"{prefix}{key}.")]
    return [(prefix.rstrip("."), json.dumps(tree) if not isinstance(tree, str) else tree)]


def metrics_html(metrics: dict) -> str:
    parts = []
    for rev, content in metrics.items():
        for name, value in sorted((content.get("data") or {}).items()):
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                           for k, v in flatten(value.get("data", {})))
            parts.append(f"<h3>{html.escape(name)} <small>({html.escape(rev)})</small></h3>"
                         f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    return "\n".join(parts) or "<p>no metrics</p>"


def operating_point_sentence(point: dict) -> str | None:
    """What eval.json's ``operating_point`` means at the perimeter, in words an operator uses;
    None when it lacks the figures the sentence needs (an older eval.json)."""
    try:
        threshold = float(point["threshold"])
        people = float(point["test_person_recall"]) * 100
        others = float(point["false_alarms_per_1000"])
    except (KeyError, TypeError, ValueError):
        return None
    people, others = int(people + 0.5), int(others + 0.5)  # half up: 7.5 false alarms reads 8
    return (f"At this threshold ({threshold:g}), {people} of 100 people "
            f"{'raises' if people == 1 else 'raise'} an alarm; {others} of 1,000 animals and "
            f"objects {'does' if others == 1 else 'do'} too.")


def operating_point_html(points: dict[str, dict]) -> str:
    """The sentence per revision ({revision label: operating_point}); empty when none has one."""
    lines = [(label, operating_point_sentence(point)) for label, point in points.items()]
    items = "".join(f"<li>{f'<b>{html.escape(label)}</b>: ' if len(points) > 1 else ''}"
                    f"{html.escape(sentence)}</li>" for label, sentence in lines if sentence)
    return f'<h2>Operating point</h2>\n<ul class="operating-point">{items}</ul>\n' if items else ""


def build(repo: Path) -> tuple[str, list[str]]:
    """The report's HTML and the list of plots that failed to render."""
    failed: list[str] = []
    figures = []
    with tempfile.TemporaryDirectory() as tmp:  # dvc copies image plots there
        shown = dvc_json("plots", "show", "-o", tmp, cwd=repo)
        for error in shown.get("errors", []) or []:
            failed.append(f"dvc: {error}")
        for plot_id, entries in shown.get("data", {}).items():
            for entry in entries:
                label = plot_id if len(entries) == 1 else f"{plot_id} ({', '.join(entry.get('revisions', []))})"
                try:
                    uri, kind = render_plot(entry)
                except Exception as exc:  # one bad plot must not cost the others
                    failed.append(f"{plot_id}: {type(exc).__name__}: {exc}")
                    figures.append(f'<div class="error">{html.escape(plot_id)}: could not be '
                                   f'rendered ({html.escape(str(exc))})</div>')
                    continue
                figures.append(f'<figure class="plot" data-plot="{html.escape(plot_id)}">'
                               f'<img src="{uri}" alt="{html.escape(label)}">'
                               f'<figcaption>{html.escape(label)} ({kind})</figcaption></figure>')
    metrics = dvc_json("metrics", "show", cwd=repo)
    points = {}
    for content in metrics.values():  # one revision: the workspace
        evaluation = ((content.get("data") or {}).get(EVAL_METRICS) or {}).get("data") or {}
        if isinstance(evaluation.get("operating_point"), dict):
            points["workspace"] = evaluation["operating_point"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Pipeline report: {html.escape(repo.resolve().name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Pipeline report: {html.escape(repo.resolve().name)}</h1>
<p>Plots of dvc.yaml rendered offline ({len(figures)} plots); metrics of the workspace. This file
needs no network.</p>
{operating_point_html(points)}<h2>Plots</h2>
<div class="plots">
{chr(10).join(figures)}
</div>
<h2>Metrics</h2>
{metrics_html(metrics)}
</body></html>
"""
    return page, failed


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"HTML file to write, - for stdout (default {DEFAULT_OUT})")
    parser.add_argument("--repo", type=Path, default=Path("."),
                        help="DVC project root (default: here)")
    args = parser.parse_args(argv)
    if not (args.repo / "dvc.yaml").is_file():
        raise StageError(f"{args.repo / 'dvc.yaml'}: not found; run from the repository root")
    to_stdout = str(args.out) == "-"
    if not to_stdout:
        refuse_odd_destination(args.out)  # before the minutes of rendering, not after
    page, failed = build(args.repo)
    if to_stdout:
        sys.stdout.write(page)
    else:
        with atomic_file(args.out) as f:
            f.write(page)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    print(f"{'stdout' if to_stdout else args.out}: {page.count('<figure class=')} plots, "
          f"{len(page) // 1024} KiB, self-contained (no network needed)",
          file=sys.stderr if to_stdout else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
