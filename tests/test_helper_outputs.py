"""Output adapters of the training helpers, their wrapped-model handling and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from _resnets import ClassifierFirst, ResNet
from torch import nn

import fastmargin as fm


class Wrapped(nn.Module):
    """Returns the logits of ``net`` inside a tuple, a dict or an object with ``.logits``."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        if self.kind == "tuple":
            return z, z.detach() * 0
        if self.kind == "dict":
            return {"logits": z, "aux": z.sum()}
        if self.kind == "attr":
            return type("Out", (), {"logits": z})()
        return {"scores": z}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5))


@pytest.mark.parametrize("mode", ["joint", "select"])
@pytest.mark.parametrize("kind", ["tuple", "dict", "attr", "callable"])
def test_maxup_reads_logits_from_structured_outputs(kind, mode):
    net = _mlp()
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 10), torch.randint(0, 5, (8,))
    if kind == "callable":
        step = fm.MaxUp(
            Wrapped(net, "other"),
            fm.augment.gaussian(0.3),
            k=3,
            mode=mode,
            output=lambda out: out["scores"],
        )
    else:
        step = fm.MaxUp(Wrapped(net, kind), fm.augment.gaussian(0.3), k=3, mode=mode)
    ref_step = fm.MaxUp(twin, fm.augment.gaussian(0.3), k=3, mode=mode)
    torch.manual_seed(1)
    loss, index = step(x, y, return_index=True)
    torch.manual_seed(1)
    ref, ref_index = ref_step(x, y, return_index=True)
    torch.testing.assert_close(loss, ref)
    assert torch.equal(index, ref_index)


def test_maxup_unknown_output_names_the_way_out():
    step = fm.MaxUp(Wrapped(_mlp(), "other"), fm.augment.gaussian(0.3), k=2)
    with pytest.raises(TypeError, match="no 'logits' tensor; pass output="):
        step(torch.randn(4, 10), torch.randint(0, 5, (4,)))
    with pytest.raises(TypeError, match="output: expected a callable"):
        fm.MaxUp(_mlp(), fm.augment.gaussian(0.3), output=3)


def test_maxup_on_a_compiled_model_matches_eager():
    net = _mlp()
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 10), torch.randint(0, 5, (8,))
    for mode in ("joint", "select"):
        torch.manual_seed(2)
        loss = fm.MaxUp(
            torch.compile(net, backend="aot_eager"), fm.augment.gaussian(0.3), k=3, mode=mode
        )(x, y)
        torch.manual_seed(2)
        ref = fm.MaxUp(twin, fm.augment.gaussian(0.3), k=3, mode=mode)(x, y)
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
        for p, q in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_margin_distribution_output_adapter():
    net = _mlp().eval()
    x, y = torch.randn(8, 10), torch.randint(0, 5, (8,))
    with torch.no_grad():
        ref = fm.multiclass_margin(net(x), y)
    got = fm.margin_distribution(Wrapped(net, "dict"), [(x, y)])
    torch.testing.assert_close(got, ref)
    got = fm.margin_distribution(Wrapped(net, "other"), [(x, y)], output=lambda o: o["scores"])
    torch.testing.assert_close(got, ref)


def test_noise_stability_default_layers_follow_execution_order():
    torch.manual_seed(0)
    model = ClassifierFirst()
    stats = fm.noise_stability(model, torch.randn(4, 3, 8, 8), trials=2)
    assert stats.layers == ["conv_a", "conv_b"]  # the head registered first is left out
    compiled = torch.compile(ResNet(), backend="aot_eager")
    stats = fm.noise_stability(compiled, torch.randn(4, 3, 8, 8), layers="official", trials=2)
    assert stats.layers == ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"]


@pytest.mark.parametrize("make", [fm.augment.cutmix, fm.augment.mixup])
def test_mixing_num_classes_smaller_than_the_labels(make):
    aug = make(1.0, num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 4, 2])
    before = (x.clone(), y.clone())
    with pytest.raises(ValueError, match=r"num_classes: 3 classes, but the labels y hold 4"):
        aug(x, y)
    with pytest.raises(ValueError, match="num_classes"):
        aug(x, torch.tensor([0, -1, 1, 2]))
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_meta_tensors_pass_validation_as_shapes():
    """Meta tensors (shape propagation) have no values to check: the value check is skipped
    instead of failing inside .item() with a message that names no argument."""
    z = torch.empty(4, 5, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    assert fm.multiclass_margin(z, t).shape == (4,)
    assert fm.worst_of_k_cross_entropy(z.view(2, 2, 5), t[:2], dim=0).shape == ()
    assert fm.weight_robust_cross_entropy(z, t, 0.5, reduction="none").shape == (4,)
    assert fm.weight_noise_worst_of_k_cross_entropy(z, t, 0.1, k=2).shape == ()
