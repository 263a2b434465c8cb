"""Model building blocks: focal loss, freezing, schedule, early stopping, checkpoints, weights."""
import math
import pickle
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from stages.common.config.params import trainable_modules
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError
from stages.common.model import build as M
from stages.common.config.archs import ARCH_NAMES, FAMILIES, family_of
from stages.common.model.checkpoint import DIGEST_KEY, ModelMeta, save_checkpoint
from stages.train.recipe import EarlyStopping, FocalLoss, cosine_scheduler


def test_focal_loss_gamma0_equals_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    focal = FocalLoss(alpha=1.0, gamma=0.0)(logits, target)
    assert torch.allclose(focal, nn.functional.cross_entropy(logits, target), atol=1e-6)


def test_focal_loss_hand_computed_value():
    # logits (2, 0, 0), true class 0: pt = e^2 / (e^2 + 2)
    pt = math.exp(2) / (math.exp(2) + 2)
    expected = -0.5 * (1 - pt) ** 2 * math.log(pt)
    got = FocalLoss(alpha=0.5, gamma=2.0)(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0054346, rel=1e-4)


def test_report_freezing_leaves_exactly_layer4_and_fc_trainable():
    model = M.build_model("resnet18", 3, 0.3)
    trainable = trainable_modules(["layer4", "fc"], "resnet18")
    M.freeze(model, trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("layer4.", "fc.")) for n in names)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    # conv1 bn1 relu maxpool layer1 layer2 layer3
    assert M.frozen_prefix("resnet18", trainable) == 7


def test_frozen_trunk_keeps_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = M.build_model("resnet18", 3, 0.0)
    trainable = trainable_modules(["layer4", "fc"], "resnet18")
    M.freeze(model, trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    M.set_train_mode(model, trainable)
    assert not model.layer3.training and model.layer4.training
    loss = M.forward(model, torch.randn(4, 3, 32, 32), M.frozen_prefix("resnet18", trainable),
                     arch="resnet18").sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed)


def test_split_forward_matches_plain_forward():
    torch.manual_seed(0)
    model = M.build_model("resnet18", 3, 0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(M.forward(model, x, 7, arch="resnet18"), model(x), atol=1e-5)
    assert torch.allclose(M.forward(model, x, 0, arch="resnet18"), model(x), atol=1e-5)


def test_trainable_rejects_unknown_module():
    with pytest.raises(ValueError):
        trainable_modules(["layer5", "fc"], "resnet18")
    with pytest.raises(ValueError):  # a group of another family
        trainable_modules(["layer4"], "mobilenet_v3_large")
    assert trainable_modules(["all"], "resnet18") == trainable_modules("all", "resnet18") \
        == list(FAMILIES["resnet"].groups)


def test_scheduler_is_cosine_over_half_the_epochs():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = cosine_scheduler(opt, epochs=50)
    lrs = []
    for _ in range(51):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert sched.T_max == 25
    for t in range(26):
        assert lrs[t] == pytest.approx(1e-5 * (1 + math.cos(math.pi * t / 25)) / 2, abs=1e-12)
    assert lrs[25] == pytest.approx(0, abs=1e-12)
    assert lrs[50] == pytest.approx(1e-5, rel=1e-6)  # the cycle comes back up, as in the report


def test_scheduler_with_ratio_1_anneals_once_over_the_run():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = cosine_scheduler(opt, epochs=12, t_max_ratio=1.0)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert sched.T_max == 12
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-3
    assert lrs[-1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 11 / 12)) / 2)


@pytest.mark.parametrize("arch, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_starts_every_block_as_the_identity(arch, last_bn):
    zero = M.build_model(arch, 3, 0.3, zero_init_residual=True)
    plain = M.build_model(arch, 3, 0.3)
    blocks = [b for layer in ("layer1", "layer2", "layer3", "layer4")
              for b in getattr(zero, layer)]
    assert all(torch.count_nonzero(getattr(b, last_bn).weight) == 0 for b in blocks)
    assert torch.count_nonzero(getattr(plain.layer1[0], last_bn).weight) > 0


def test_early_stopping_after_patience_epochs_without_improvement():
    stopper = EarlyStopping(patience=3)
    seen = []
    for loss in [1.0, 0.8, 0.8, 0.9, 0.79, 0.85, 0.85, 0.85]:
        seen.append((stopper.step(loss), stopper.should_stop))
    assert [s[0] for s in seen] == [True, True, False, False, True, False, False, False]
    assert [s[1] for s in seen] == [False] * 7 + [True]


def test_checkpoint_round_trip_keeps_classes_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = M.build_model("resnet34", 3, 0.3).eval()
    meta = {"arch": "resnet34", "classes": ["animal", "object", "person"], "image_size": 64,
            "mean": M.IMAGENET_MEAN, "std": M.IMAGENET_STD, "dropout": 0.3,
            "params": {"train": {"lr": 1e-5}}, "epoch": 4}
    save_checkpoint(tmp_path / "best.pt", model, ModelMeta(**meta))
    loaded, got = M.load_checkpoint(tmp_path / "best.pt")
    assert got.classes == meta["classes"] and got.arch == "resnet34"
    assert got.image_size == 64 and got.epoch == 4 and got.params == meta["params"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    # weights_only: the file must load without unpickling any code
    torch.load(tmp_path / "best.pt", weights_only=True)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "resnet18", "payload": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(StageError, match="not a loadable checkpoint"):
        M.load_checkpoint(path)


def test_imagenet_weights_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(StageError) as err:
        M.build_model("resnet18", 3, 0.3, "imagenet")
    assert str(expected) in str(err.value) and "model.weights" in str(err.value)


def test_imagenet_weights_load_from_torch_cache(tmp_path, monkeypatch):
    """A cached file is used with no network; its SHA-256 must begin with the digits in its
    name (torchvision's resnet18-f37072fd.pth), which these random weights do not: so the test
    names its file by its own digest, as torchvision names the real one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("must not download when cached"))
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    real_name = M.imagenet_weights_file("resnet18")
    real_name.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), real_name)
    with pytest.raises(StageError) as err:  # bytes that are not torchvision's
        M.build_model("resnet18", 3, 0.3, "imagenet")
    assert f"{real_name}: its SHA-256 begins " in str(err.value)
    assert "not f37072fd as its name says" in str(err.value)
    named = real_name.with_name(f"resnet18-{file_sha256(real_name)[:8]}.pth")
    real_name.rename(named)
    monkeypatch.setattr(M, "imagenet_weights_file", lambda arch: named)
    model = M.build_model("resnet18", 3, 0.3, "imagenet")
    assert torch.equal(model.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert model.fc[1].out_features == 3 and model.fc[0].p == 0.3


def test_weights_file_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(StageError, match="does not fit resnet18"):
        M.build_model("resnet18", 3, 0.3, str(path))


# ---------------------------------------------------------------------------------------------
# Integrity: a damaged or foreign file is one line, never an answer or a traceback

META = {"arch": "resnet18", "classes": ["animal", "object", "person"], "image_size": 32,
        "mean": M.IMAGENET_MEAN, "std": M.IMAGENET_STD, "dropout": 0.3}


def saved(tmp_path, name="best.pt", meta=None, edit=None, arch="resnet18", classes=3):
    torch.manual_seed(0)
    model = M.build_model(arch, classes, 0.3).eval()
    if edit:
        edit(model)
    path = tmp_path / name
    save_checkpoint(path, model, ModelMeta(**(meta or META)))
    return path


def storage_offsets(path):
    """(start, size) of each tensor's raw bytes inside torch's zip file."""
    import zipfile

    data = path.read_bytes()
    out = []
    for info in zipfile.ZipFile(path).infolist():
        if "/data/" in info.filename and not info.filename.endswith(".pkl"):
            start = info.header_offset + 30 + len(info.filename) + int.from_bytes(
                data[info.header_offset + 28:info.header_offset + 30], "little")
            out.append((start, info.file_size))
    return out


def flip_bit(path, offset, bit=4):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_weight_or_a_class_name_is_refused(tmp_path):
    """torch's zip format checks no CRC: a flipped bit loaded, and answered (27 of 58 people
    'object'). Now the digest refuses the file in one line naming it."""
    path = saved(tmp_path)
    M.load_checkpoint(path)  # intact: loads
    start, size = max(storage_offsets(path), key=lambda s: s[1])
    flip_bit(path, start + size // 2)
    state = torch.load(path, weights_only=True)  # torch itself still loads it
    assert state["model_state"] is not None
    with pytest.raises(StageError) as err:
        M.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: its content does not match its weights digest")
    assert "\n" not in str(err.value)

    names = saved(tmp_path, "names.pt")
    data = names.read_bytes()
    flip_bit(names, data.index(b"person"), bit=0)  # 'person' -> 'qerson'
    assert torch.load(names, weights_only=True)["classes"][2] == "qerson"
    with pytest.raises(StageError, match="does not match its weights digest"):
        M.load_checkpoint(names)


def test_non_finite_weights_are_refused(tmp_path):
    """conv1 weights of NaN answered 'animal nan' for every picture, exit code 0."""
    def poison(model):
        with torch.no_grad():
            model.conv1.weight.fill_(float("nan"))

    path = saved(tmp_path, edit=poison)  # a valid digest: the damage came before the save
    with pytest.raises(StageError) as err:
        M.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: weight conv1.weight holds NaN or infinite values")


def test_a_checkpoint_without_a_digest_is_refused_saying_how_to_regenerate(tmp_path):
    path = saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt[DIGEST_KEY]
    torch.save(ckpt, path)
    with pytest.raises(StageError) as err:
        M.load_checkpoint(path)
    assert "has no weights digest" in str(err.value)
    assert "regenerate it with `dvc repro`" in str(err.value)


@pytest.mark.parametrize("case,needle", [
    ("bare tensor", "not a checkpoint (it holds a Tensor"),
    ("other arch", "its weights do not fit a resnet34 with 3 classes"),
    ("other class count", "its weights do not fit a resnet18 with 4 classes"),
    ("weights not tensors", "not a mapping of weight names to tensors"),
    ("bad metadata", "metadata image_size='64' is not usable"),
])
def test_files_that_are_not_our_checkpoints_are_one_line(tmp_path, case, needle):
    """Each of these was a traceback (exit code 1) from load_state_dict or later."""
    path = tmp_path / "x.pt"
    if case == "bare tensor":
        torch.save(torch.zeros(3), path)
    elif case == "other arch":  # a valid digest over resnet18 weights that claim resnet34
        saved(tmp_path, "x.pt", {**META, "arch": "resnet34"})
    elif case == "other class count":
        saved(tmp_path, "x.pt", {**META, "classes": ["a", "b", "c", "d"]})
    elif case == "weights not tensors":
        ckpt = torch.load(saved(tmp_path, "x.pt"), weights_only=True)
        ckpt["model_state"] = {"conv1.weight": [1.0, 2.0]}
        torch.save(ckpt, path)
    else:
        saved(tmp_path, "x.pt", {**META, "image_size": "64"})
    with pytest.raises(StageError) as err:
        M.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_model_weights_is_verified_like_a_checkpoint(tmp_path):
    """model.weights pointing at a damaged checkpoint, or at something that is no weights file
    at all, was a traceback; now one line, before any training."""
    path = saved(tmp_path)
    model = M.build_model("resnet18", 3, 0.3, str(path))  # intact: its trunk is used
    assert torch.equal(model.conv1.weight, M.load_checkpoint(path)[0].conv1.weight)
    start, size = max(storage_offsets(path), key=lambda s: s[1])
    flip_bit(path, start + size // 2)
    with pytest.raises(StageError, match="does not match its weights digest"):
        M.build_model("resnet18", 3, 0.3, str(path))
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(StageError) as err:
        M.build_model("resnet18", 3, 0.3, str(text))
    assert str(err.value).startswith(f"model.weights: {text} is not a loadable weights file")
    nan = tmp_path / "nan.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"].fill_(float("inf"))
    torch.save(state, nan)
    with pytest.raises(StageError, match="weight layer1.0.conv1.weight holds NaN or infinite"):
        M.build_model("resnet18", 3, 0.3, str(nan))


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_a_device_asked_for_by_name_that_is_not_there_is_one_line(name, monkeypatch):
    import torch

    from stages.common.infra.errors import StageError
    from stages.common.model import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: False)
    with pytest.raises(StageError, match=f"device={name} but no .* use auto or cpu"):
        device.pick_device(name)
    assert device.pick_device("auto").type == "cpu"


# ---------------------------------------------------------------------------------------------
# Families: every one builds, trains a step and exports; the table is the only list of archs

# One arch per family (the smallest): adding a family to stages.common.config.archs adds its case.
ONE_PER_FAMILY = {name: family.archs[0] for name, family in FAMILIES.items()}


def test_every_family_has_a_case_and_every_arch_is_a_torchvision_classifier():
    assert set(ONE_PER_FAMILY) == set(FAMILIES)
    classifiers = set(torchvision.models.list_models(module=torchvision.models))
    assert set(ARCH_NAMES) <= classifiers, set(ARCH_NAMES) - classifiers
    assert len(set(ARCH_NAMES)) == len(ARCH_NAMES)


@pytest.mark.parametrize("arch", ONE_PER_FAMILY.values())
def test_each_family_builds_trains_one_step_and_exports(arch, tmp_path):
    """Its groups are the model's top-level modules in forward order (the split forward equals
    the model's own), its head is dropout + a 3-way linear, a step with a frozen trunk changes
    only the trainable groups, and the ONNX file answers as the model does."""
    import onnxruntime as ort

    from stages.common.model import onnx as O

    family = family_of(arch)
    torch.manual_seed(0)
    model = M.build_model(arch, 3, 0.3)
    assert tuple(name for name, _ in model.named_children()) == family.groups
    head = model.get_submodule(family.head.replace("-1", str(len(model.classifier) - 1))
                               if "." in family.head else family.head)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3
    assert isinstance(head[1], nn.Linear) and head[1].out_features == 3
    # the family's own dropout is off: model.dropout is the only one before the head
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0] == [0.3]
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        for n_frozen in (0, len(family.groups) - 1):
            assert torch.allclose(M.forward(model, x, n_frozen, arch=arch), model(x), atol=1e-5)

    trainable = list(family.groups[-1:])  # the head's group only
    M.freeze(model, trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    M.set_train_mode(model, trainable)
    n_frozen = M.frozen_prefix(arch, trainable)
    assert n_frozen == len(family.groups) - 1
    loss = nn.functional.cross_entropy(M.forward(model, x, n_frozen, arch=arch),
                                       torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(f"{trainable[0]}.") for k in changed)

    mean, std = M.normalisation(arch)
    meta = {"arch": arch, "classes": ["animal", "object", "person"], "image_size": 32,
            "mean": mean, "std": std}
    model.eval()
    O.export(model, ModelMeta(**meta), tmp_path / "model.onnx", opset=18)
    data, stored, _ = O.verified_bytes(tmp_path / "model.onnx")
    assert stored["arch"] == f'"{arch}"'
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    answered = session.run(None, {O.INPUT: x.numpy()})[0]
    with torch.no_grad():
        assert abs(answered - model(x).numpy()).max() < 1e-3


@pytest.mark.parametrize("arch", ONE_PER_FAMILY.values())
def test_each_family_loads_imagenet_weights_from_a_file_laid_out_as_the_download(
        arch, tmp_path, monkeypatch):
    """model.weights: imagenet reads torch's cache at the name torchvision downloads to (the
    last part of the weights' URL); a file there that is not torchvision's (its SHA-256 is not
    the one its name begins) is refused; one whose name matches its bytes loads into the
    trunk, the head new."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("must not download when cached"))
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    real_name = M.imagenet_weights_file(arch)
    assert real_name == tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    torch.manual_seed(1)
    reference = torchvision.models.get_model(arch, weights=None)
    real_name.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), real_name)
    with pytest.raises(StageError, match=f"{real_name}: its SHA-256 begins "):
        M.build_model(arch, 3, 0.3, "imagenet")
    digits = torch.hub.HASH_REGEX.search(real_name.name).group(1)
    named = real_name.with_name(real_name.name.replace(digits, file_sha256(real_name)[:8]))
    real_name.rename(named)
    monkeypatch.setattr(M, "imagenet_weights_file", lambda a: named)
    model = M.build_model(arch, 3, 0.3, "imagenet")
    trunk = family_of(arch).groups[0]
    got, want = model.get_submodule(trunk).state_dict(), reference.get_submodule(trunk).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][-1] == 3


def test_the_family_table_is_the_only_list_of_archs():
    """A second list of arch names in the stages (a Literal, a dict, a help text) would drift
    from the table: no module but archs.py spells two of them."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "stages"
    offenders = []
    for path in root.rglob("*.py"):
        if path == root / "common" / "config" / "archs.py":
            continue
        named = {node.value for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 for arch in ARCH_NAMES if arch in node.value.split()
                 or node.value == arch}
        if len(named) > 1:
            offenders.append(f"{path.relative_to(root)}: {sorted(named)}")
    assert not offenders, offenders
