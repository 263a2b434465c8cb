"""The offline report: every plot of dvc.yaml in one self-contained HTML file, checked in headless
Chromium with the network off (proxy to a dead port, every host unresolvable).

The plot files are written here (by the project's own figure code where it has one), so the test
needs no pipeline run. Chromium is Debian's `chromium` package; CI installs it (.ci/run). Without
it the browser tests are skipped with the reason, so `make test` still runs for a user who lacks
it; under CI (CI=true) they fail instead, so CI cannot go green while checking less.
"""
import base64
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.evaluate import figures

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "chromium not installed (Debian: apt-get install chromium; CI's .ci/run installs it)"
OFFLINE_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1400,1000",
]
# Per figure: decoded, laid out with a size, not hidden, and not one flat colour.
CHECK = """
new Promise(resolve => {
  const check = () => resolve([...document.querySelectorAll('figure.plot')].map(f => {
    const img = f.querySelector('img');
    const box = img.getBoundingClientRect(), css = getComputedStyle(img);
    const loaded = img.complete && img.naturalWidth > 0;
    let colours = 0;
    if (loaded) {
      const c = document.createElement('canvas');
      c.width = Math.min(img.naturalWidth, 300); c.height = Math.min(img.naturalHeight, 300);
      const g = c.getContext('2d'); g.drawImage(img, 0, 0, c.width, c.height);
      const px = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
      for (let i = 0; i < px.length && seen.size < 20; i += 4) seen.add(px[i] * 65536 + px[i + 1] * 256 + px[i + 2]);
      colours = seen.size;
    }
    return {plot: f.dataset.plot, loaded, width: box.width, height: box.height, colours,
            shown: css.display !== 'none' && css.visibility === 'visible' && +css.opacity > 0};
  }));
  if (document.readyState === 'complete') check(); else addEventListener('load', check);
})
"""


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg", ".gif"}
CLASSES = ["animal", "object", "person"]


def plot_definitions(dvc_yaml: Path) -> list[tuple[str, dict]]:
    """(id, properties) of each entry of a dvc.yaml's top-level ``plots:``."""
    out = []
    for item in yaml.safe_load(dvc_yaml.read_text()).get("plots") or []:
        if isinstance(item, str):
            out.append((item, {}))
        else:
            [(plot_id, props)] = item.items()
            out.append((plot_id, props or {}))
    return out


def plot_file_columns(dvc_yaml: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """What dvc.yaml's plots read: {data file: {column: "number" | "category"}} and the images.

    A plot reads the files of its ``y`` mapping, or its own id when ``y`` is a field name; ``x``
    is a field name or a {file: field} mapping. Confusion templates plot categories."""
    columns: dict[str, dict[str, str]] = {}
    images: list[str] = []
    for plot_id, props in plot_definitions(dvc_yaml):
        y, x = props.get("y"), props.get("x")
        kind = "category" if "confusion" in str(props.get("template", "")) else "number"
        for file, y_fields in (y if isinstance(y, dict) else {plot_id: y}).items():
            if Path(file).suffix.lower() in IMAGE_SUFFIXES:
                images.append(file)
                continue
            fields = [x.get(file) if isinstance(x, dict) else x]
            fields += y_fields if isinstance(y_fields, list) else [y_fields or "value"]
            for field in filter(None, fields):
                columns.setdefault(file, {})[field] = kind
    return columns, images


def column_values(name: str, kind: str, index: int, shift: float) -> list:
    """Five plausible values: class pairs of a confusion matrix (more on the diagonal as
    ``shift`` grows), epochs for step-like fields, otherwise rising rates in [0, 1]."""
    if kind == "category":
        pairs = [(a, p) for a in CLASSES for p in CLASSES] * 2
        pairs += [(c, c) for c in CLASSES] * (5 + round(shift * 20))
        return [pair[index % 2] for pair in pairs]
    if name in ("step", "epoch"):
        return list(range(5))
    return [round(min(1.0, 0.1 + 0.2 * i + shift * (index + 1)), 4) for i in range(5)]


def write_data_file(path: Path, columns: dict[str, str], shift: float) -> None:
    table = {name: column_values(name, kind, i, shift)
             for i, (name, kind) in enumerate(columns.items())}
    rows = list(zip(*table.values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        path.write_text(sep.join(table) + "\n" + "".join(
            sep.join(map(str, row)) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps([dict(zip(table, row)) for row in rows]))
    else:
        raise AssertionError(f"{path}: write_plot_files has no writer for {path.suffix!r} plot "
                             "data (a folder of files?); add one")


def write_png(repo: Path, rel: str, shift: float) -> None:
    """The project's own figure code for the PNGs it draws, a small line chart for any other."""
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == "confusion.png":
        figures.confusion_png(np.array([[5, 1, 0], [2, 6, 0], [0, 1, 7]]), CLASSES, path, "test")
    elif path.name == "learning_curves.png":
        figures.learning_curves_png(figures.read_history(repo / "plots/train"), path, 2)
    elif path.name == "mistakes.png":
        crop = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        figures.mistakes_png([{"image": crop, "true": "person", "pred": "object",
                               "confidence": 0.9, "name": "x.jpg"}], path, "test", total=9)
    elif path.suffix == ".png":
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1, 2], [0.2, 0.5 + shift, 0.9], marker="o")
        ax.set_title(path.stem)
        fig.savefig(path, format="png", dpi=80, metadata=figures.PNG_META)
        plt.close(fig)
    else:
        raise AssertionError(f"{rel}: write_plot_files writes PNGs only; add a writer")


def write_plot_files(repo: Path, shift: float = 0.0) -> None:
    """Every file repo/dvc.yaml's plots read, with small plausible contents (``shift`` moves
    the numbers, for another revision). Derived from the plots section, so a new plot
    definition needs no edit here. Data files first: learning_curves.png reads the TSVs."""
    columns, images = plot_file_columns(repo / "dvc.yaml")
    for rel, cols in columns.items():
        write_data_file(repo / rel, cols, shift)
    for rel in images:
        write_png(repo, rel, shift)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A DVC project with this repo's dvc.yaml and every plot file, and its report."""
    repo = tmp_path_factory.mktemp("report") / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")  # dvc.yaml reads ${data.mirror}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    write_plot_files(repo)
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/eval.json").write_text(json.dumps({
        "accuracy": 0.9, "person_recall": 1.0,
        "operating_point": {"threshold": 0.1234, "test_person_recall": 0.9828,
                            "false_alarms_per_1000": 7.3, "test_persons": 58,
                            "test_persons_missed": 1}}))
    proc = subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(repo),
                           "--out", str(repo / "report.html")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    plot_ids = []
    for item in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]:
        plot_ids.append(item if isinstance(item, str) else next(iter(item)))
    return repo, plot_ids


def test_report_holds_every_plot_and_needs_no_network(project):
    repo, plot_ids = project
    page = (repo / "report.html").read_text()
    assert re.findall(r'data-plot="([^"]+)"', page) == plot_ids
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), [r[:40] for r in refs]
    assert "<script" not in page and "default-src 'none'" in page
    assert "person_recall" in page  # metrics tables
    assert "At threshold 0.1234: On test, 57 of 58 test persons raised the alarm." in page


def test_report_is_deterministic(project, tmp_path):
    repo, _ = project
    subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(repo), "--out",
                    str(tmp_path / "again.html")], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "again.html").read_bytes() == (repo / "report.html").read_bytes()


def require_chromium(path: str | None, env=os.environ) -> str:
    """The browser's path; without one a skip that says why, or under CI (CI=true, as CI services
    set it) a failure: a CI that lost its browser must not stay green checking less."""
    if path is None:
        if env.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{NO_CHROMIUM}; CI=true, so the browser test fails instead of skipping",
                        pytrace=False)
        pytest.skip(NO_CHROMIUM)
    return path


@pytest.fixture
def chromium() -> str:
    return require_chromium(CHROMIUM)


def test_a_missing_browser_skips_for_a_user_and_fails_under_ci():
    assert require_chromium("/usr/bin/chromium", {"CI": "true"}) == "/usr/bin/chromium"
    for env in ({}, {"CI": "false"}, {"CI": ""}):
        with pytest.raises(pytest.skip.Exception, match="chromium not installed"):
            require_chromium(None, env)
    for env in ({"CI": "true"}, {"CI": "1"}):
        with pytest.raises(pytest.fail.Exception, match="CI=true, so the browser test fails"):
            require_chromium(None, env)


def chromium_evaluate(urls: list[str], expression: str, requests: list | None = None) -> list:
    """Open each URL in headless Chromium (network off) and evaluate ``expression`` there;
    ``requests``, when given, gets the URL of every request each page made (its own included).

    Chrome DevTools Protocol over --remote-debugging-pipe (fds 3 and 4): no extra package.
    """
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_r} 4>&{from_w}', "chromium", CHROMIUM,
             *OFFLINE_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"], pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        reader = os.fdopen(from_r, "rb")
        writer = os.fdopen(to_w, "wb")
        buffer, counter = b"", [0]

        def receive() -> dict:
            nonlocal buffer
            while b"\0" not in buffer:
                chunk = os.read(reader.fileno(), 65536)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                buffer += chunk
            raw, buffer = buffer.split(b"\0", 1)
            return json.loads(raw)

        def send(method, params=None, session=None, until_event=None):
            counter[0] += 1
            msg = {"id": counter[0], "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            writer.write(json.dumps(msg).encode() + b"\0")
            writer.flush()
            result, seen_event = None, until_event is None
            while result is None or not seen_event:
                reply = receive()
                if reply.get("id") == counter[0]:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result = reply["result"]
                elif reply.get("method") == until_event and reply.get("sessionId") == session:
                    seen_event = True
                elif reply.get("method") == "Network.requestWillBeSent" and requests is not None:
                    requests.append(reply["params"]["request"]["url"])
            return result

        try:
            results = []
            for url in urls:
                target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
                session = send("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
                send("Page.enable", session=session)
                if requests is not None:
                    send("Network.enable", session=session)
                send("Page.navigate", {"url": url}, session, until_event="Page.loadEventFired")
                value = send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                  "returnByValue": True}, session)
                results.append(value["result"].get("value"))
                send("Target.closeTarget", {"targetId": target})
            send("Browser.close")
        finally:
            writer.close()
            reader.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return results


def test_every_plot_renders_in_offline_chromium(chromium, project, tmp_path):
    repo, plot_ids = project
    # Controls: a broken image must be caught, and a page that needs the network (DVC's own
    # `dvc plots show` page, Vega from a CDN) must come out blank in this browser.
    broken = tmp_path / "broken.html"
    broken.write_text('<figure class="plot" data-plot="bad"><img src="data:image/png;base64,'
                      'iVBORw0KGgo="></figure>')
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "dvc")],
                   cwd=repo, check=True, capture_output=True)
    dvc_page = (tmp_path / "dvc" / "index.html")
    assert "https://" in dvc_page.read_text()
    report, bad = chromium_evaluate([(repo / "report.html").as_uri(), broken.as_uri()], CHECK)
    [dvc_plots] = chromium_evaluate([dvc_page.as_uri()], "new Promise(r => setTimeout(() => "
                                    "r(document.querySelectorAll('svg, canvas').length), 1000))")
    assert [f["plot"] for f in report] == plot_ids
    for figure in report:
        assert figure["loaded"] and figure["shown"], figure
        assert figure["width"] > 100 and figure["height"] > 100, figure
        assert figure["colours"] > 2, figure  # not a blank rectangle
    assert bad == [{"plot": "bad", "loaded": False, "width": bad[0]["width"],
                    "height": bad[0]["height"], "colours": 0, "shown": True}]
    assert dvc_plots == 0  # the online page renders nothing here: the network really is off


def test_out_onto_a_symlink_is_refused_and_dash_writes_stdout(tmp_path, monkeypatch, capsys):
    """`--out /dev/stdout` (a link) must not replace the link (as root, a node of /dev): one
    line, exit code 2, before any rendering; `--out -` writes the page to stdout. The test's
    links live in tmp_path: the code before this check would replace a real /dev/stdout."""
    from stages import report

    monkeypatch.setattr(report, "build", lambda repo, revs: ("<html>page</html>\n", [], []))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    target = tmp_path / "elsewhere.html"
    target.write_text("keep")
    link = tmp_path / "report.html"
    link.symlink_to(target)
    stdout_like = tmp_path / "stdout"
    stdout_like.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    for out in (link, stdout_like):
        with pytest.raises(SystemExit) as exc:
            report.main(["--repo", str(tmp_path), "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: is a symbolic link")
    assert link.is_symlink() and target.read_text() == "keep" and stdout_like.is_symlink()
    assert report.main(["--repo", str(tmp_path), "--out", "-"]) == 0
    done = capsys.readouterr()
    assert done.out == "<html>page</html>\n" and done.err.startswith("stdout: 0 plots")


def test_operating_point_sentence():
    from stages.report import operating_point_html, operating_point_sentence

    point = {"threshold": 0.1234, "target_recall": 0.99, "test_person_recall": 0.9828,
             "test_person_precision": 0.95, "false_alarms_per_1000": 7.3, "test_persons": 58,
             "test_non_persons": 137, "test_persons_missed": 1, "test_false_alarms": 1}
    assert operating_point_sentence(point) == (
        "At threshold 0.1234: On test, 57 of 58 test persons raised the alarm, and 1 of 137 "
        "animals and objects did. A recall of 0.99 is a long-run rate, not a count per batch: "
        "at exactly 0.99, a batch of 100 new persons misses 2 or more about 26 % of the time.")
    assert operating_point_sentence({"threshold": 0.5}) is None  # an eval.json without them
    assert operating_point_sentence({**point, "threshold": None}) is None
    assert operating_point_html({"workspace": {"threshold": 0.5}}) == ""
    one = operating_point_html({"workspace": point})
    assert "57 of 58 test persons" in one and "<b>" not in one  # one revision: no label
    both = operating_point_html({"HEAD~1": {}, "<exp>": point})
    assert "<b>&lt;exp&gt;</b>: At threshold" in both and "HEAD~1" not in both


def test_the_report_states_what_a_constructed_point_gives_and_what_test_shows():
    """eval.json as evaluate writes it: the same statement as the card's, and a revision whose
    figures contradict (a target_met its bound denies) is named inconsistent in one line."""
    from stages.common.alarm.point import OperatingPoint
    from stages.common.alarm.statement import point_facts, tested_facts
    from stages.report import operating_point_html, operating_point_problem

    point = {"threshold": 0.62566, "threshold_log_odds": 0.5136426172098687,
             "target_recall": 0.99, "guarantee": "probability", "delta": 0.05,
             "fitted_on": "data/split/val",
             "val": {"persons": 29, "person_pictures": 18, "persons_needed": 299,
                     "resolved": False, "expected_recall": 0.9474,
                     "chance_recall_below_target": 0.8346}}
    test = {"persons": 58, "persons_missed": 0, "non_persons": 98, "false_alarms": 0,
            "person_recall": 1.0, "person_precision": 1.0, "false_alarms_per_1000": 0.0,
            "person_pictures": 39, "person_pictures_missed": 0, "non_person_pictures": 60,
            "false_alarm_pictures": 0}
    op = {**point_facts(OperatingPoint(temperature=1.0, **point)), **tested_facts(test, 0.99)}
    shown = html.unescape(operating_point_html({"workspace": op}))
    assert "At threshold 0.6256: Unresolved: data/split/val holds 29 persons in 18 pictures" \
        in shown
    assert "(expected recall 0.9474), and the chance that their recall falls below 0.99 is " \
           "0.8346. Caveat: val picked the training epoch" in shown
    assert "58 of 58 test persons (in 39 pictures) raised the alarm, and 0 of 98 animals and " \
           "objects did" in shown
    assert "not shown: 39 test pictures with persons can show at most 0.926 with 95 % " \
           "confidence; showing 0.99 needs 299 pictures with persons, none missed." in shown
    for wrong in ("of 100 people", "not met", "stricter", "0.6257"):
        assert wrong not in shown
    lie = {**op, "target_met": True}
    assert operating_point_problem(lie) == ("target_met True contradicts its lower bound 0.926 "
                                            "against the target 0.99")
    assert "invalid operating point: target_met True contradicts" in operating_point_html(
        {"w": lie})
    assert ("invalid operating point: test_person_recall_lower_95 5 is not a finite number from 0 "
            "to 1") in operating_point_html({"w": {**op, "test_person_recall_lower_95": 5}})


# Plots another branch is adding to dvc.yaml (precision-recall, ROC, reliability, a PNG): the
# comparison below adds those the project's dvc.yaml lacks to its copy, so write_plot_files is
# shown to cover new definitions without an edit.
EXTRA_PLOTS = [
    {"Precision-recall (test)": {"template": "linear", "x": "recall", "y": {
        f"plots/eval/pr/{c}.csv": "precision" for c in CLASSES}}},
    {"plots/eval/roc_person.csv": {"template": "linear", "x": "fpr", "y": "tpr"}},
    {"Reliability (test)": {"template": "linear", "x": "confidence", "y": {
        "plots/eval/reliability/before.csv": "accuracy",
        "plots/eval/reliability/after.csv": "accuracy"}}},
    "plots/eval/reliability.png",
]
REVS = ["HEAD~1", "HEAD", "tuned", "workspace"]  # two commits, a DVC experiment, the files
POINT = {"threshold": 0.1234, "target_recall": 0.99, "test_person_recall": 0.9828,
         "test_person_precision": 0.95, "false_alarms_per_1000": 7.3, "test_persons": 58,
         "test_non_persons": 137, "test_persons_missed": 1, "test_false_alarms": 1}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A git + DVC repo with this dvc.yaml's plots: a commit; a second with other numbers that
    adds EXTRA_PLOTS and lacks metrics/train.json and mistakes.png; an experiment on it (the
    workspace is the experiment); `stages.report --rev HEAD~1 --rev HEAD --rev tuned --rev
    workspace`. Returns the repo, the plots, the plot ids HEAD~1 lacks, the page, the process."""
    repo = tmp_path_factory.mktemp("history") / "repo"
    repo.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args):
        return subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    ids = {item if isinstance(item, str) else next(iter(item)) for item in plots}
    added = [p for p in EXTRA_PLOTS if (p if isinstance(p, str) else next(iter(p))) not in ids]
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (repo / "metrics").mkdir()
    for shift, evaluation in [(0.0, {"accuracy": 0.9, "arch": "resnet18", "person_recall": 0.95}),
                              (0.05, {"accuracy": 0.95, "arch": "resnet18", "person_recall": 0.97,
                                      "operating_point": POINT})]:
        # No stages: `dvc exp save` wants every stage's dependencies; the report reads plots
        # and metrics alone, and top-level metrics read as stage outputs' do.
        (repo / "dvc.yaml").write_text(yaml.safe_dump({
            "metrics": ["metrics/eval.json", "metrics/train.json"],
            "plots": plots + added if shift else plots}, sort_keys=False))
        write_plot_files(repo, shift)
        (repo / "metrics/eval.json").write_text(json.dumps(evaluation))
        if shift:
            (repo / "metrics/train.json").unlink()
            (repo / "plots/eval/mistakes.png").unlink()
        else:
            (repo / "metrics/train.json").write_text(json.dumps({"epochs": 12}))
        run("git", "add", "-A")
        run("git", "commit", "-qm", f"shift {shift}")
    (repo / "metrics/eval.json").write_text(json.dumps({
        "accuracy": 0.97, "arch": "resnet34", "person_recall": 0.99,
        "operating_point": {**POINT, "threshold": 0.05, "test_person_recall": 1.0,
                            "test_persons_missed": 0}}))
    write_plot_files(repo, 0.1)
    (repo / "plots/eval/mistakes.png").unlink()  # `exp save` would take it, untracked as it is
    run(sys.executable, "-m", "dvc", "exp", "save", "-q", "-n", "tuned")
    out = repo / "compare.html"
    proc = subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(repo),
                           *(a for rev in REVS for a in ("--rev", rev)), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    added_ids = [p if isinstance(p, str) else next(iter(p)) for p in added]
    return repo, plots + added, added_ids, out, proc


def metric_rows(page: str, name: str) -> dict[str, list[str]]:
    """The cells of the table of one metrics file: {metric: [cell, ...]}."""
    table = page.split(f"<h3>{name}</h3>", 1)[1].split("</table>", 1)[0]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in table.split("<tr>")[2:]]
    return {row[0]: row[1:] for row in rows}


def svg_texts(uri: str) -> set[str]:
    svg = base64.b64decode(uri.split(",", 1)[1]).decode()
    return set(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


def test_report_compares_revisions(history):
    _, plots, added, out, proc = history
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), [r[:40] for r in refs]
    assert "<script" not in page and "default-src 'none'" in page
    # Every plot of the dvc.yaml, each revision's data in it.
    sections = re.findall(r'<section class="group" data-plot="([^"]+)">(.*?)</section>', page)
    plot_ids = [item if isinstance(item, str) else next(iter(item)) for item in plots]
    assert [plot_id for plot_id, _ in sections] == plot_ids
    for plot_id, body in sections:
        figures = re.findall(r'<figure class="plot" data-plot="[^"]+" data-rev="([^"]+)">'
                             r'<img src="([^"]+)"', body)
        lacking = REVS[1:] if plot_id == "plots/eval/mistakes.png" else \
            ["HEAD~1"] if plot_id in added else []
        having = [rev for rev in REVS if rev not in lacking]
        if plot_id.endswith(".png"):  # side by side, one per revision, a gap where one lacks it
            assert [rev for rev, _ in figures] == having
            assert re.findall(r'<div class="missing" data-rev="([^"]+)"', body) == lacking
        else:  # one overlay; its legend or facets name every revision that has the plot
            [(revs, uri)] = figures
            texts = svg_texts(uri)
            assert set(having) <= set(revs.split()) and set(having) <= texts, plot_id
            assert not set(lacking) & texts, plot_id
        assert re.findall(r'<p class="missing">missing in ([^:]+):', body) == lacking
    # Metrics side by side, the change against the first revision; what a revision lacks.
    tuned = ["0.97", "+0.07"]  # accuracy in the experiment, and in the workspace
    assert metric_rows(page, "metrics/eval.json")["accuracy"] == ["0.9", "0.95", "+0.05", *tuned,
                                                                  *tuned]
    assert metric_rows(page, "metrics/eval.json")["arch"] == ["resnet18", "resnet18", "",
                                                              "resnet34", "", "resnet34", ""]
    assert metric_rows(page, "metrics/eval.json")["operating_point.threshold"] == [
        "missing", "0.1234", "", "0.05", "", "0.05", ""]
    assert metric_rows(page, "metrics/train.json") == {
        "epochs": ["12", "missing", "", "missing", "", "missing", ""]}
    assert "missing in HEAD, tuned, workspace" in page
    # The operating point per revision that has one.
    assert ("<b>HEAD</b>: At threshold 0.1234: On test, 57 of 58 test persons raised the alarm, "
            "and 1 of 137 animals and objects did.") in page
    for rev in ("tuned", "workspace"):
        assert f"<b>{rev}</b>: At threshold 0.05: On test, 58 of 58 test persons" in page
    assert "<b>HEAD~1</b>" not in page
    named = [line for line in proc.stderr.splitlines() if line.startswith(("missing", "error"))]
    assert sorted(named) == sorted(
        [f"missing: {plot_id}: no data for this plot in HEAD~1" for plot_id in added]
        + [f"missing: plots/eval/mistakes.png: plots/eval/mistakes.png in {rev}"
           for rev in REVS[1:]] + [f"missing: metrics/train.json in {rev}" for rev in REVS[1:]])


def test_compared_revisions_render_in_offline_chromium(chromium, history, tmp_path):
    _, _, _, out, proc = history
    assert proc.returncode == 0, proc.stderr
    # Control: a page that fetches something is seen doing so.
    fetching = tmp_path / "fetching.html"
    fetching.write_text('<img src="http://127.0.0.1:9/x.png">')
    requests, control = [], []
    [report] = chromium_evaluate([out.as_uri()], CHECK, requests)
    chromium_evaluate([fetching.as_uri()], "1", control)
    assert "http://127.0.0.1:9/x.png" in control
    assert [r for r in requests if not r.startswith("data:")] == [out.as_uri()]  # itself alone
    assert len(report) == out.read_text().count('<figure class="plot"') > len(REVS)
    for figure in report:
        assert figure["loaded"] and figure["shown"], figure
        assert figure["width"] > 100 and figure["height"] > 100, figure
        assert figure["colours"] > 2, figure  # not a blank rectangle


def test_a_revision_that_does_not_exist_is_one_line_and_writes_nothing(history, project,
                                                                      tmp_path, capsys):
    from stages import report

    repo = history[0]
    out = tmp_path / "x.html"
    for where, revs, expected in [
            (repo, ["HEAD", "no-such-rev"], "error: --rev no-such-rev: unknown Git revision"),
            (project[0], ["HEAD"], "error: --rev needs a git repository")]:  # `dvc init --no-scm`
        with pytest.raises(SystemExit) as exc:
            report.main(["--repo", str(where), *(a for r in revs for a in ("--rev", r)),
                         "--out", str(out)])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
        assert captured.err.startswith(expected), captured.err
        assert not out.exists()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A git + DVC repo of two commits, metrics only: the first's eval.json has NaN, Infinity and
    a string in its operating point and its train.json is cut off; the second is sound. The
    workspace then has an eval.json that is not JSON at all."""
    repo = tmp_path_factory.mktemp("hostile") / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"metrics": ["metrics/eval.json", "metrics/train.json"]}))
    (repo / "metrics").mkdir()
    bad = {**POINT, "threshold": float("nan"), "test_person_recall": float("inf"),
           "false_alarms_per_1000": "7.3"}
    for evaluation, train in [({"accuracy": 0.9, "operating_point": bad}, '{"epochs": 12'),
                              ({"accuracy": 0.95, "operating_point": POINT}, '{"epochs": 12}')]:
        (repo / "metrics/eval.json").write_text(json.dumps(evaluation))  # NaN, Infinity as JS
        (repo / "metrics/train.json").write_text(train)
        run("git", "add", "-A")
        run("git", "commit", "-qm", "metrics")
    (repo / "metrics/eval.json").write_text("accuracy: 0.97\n")
    return repo


def report_of(repo: Path, out: Path, *args: str, capsys) -> tuple[int, str, list[str]]:
    """(exit code, page, stderr lines) of `stages.report --repo REPO --out OUT ARGS`, in-process."""
    from stages import report

    try:
        code = report.main(["--repo", str(repo), "--out", str(out), *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.splitlines()
    return code, out.read_text() if out.exists() else "", err


def test_hostile_metrics_are_named_never_a_traceback_nor_missing(hostile, tmp_path, capsys):
    """NaN / Infinity / a string in a revision's operating point: that revision's point is
    "invalid", the other's sentence still there; a file DVC cannot parse is "unreadable: <why>"
    in the page and on stderr, never "missing"; exit code 1, the page written."""
    from stages.report import operating_point_html

    code, page, err = report_of(hostile, tmp_path / "r.html", "--rev", "HEAD~1", "--rev", "HEAD",
                                capsys=capsys)
    assert code == 1, err
    assert ("<b>HEAD~1</b>: invalid operating point: threshold nan is not a finite number from "
            "0 to 1") in page
    assert "<b>HEAD</b>: At threshold 0.1234: On test, 57 of 58 test persons" in page
    train = metric_rows(page, "metrics/train.json")["epochs"]
    assert train[0].startswith("unreadable: JSONDecodeError: Expecting") and train[1:] == [
        "12", ""]
    assert metric_rows(page, "metrics/eval.json")["operating_point.test_person_recall"][0] == \
        "Infinity"  # the table shows what the file holds
    assert "missing" not in " ".join(err) and sorted(err)[:2] == [
        "error: metrics/eval.json in HEAD~1: invalid operating point: threshold nan is not a "
        "finite number from 0 to 1",
        "error: metrics/train.json in HEAD~1: unreadable: JSONDecodeError: Expecting ',' "
        "delimiter: line 1 column 14 (char 13)"]
    for point, why in [({"false_alarms_per_1000": "7.3"}, "false_alarms_per_1000 '7.3' is not"),
                       ({"test_person_recall": float("inf")}, "test_person_recall inf is not"),
                       ({"threshold_log_odds": float("-inf")}, "threshold_log_odds -inf is not"),
                       ({"threshold": True}, "threshold True is not")]:
        shown = html.unescape(operating_point_html({"w": {**POINT, **point}}))
        assert f"invalid operating point: {why}" in shown, shown
    # Without --rev: the workspace's eval.json, not JSON, is unreadable too.
    code, page, err = report_of(hostile, tmp_path / "w.html", capsys=capsys)
    assert code == 1 and err[0].startswith("error: metrics/eval.json in workspace: unreadable: "
                                           "JSONDecodeError"), err
    assert '<p class="error">unreadable in workspace: JSONDecodeError' in page


def test_an_empty_rev_and_a_closed_stdout_are_one_line(hostile, tmp_path, capsys):
    out = tmp_path / "r.html"
    for revs in (["", "HEAD"], ["HEAD", " "]):
        code, _, err = report_of(hostile, out, *(a for r in revs for a in ("--rev", r)),
                                 capsys=capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(
            "error: --rev: an empty revision name"), err
        assert not out.exists()
    # `--out -` with stdout closed by the shell (>&-), and with its reader gone before the page
    # comes (`| true` ends at once; the report takes seconds). HEAD: sound metrics, exit 0 else.
    cmd = (f"{shlex.quote(sys.executable)} -m stages.report --repo {shlex.quote(str(hostile))} "
           "--rev HEAD --out -")
    for shell in (f"{cmd} >&-", f"{cmd} | true; exit ${{PIPESTATUS[0]}}"):
        proc = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (shell, proc.stderr)
        assert proc.stderr.startswith("error: --out -: "), proc.stderr


@pytest.mark.parametrize("command", ["report", "review"])
def test_a_bad_option_is_one_line_exit_2(command, capsys):
    """The commands' parser (stages.common.infra.errors.ArgumentParser): one line, not argparse's
    usage block."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"stages.{command}").main(["--no-such-option"])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err == [
        f"error: unrecognized arguments: --no-such-option; see python -m stages.{command} --help"]
