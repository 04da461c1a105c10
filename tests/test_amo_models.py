"""fm.AllLayerMargin on real model shapes: torch.compile'd models and submodules, the layer
choice (execution order, the official residual-block preset), inner_wd, output adapters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _resnets import Bottleneck, ClassifierFirst, ResNet, WideResNet
from torch import nn

import fastmargin as fm
import fastmargin.models


def batch(seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 5, (B,), generator=g)


class RecordingAMO(fm.AllLayerMargin):
    """Keeps a copy of the deltas used by the final (perturbed) forward of each call."""

    def _forward(self, x, y):
        if self._mode == "final":
            self.final_deltas = {k: d.detach().clone() for k, d in self._deltas.items()}
        return super()._forward(x, y)


def _assert_same_step(eager_model, eager_amo, model, amo, x, y):
    loss_e, loss_c = eager_amo(x, y), amo(x, y)
    torch.testing.assert_close(loss_c, loss_e)
    assert eager_amo.final_deltas.keys() == amo.final_deltas.keys()
    for key, d in eager_amo.final_deltas.items():
        assert d.abs().max() > 0, f"delta {key} stayed zero"
        torch.testing.assert_close(amo.final_deltas[key], d)
    loss_e.backward()
    loss_c.backward()
    for p, q in zip(fm._layers.unwrap(model).parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for a, b in zip(fm._layers.unwrap(model).buffers(), eager_model.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("where", ["model", "submodule"])
def test_compiled_model_matches_eager(where):
    """Loss, every delta, parameter gradients and BN buffers equal eager AMO at inner_steps 1
    and 2, for a whole compiled model and for a compiled submodule; twice each (the second
    call uses the remembered delta shapes)."""
    torch.manual_seed(0)
    eager = ResNet()
    net = copy.deepcopy(eager)
    if where == "model":
        model = torch.compile(net, backend="aot_eager")
    else:
        net.layer2 = torch.compile(net.layer2, backend="aot_eager")
        model = net
    x, y = batch()
    # the submodule case compiles the same graphs with the hooks inside: one step is enough
    for steps in (1, 2) if where == "model" else (1,):
        kw = dict(inner_lr=0.5, inner_steps=steps)
        eager_amo = RecordingAMO(eager, **kw)
        amo = RecordingAMO(model, **kw)
        for _ in range(2):
            _assert_same_step(eager, eager_amo, model, amo, x, y)
        assert amo.layer_names == eager_amo.layer_names
        eager_amo.remove()
        amo.remove()


def test_compiled_model_layer_names_have_no_wrapper_prefix():
    torch.manual_seed(0)
    net = ResNet()
    compiled = torch.compile(net, backend="aot_eager")
    amo = fm.AllLayerMargin(compiled, ["layer1.0.conv2", net.layer2[0].conv1])
    assert amo.layer_names == ["layer1.0.conv2", "layer2.0.conv1"]
    amo.remove()
    net.layer1 = torch.compile(net.layer1, backend="aot_eager")
    amo = fm.AllLayerMargin(net, "official")
    assert amo.layer_names == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
    ]
    amo.remove()


def test_default_layers_follow_execution_order():
    """The classifier is registered first but runs last: it is the one left out."""
    torch.manual_seed(0)
    model = ClassifierFirst()
    x, y = batch()
    amo = fm.AllLayerMargin(model, inner_lr=0.5)
    assert "chosen by execution order" in repr(amo)
    loss = amo(x, y)
    assert amo.layer_names == ["conv_a", "conv_b"]
    assert "layers=[conv_a, conv_b]" in repr(amo)
    twin = copy.deepcopy(model)
    ref = fm.reference.all_layer_margin_loss(twin, [twin.conv_a, twin.conv_b], x, y, lr=0.5)
    torch.testing.assert_close(loss, ref)


def test_official_preset_on_torchvision_shaped_resnets():
    basic = ResNet(blocks=(2, 2))
    names = fm.AllLayerMargin(basic, "official").layer_names
    assert names == [f"layer{s}.{b}.conv{c}" for s in (1, 2) for b in (0, 1) for c in (1, 2)]
    bottleneck = ResNet(block=Bottleneck, blocks=(1, 1), widths=(4, 8))
    names = fm.AllLayerMargin(bottleneck, "official").layer_names
    assert names == [f"layer{s}.0.conv{c}" for s in (1, 2) for c in (1, 2, 3)]
    wrn = WideResNet(depth=16)  # 2 blocks per group
    names = fm.AllLayerMargin(wrn, "official").layer_names
    assert names == [
        f"block{g}.layer.{b}.conv{c}" for g in (1, 2, 3) for b in (0, 1) for c in (1, 2)
    ]
    assert "convShortcut" not in " ".join(names) and "conv1" != names[0]
    # the project's own WideResNet has the same block layout
    own = fm.models.WideResNet(depth=10, widen=1)
    names = fm.AllLayerMargin(own, "official").layer_names
    assert names == [f"blocks.{b}.conv{c}" for b in range(3) for c in (1, 2)]
    with pytest.raises(ValueError, match="modules: 'official' needs residual blocks"):
        fm.AllLayerMargin(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), "official")


def test_official_preset_trains_like_the_reference():
    torch.manual_seed(1)
    model = WideResNet()
    twin = copy.deepcopy(model)
    x, y = batch(1)
    amo = fm.AllLayerMargin(model, "official", inner_lr=0.3, inner_steps=2)
    layers = [m for _n, m in fm._layers.official_layers(twin, arg="modules")]
    loss = amo(x, y)
    ref = fm.reference.all_layer_margin_loss(twin, layers, x, y, lr=0.3, steps=2)
    torch.testing.assert_close(loss, ref)


def _amo_with_weight_decay(model, layers, x, y, lr, wd, steps):
    """Plain-PyTorch AMO whose deltas take torch.optim.SGD steps with weight decay, as in the
    official code (minimising -loss)."""
    deltas, calls = {}, {}

    def make_hook(i):
        def hook(module, inputs, out):
            key = (i, calls.setdefault(i, 0))
            calls[i] += 1
            if key not in deltas:
                deltas[key] = torch.zeros_like(out).requires_grad_()
            norm = out.flatten(1).norm(dim=1).view(-1, *([1] * (out.dim() - 1)))
            return out + norm * deltas[key]

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    opt = None
    for _ in range(steps):
        calls.clear()
        loss = F.cross_entropy(model(x), y)
        if opt is None:
            opt = torch.optim.SGD(list(deltas.values()), lr=lr, weight_decay=wd)
        opt.zero_grad()
        (-loss).backward(inputs=list(deltas.values()))
        opt.step()
    calls.clear()
    out = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    return out


def test_inner_wd_matches_sgd_weight_decay_on_the_deltas():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )
    x, y = torch.randn(6, 10), torch.randint(0, 5, (6,))
    twin = copy.deepcopy(model)
    loss = fm.AllLayerMargin(model, inner_lr=0.5, inner_steps=3, inner_wd=0.7)(x, y)
    ref = _amo_with_weight_decay(twin, [twin[0], twin[2]], x, y, lr=0.5, wd=0.7, steps=3)
    torch.testing.assert_close(loss, ref)
    plain = fm.AllLayerMargin(copy.deepcopy(twin), inner_lr=0.5, inner_steps=3)(x, y)
    assert not torch.allclose(loss, plain)  # the decay changed the deltas
    with pytest.raises(ValueError, match="inner_wd"):
        fm.AllLayerMargin(model, inner_wd=-1.0)


class TupleNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(10, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        z = self.head(h)
        if self.kind == "tuple":
            return z, h
        if self.kind == "dict":
            return {"logits": z, "features": h}
        if self.kind == "attr":
            return type("Out", (), {"logits": z, "hidden": h})()
        return {"scores": z}


@pytest.mark.parametrize("kind", ["tuple", "dict", "attr"])
def test_output_adapters(kind):
    torch.manual_seed(0)
    model = TupleNet(kind)
    x, y = torch.randn(6, 10), torch.randint(0, 5, (6,))
    twin = copy.deepcopy(model)
    twin.kind = "tuple"
    loss = fm.AllLayerMargin(model, inner_lr=0.5)(x, y)
    ref = fm.reference.all_layer_margin_loss(
        nn.Sequential(twin.body, nn.Tanh(), twin.head), [twin.body], x, y, lr=0.5
    )
    torch.testing.assert_close(loss, ref)


def test_output_callable_and_unknown_output():
    torch.manual_seed(0)
    model = TupleNet("other")
    x, y = torch.randn(6, 10), torch.randint(0, 5, (6,))
    with pytest.raises(TypeError, match="no 'logits' tensor; pass output="):
        fm.AllLayerMargin(model)(x, y)
    loss = fm.AllLayerMargin(model, output=lambda out: out["scores"])(x, y)
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="output: expected a callable"):
        fm.AllLayerMargin(model, output="scores")


def test_no_grad_is_a_clear_error():
    model = ResNet()
    x, y = batch()
    amo = fm.AllLayerMargin(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients disabled"):
        amo(x, y)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="gradients disabled"):
        amo(x, y)
    assert amo._mode is None
