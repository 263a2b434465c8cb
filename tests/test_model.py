"""Model building blocks: focal loss, freezing, schedule, early stopping, checkpoints, weights."""
import math
import pickle
import urllib.error

import pytest
import torch
from torch import nn

from stages.common import model as M
from stages.common.params import StageError
from stages.common.training import EarlyStopping, FocalLoss, cosine_scheduler


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
    trainable = M.trainable_modules(["layer4", "fc"])
    M.freeze(model, trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("layer4.", "fc.")) for n in names)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert M.frozen_prefix(trainable) == 7  # conv1 bn1 relu maxpool layer1 layer2 layer3


def test_frozen_trunk_keeps_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = M.build_model("resnet18", 3, 0.0)
    trainable = M.trainable_modules(["layer4", "fc"])
    M.freeze(model, trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    M.set_train_mode(model, trainable)
    assert not model.layer3.training and model.layer4.training
    loss = M.forward(model, torch.randn(4, 3, 32, 32), M.frozen_prefix(trainable)).sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed)


def test_split_forward_matches_plain_forward():
    torch.manual_seed(0)
    model = M.build_model("resnet18", 3, 0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(M.forward(model, x, 7), model(x), atol=1e-5)
    assert torch.allclose(M.forward(model, x, 0), model(x), atol=1e-5)


def test_trainable_rejects_unknown_module():
    with pytest.raises(StageError, match="layer5"):
        M.trainable_modules(["layer5", "fc"])


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
    M.save_checkpoint(tmp_path / "best.pt", model, meta)
    loaded, got = M.load_checkpoint(tmp_path / "best.pt")
    assert got["classes"] == meta["classes"] and got["arch"] == "resnet34"
    assert got["image_size"] == 64 and got["epoch"] == 4
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
    """The real file name torchvision caches to; no network is touched when it is there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("must not download when cached"))
    torch.manual_seed(1)
    reference = M.ARCHS["resnet18"][0](weights=None)
    path = M.imagenet_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = M.build_model("resnet18", 3, 0.3, "imagenet")
    assert torch.equal(model.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert model.fc[1].out_features == 3 and model.fc[0].p == 0.3


def test_weights_file_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(M.ARCHS["resnet50"][0](weights=None).state_dict(), path)
    with pytest.raises(StageError, match="does not fit resnet18"):
        M.build_model("resnet18", 3, 0.3, str(path))
