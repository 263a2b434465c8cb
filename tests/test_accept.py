"""stages.accept: a site's own labelled crops at the sealed operating point, one verdict line per
site set, its JSON, every bad site set in one line, and the DVC stage's params and file.

The model is a random checkpoint whose answers the test does not predict: it reads the model's
person scores on the site set first, then seals operating points whose thresholds sit between
them (one person missed, none missed, all but one missed), so each verdict is constructed, and
the expected figures are computed here from those scores with scipy's beta distribution."""
import json
import math
import os
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from scipy.stats import beta

from stages import accept
from stages.common.alarm import calibration as cal, point as pt
from stages.common.infra.digest import file_sha256
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.serving.classifiers import TorchClassifier
from stages.common.serving.predictor import expand, predict_paths
from tests import paramfile, reference

SIZE = 32
CLASSES = ["animal", "object", "person"]
COUNTS = {"animal": 3, "object": 3, "person": 6}
TEMPERATURE = 2.5
ARCH = "resnet18"


# Run from an empty folder: the project's own data/calibration must not answer here.
pytestmark = pytest.mark.usefixtures("elsewhere")


def write_site(root, counts=COUNTS, seed=1):
    """An ImageFolder of noise pictures, ``counts[label]`` per class folder."""
    rng = np.random.default_rng(seed)
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / label / f"{label[0]}{i}.png"),
                        rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8))
    return root


def seal_point(checkpoint, threshold_log_odds, target):
    return pt.seal({"format": 1, "label": "person", "temperature": TEMPERATURE,
                    "threshold": cal.probability(threshold_log_odds),
                    "threshold_log_odds": threshold_log_odds, "target_recall": target,
                    "val": {}, "model_sha256": file_sha256(checkpoint)})


@pytest.fixture(scope="module")
def models(elsewhere, tmp_path_factory):
    """One random checkpoint, linked into a folder per operating point: ``one_missed`` (the
    threshold between the two lowest person scores), ``all_caught`` (below every person, target
    0.5), ``one_caught`` (between the two highest) and ``bare`` (no point)."""
    d = tmp_path_factory.mktemp("accept")
    torch.manual_seed(0)
    model = build_model(ARCH, 3, 0.3).eval()
    meta = {"arch": ARCH, "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    save_checkpoint(d / "best.pt", model, ModelMeta(**meta))
    site = write_site(d / "site")
    # the order and batch stages.accept classifies in: class by class, each folder sorted
    items = [item for label in CLASSES for item in expand([site / label])]
    labels = [label for label in CLASSES for _ in range(COUNTS[label])]
    logits = np.stack([p.logits for p in predict_paths(TorchClassifier(d / "best.pt"), items)])
    scores = reference.log_odds(logits, TEMPERATURE, CLASSES.index("person"))
    persons = np.sort(scores[np.array(labels) == "person"])
    assert persons[1] - persons[0] > 1e-3 and persons[-1] - persons[-2] > 1e-3  # clear gaps
    thresholds = {"one_missed": ((persons[0] + persons[1]) / 2, 0.99),
                  "all_caught": (persons[0] - 1.0, 0.5),
                  "one_caught": ((persons[-2] + persons[-1]) / 2, 0.99)}
    out = SimpleNamespace(site=site, items=[p for p, _ in items], labels=labels,
                          scores=scores, dirs={})
    for name, (threshold, target) in [*thresholds.items(), ("bare", (None, None))]:
        folder = d / name
        folder.mkdir()
        os.link(d / "best.pt", folder / "best.pt")
        if threshold is not None:
            point = seal_point(folder / "best.pt", float(threshold), target)
            (folder / "operating_point.json").write_text(json.dumps(point))
        out.dirs[name] = folder / "best.pt"
    return out


@pytest.fixture
def run(main_in_process):
    """``python -m stages.accept ARGS`` in this process: exit code, stdout, stderr."""
    return main_in_process(accept.main)


def floor4(x: float) -> float:
    return math.floor(x * 1e4 + 1e-9) / 1e4


def expected(models, name):
    """What the point ``name`` gives on the site set, from the scores read in the fixture."""
    point = json.loads((models.dirs[name].parent / "operating_point.json").read_text())
    alarm = models.scores >= point["threshold_log_odds"]
    person = np.array(models.labels) == "person"
    n, caught = int(person.sum()), int((alarm & person).sum())
    lower = beta.ppf(0.05, caught, n - caught + 1) if caught else 0.0
    upper = beta.ppf(0.95, caught + 1, n - caught) if caught < n else 1.0
    target = point["target_recall"]
    verdict = "met" if lower >= target else "not met" if upper < target else "not shown"
    files = [str(p) for p, a, is_p in zip(models.items, alarm, person) if is_p and not a]
    false = [str(p) for p, a, is_p in zip(models.items, alarm, person) if not is_p and a]
    return SimpleNamespace(persons=n, caught=caught, recall=round(caught / n, 4),
                           lower=floor4(lower), verdict=verdict, target=target, missed=files,
                           false=false, non_persons=int((~person).sum()))


@pytest.mark.parametrize("name, verdict", [("one_missed", "not shown"), ("all_caught", "met"),
                                           ("one_caught", "not met")])
def test_the_verdict_line_and_figures_of_a_site_set(run, models, tmp_path, name, verdict):
    want = expected(models, name)
    assert want.verdict == verdict  # the constructed case is the one named
    result = run(models.site, "--model", models.dirs[name], "--json", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    line = result.stdout
    assert line.count("\n") == 1
    head = (f"site set {models.site}: {want.persons} persons, recall {want.recall} (>= "
            f"{want.lower} with 95 % confidence): target {want.target} {verdict}; ")
    assert line.startswith(head)
    missed = len(want.missed)
    named = ", ".join(want.missed[:accept.NAMES_SHOWN])
    said = (f"{missed} person{'s' * (missed != 1)} missed: {named}" if missed else
            "no person missed")
    assert line[len(head):].startswith(said + f"; {len(want.false)} of {want.non_persons} "
                                                "animals and objects raised it (")
    if name == "one_missed":  # the missed person by name, as the operator looks it up
        assert len(want.missed) == 1 and f"; 1 person missed: {models.site}/person/" in line
    record = json.loads((tmp_path / "a.json").read_text())["site_sets"][str(models.site)]
    assert record["persons"] == want.persons and record["persons_missed"] == missed
    assert record["person_recall_lower_95"] == want.lower
    assert record["target_verdict"] == verdict and record["target_met"] == (verdict == "met")
    assert record["persons_missed_files"] == want.missed
    assert record["false_alarm_files"] == want.false
    assert record["false_alarms"] == len(want.false)
    assert record["per_class"] == COUNTS and record["unreadable"] == []
    assert record["verdict"] == line.rstrip("\n")


@pytest.fixture(scope="module")
def moded(models, tmp_path_factory):
    """The checkpoint with a point whose own threshold is ``all_caught``'s and whose camera mode
    ``infrared`` holds ``one_caught``'s (the top person score alone reaches it)."""
    folder = tmp_path_factory.mktemp("moded")
    os.link(models.dirs["all_caught"], folder / "best.pt")
    low = json.loads((models.dirs["all_caught"].parent / "operating_point.json").read_text())
    high = json.loads((models.dirs["one_caught"].parent / "operating_point.json").read_text())
    point = {k: v for k, v in low.items() if k != pt.SEAL_KEY}
    point[pt.MODES_KEY] = [{"name": "infrared", "conditions": ["infrared"],
                            "severities": [1, 2, 3, 4, 5], "threshold": high["threshold"],
                            "threshold_log_odds": high["threshold_log_odds"], "val": {}}]
    (folder / "operating_point.json").write_text(json.dumps(pt.seal(point)))
    return folder / "best.pt", high["threshold_log_odds"]


def test_a_camera_mode_measures_at_that_modes_threshold(run, models, moded, tmp_path):
    """--mode infrared: the verdict of the mode's threshold, named in the line and the JSON;
    without it the point's own (every person caught)."""
    model, threshold = moded
    persons = np.array(models.labels) == "person"
    caught = int((persons & (models.scores >= threshold)).sum())
    assert caught == 1
    result = run(models.site, "--model", model, "--mode", "infrared", "--json", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"site set {models.site} at camera mode infrared: "
                                    f"{int(persons.sum())} persons, recall "
                                    f"{round(caught / persons.sum(), 4)} (>= ")
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["operating_point"]["mode"] == "infrared"
    assert document["operating_point"]["threshold_log_odds"] == threshold
    record = document["site_sets"][str(models.site)]
    assert record["persons"] - record["persons_missed"] == caught
    plain = run(models.site, "--model", model)
    assert plain.returncode == 0 and "no person missed" in plain.stdout
    assert plain.stdout.startswith(f"site set {models.site}: ")


@pytest.mark.parametrize("mode, needle", [
    ("night", "error: --mode 'night' is not a camera mode of the operating point ("),
    ("auto", "error: --mode auto picks a threshold per picture (predict); an acceptance test "
             "states one threshold: name the mode"),
])
def test_an_unusable_mode_is_one_line_before_any_picture(run, models, moded, mode, needle):
    result = run(models.site, "--model", moded[0], "--mode", mode)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(needle) and result.stderr.count("\n") == 1, result.stderr
    if mode == "night":
        assert "it holds infrared" in result.stderr


def test_many_missed_persons_are_capped_with_a_count(run, models, monkeypatch):
    want = expected(models, "one_caught")
    assert len(want.missed) == 5
    monkeypatch.setattr(accept, "NAMES_SHOWN", 2)
    result = run(models.site, "--model", models.dirs["one_caught"])
    assert (f"; 5 persons missed: {want.missed[0]}, {want.missed[1]} and 3 more (--json FILE "
            "lists all); ") in result.stdout


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found; give a folder holding animal/, object/, person/"),
    ("a_file", "not a folder; give a folder holding animal/, object/, person/"),
    ("empty", "empty; put each labelled picture in {site}/<class>/ (animal, object, person)"),
    ("no_object_folder", "no class folder {site}/object; create it, empty if the site has no "
                         "object crops"),
    ("unknown_folder", "{site}/cars is not a class folder (expected animal/, object/, "
                       "person/); rename it to one or move it out"),
    ("no_person_folder", "no class folder {site}/person; an acceptance test needs labelled "
                         "persons"),
    ("no_persons", "no person picture in {site}/person; an acceptance test needs labelled "
                   "persons"),
])
def test_a_site_set_that_cannot_be_measured_is_one_line(tmp_path, case, needle):
    site = tmp_path / "site"
    if case == "a_file":
        site.write_text("not a folder")
    elif case == "empty":
        site.mkdir()
    elif case != "missing":
        write_site(site, {"animal": 1, "object": 1, "person": 1})
        if case == "no_object_folder":
            (site / "object/o0.png").unlink()
            (site / "object").rmdir()
        elif case == "unknown_folder":
            (site / "cars").mkdir()
        elif case == "no_person_folder":
            (site / "person").rename(tmp_path / "elsewhere")
        elif case == "no_persons":
            (site / "person/p0.png").unlink()
            (site / "person/notes.txt").write_text("not a picture")
    found, problems = accept.survey(site, CLASSES)
    assert found is None and problems == [f"site set {site}: {needle.format(site=site)}"]


def test_an_empty_class_folder_other_than_person_is_measured_as_none(tmp_path):
    site = write_site(tmp_path / "site", {"animal": 0, "object": 1, "person": 2})
    found, problems = accept.survey(site, CLASSES)
    assert problems == [] and found.labels == [1, 2, 2]
    assert found.items == [(site / "object/o0.png", None), (site / "person/p0.png", None),
                           (site / "person/p1.png", None)]


def test_every_bad_site_set_is_named_before_any_is_measured(run, models, tmp_path):
    good = write_site(tmp_path / "good")
    bad = write_site(tmp_path / "bad")
    (bad / "cars").mkdir()
    (bad / "trucks").mkdir()
    result = run(good, bad, tmp_path / "missing", "--model", models.dirs["one_missed"],
                 "--json", tmp_path / "a.json")
    assert result.returncode == 2 and result.stdout == ""  # the good one is not measured either
    assert not (tmp_path / "a.json").exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: site set ") for line in lines)
    assert [f"{bad}/cars" in lines[0], f"{bad}/trucks" in lines[1],
            f"{tmp_path}/missing: not found" in lines[2]] == [True, True, True]


def test_a_picture_that_cannot_be_read_is_counted_and_named(run, models, tmp_path):
    site = write_site(tmp_path / "site")
    (site / "person" / "p9_cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    (site / "animal" / "notes.txt").write_text("what the camera logged")
    (site / "README").write_text("beside the class folders")
    result = run(site, "--model", models.dirs["all_caught"], "--json", tmp_path / "a.json")
    assert result.returncode == 1
    line = result.stdout.rstrip("\n")
    assert line.startswith(f"site set {site}: 6 persons, ")  # the 7th is not counted
    assert line.endswith(f"; 1 picture could not be read, not counted: "
                         f"{site}/person/p9_cut.jpg (cannot decode the file as an image "
                         "(damaged, or not a picture))")
    assert result.stderr == (f"note: 2 files in site set {site} not counted (not a picture by "
                             "name or content, or beside the class folders): "
                             f"{site}/README, {site}/animal/notes.txt\n")
    record = json.loads((tmp_path / "a.json").read_text())["site_sets"][str(site)]
    assert record["pictures"] == 13 and record["pictures_read"] == 12
    assert [u["path"] for u in record["unreadable"]] == [f"{site}/person/p9_cut.jpg"]
    assert record["ignored"] == [f"{site}/README", f"{site}/animal/notes.txt"]


def test_no_readable_person_picture_gives_no_verdict(run, models, tmp_path):
    site = write_site(tmp_path / "site", {"animal": 1, "object": 1, "person": 0})
    (site / "person" / "p0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run(site, "--model", models.dirs["one_missed"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: site set {site}: none of its person pictures could "
                                    f"be read, so no verdict: {site}/person/p0.png (")


def test_a_model_without_an_operating_point_is_refused(run, models):
    result = run(models.site, "--model", models.dirs["bare"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {models.dirs['bare']} has no operating point (")
    assert result.stderr.count("\n") == 1


def test_a_site_set_given_twice_is_refused(run, models):
    result = run(models.site, f"{models.site}/", "--model", models.dirs["one_missed"])
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: site set {models.site} is given twice")


# ---------------------------------------------------------------- the DVC stage and its params

def test_the_stage_without_site_sets_writes_a_file_saying_so(run, tmp_path, monkeypatch):
    paramfile.write(tmp_path, {"accept": {"folders": []}})
    monkeypatch.chdir(tmp_path)
    result = run()  # no model, no calibration: none is needed
    assert result.returncode == 0
    written = json.loads((tmp_path / "metrics/accept.json").read_text())
    assert written["site_sets"] == {} and "no site set given" in written["note"]


def test_the_stage_measures_the_listed_site_sets(run, models, tmp_path, monkeypatch):
    (tmp_path / "data/model").mkdir(parents=True)
    os.link(models.dirs["one_missed"], tmp_path / "data/model/best.pt")
    os.link(models.dirs["one_missed"].parent / "operating_point.json",
            tmp_path / "data/model/operating_point.json")
    os.symlink(models.site, tmp_path / "north")
    paramfile.write(tmp_path, {"accept": {"folders": ["north"]}})
    monkeypatch.chdir(tmp_path)
    result = run()
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "metrics/accept.json").read_text())
    assert list(written["site_sets"]) == ["north"]
    assert written["site_sets"]["north"]["verdict"] == result.stdout.rstrip("\n")
    assert result.stdout.startswith("site set north: 6 persons, ")
    assert "dvc repro -f -s accept" in result.stderr  # DVC does not track the folder


@pytest.mark.parametrize("folders, needle", [
    ("north", "accept.folders='north' is not allowed; expected a list of folder paths"),
    (["north", ""], "accept.folders=['north', ''] is not allowed"),
    (["north", "./north/"], "accept.folders lists './north/' twice (as 'north' too)"),
])
def test_bad_accept_params_stop_the_stage_in_one_line(run, tmp_path, monkeypatch, folders,
                                                      needle):
    values = paramfile.params({"accept": {"folders": folders}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    result = run()
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: params.yaml: {needle}")
    assert not (tmp_path / "metrics").exists()
