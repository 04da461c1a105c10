"""fm.HeadLoss and the head-wrapping forms of the weight-perturbation losses (one process;
the DDP checks are in test_ddp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from _resnets import ResNet
from torch import nn

import fastmargin as fm


def _features(net, x):
    o = net.relu(net.bn1(net.conv1(x)))
    return torch.flatten(net.avgpool(net.layer2(net.layer1(o))), 1)


def _setup(seed=0):
    torch.manual_seed(seed)
    net = ResNet(widths=(4, 8))
    g = torch.Generator().manual_seed(seed)
    return net, torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


@pytest.mark.parametrize("compiled", [False, True])
def test_head_loss_equals_the_loss_on_the_model_features(compiled):
    net, x, y = _setup()
    twin = copy.deepcopy(net)
    model = torch.compile(net, backend="aot_eager") if compiled else net
    step = fm.HeadLoss(model, fm.WeightRobustCrossEntropy(net.fc, eps=0.3, p=2.0))
    loss, logits = step(x, y, return_logits=True)
    h = _features(twin, x)
    ref = fm.weight_robust_cross_entropy(twin.fc(h), y, fm.weight_perturbation_radius(h, 0.3, 2.0))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits, twin.fc(h))
    loss.backward()
    ref.backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert repr(step).startswith("HeadLoss(head='fc'")


def test_weight_noise_module_wraps_the_last_linear():
    net, x, y = _setup()
    h = _features(net, x).detach().requires_grad_()
    crit = fm.WeightNoiseWorstOfKCrossEntropy(net.fc, eps=0.2, k=3)
    loss, index = crit(h, y, return_index=True, generator=torch.Generator().manual_seed(5))
    ref, ref_index = fm.weight_noise_worst_of_k_cross_entropy(
        net.fc(h),
        y,
        fm.weight_perturbation_radius(h, 0.2, 2.0),
        k=3,
        return_index=True,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(loss, ref)
    assert torch.equal(index, ref_index)
    # the head-wrapping helper gives the same draw
    step = fm.HeadLoss(net, crit)
    loss2 = step(x, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss2, ref)
    with pytest.raises(ValueError, match="scale: not accepted"):
        crit(h, y, 0.5)
    with pytest.raises(ValueError, match="scale: required"):
        fm.WeightNoiseWorstOfKCrossEntropy(k=2)(net.fc(h), y)
    assert "eps=0.2" in repr(crit)


@pytest.mark.parametrize(
    "crit",
    [
        lambda fc: fm.WeightRobustCrossEntropy(fc, eps=0.1),
        lambda fc: fm.WeightNoiseWorstOfKCrossEntropy(fc, eps=0.1),
    ],
)
def test_logits_passed_as_features_is_a_clear_error(crit):
    net, x, y = _setup()
    logits = net(x)
    loss_fn = crit(net.fc)
    with pytest.raises(ValueError, match=r"features: .*\(these look like the logits"):
        loss_fn(logits, y)
    with pytest.raises(ValueError, match=r"features: expected \(N, 8\) inputs"):
        loss_fn(torch.randn(6, 3), y)


def test_head_loss_arguments():
    net, x, y = _setup()
    with pytest.raises(ValueError, match="head: required when loss_fn wraps no nn.Linear"):
        fm.HeadLoss(net, fm.WeightRobustCrossEntropy(eps=0.1))
    with pytest.raises(ValueError, match="head: 'layer1.0.conv1' is not the nn.Linear"):
        fm.HeadLoss(net, fm.WeightRobustCrossEntropy(net.fc, eps=0.1), "layer1.0.conv1")
    with pytest.raises(ValueError, match="head: the model has no submodule named 'head'"):
        fm.HeadLoss(net, fm.WeightRobustCrossEntropy(eps=0.1), "head")
    with pytest.raises(TypeError, match="loss_fn: expected a loss with head_loss"):
        fm.HeadLoss(net, nn.CrossEntropyLoss(), "fc")
    unused = nn.Linear(8, 5)
    net.extra = unused
    step = fm.HeadLoss(net, fm.WeightRobustCrossEntropy(unused, eps=0.1))
    with pytest.raises(RuntimeError, match="head: 'extra' did not run"):
        step(x, y)
    step.remove()
    assert not unused._forward_hooks
    with pytest.raises(RuntimeError, match="hook was removed"):
        step(x, y)


def test_head_loss_by_name_with_an_unwrapped_loss():
    net, x, y = _setup()
    twin = copy.deepcopy(net)
    loss = fm.HeadLoss(net, fm.WeightRobustCrossEntropy(eps=0.3), "fc")(x, y)
    ref = fm.HeadLoss(twin, fm.WeightRobustCrossEntropy(twin.fc, eps=0.3))(x, y)
    torch.testing.assert_close(loss, ref)
