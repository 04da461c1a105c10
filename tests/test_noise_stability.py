"""fm.noise_stability against a manual layer-by-layer computation with the same noise draws."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastmargin as fm


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


def manual_stability(seq, x, chosen, sigma, trials, seed):
    """Mean/std table computed by running the nn.Sequential by hand: noise of norm exactly
    sigma * ||x_i,b|| (a normalised Gaussian draw, in the library's draw order) added after
    layer i, then ||x~_j - x_j|| / ||x_j|| per example at every later chosen layer and the
    output."""
    g = torch.Generator().manual_seed(seed)

    def run(inject=None):
        acts, h = {}, x
        for idx, m in enumerate(seq):
            h = m(h)
            if idx == inject:
                xi = torch.randn(h.shape, generator=g)
                xi_n = xi.reshape(h.shape[0], -1).norm(dim=1)
                h_n = h.reshape(h.shape[0], -1).norm(dim=1)
                scale = (sigma * h_n / xi_n).view((-1,) + (1,) * (h.dim() - 1))
                h = h + scale * xi
            acts[idx] = h
        return acts, h

    def rel(a, b):
        a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        return (a - b).norm(dim=1) / b.norm(dim=1)

    with torch.no_grad():
        clean, out = run()
        L = len(chosen)
        mean = torch.full((L, L + 1), math.nan, dtype=torch.float64)
        std = mean.clone()
        for r, i in enumerate(chosen):
            cols = [[] for _ in range(L + 1)]
            for _ in range(trials):
                acts, o = run(i)
                for c in range(r + 1, L):
                    cols[c].append(rel(acts[chosen[c]], clean[chosen[c]]))
                cols[L].append(rel(o, out))
            for c in range(r + 1, L + 1):
                s = torch.cat(cols[c])
                mean[r, c], std[r, c] = s.mean(), s.std()
    return mean, std


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_manual_computation(kind):
    model = mlp() if kind == "mlp" else cnn()
    x = torch.randn(
        (5, 12) if kind == "mlp" else (5, 2, 6, 6), generator=torch.Generator().manual_seed(2)
    )
    model.eval()
    chosen = [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    res = fm.noise_stability(
        model, x, sigma=0.2, trials=4, generator=torch.Generator().manual_seed(5)
    )
    mean, std = manual_stability(model, x, chosen, 0.2, 4, seed=5)
    assert res.layers == [str(i) for i in chosen]
    assert res.targets == res.layers + ["output"]
    assert (res.sigma, res.trials, res.examples) == (0.2, 4, 5)
    torch.testing.assert_close(res.mean, mean, rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(res.std, std, rtol=1e-3, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_orthogonal_layers_preserve_the_relative_noise(device):
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        lin = nn.Linear(8, 8, bias=False)
        nn.init.orthogonal_(lin.weight)
        layers.append(lin)
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(6, 8, device=device)
    res = fm.noise_stability(model, x, layers=["0", "1"], sigma=0.05, trials=3)
    # Orthogonal maps keep norms: every later layer sees exactly the injected relative size.
    for i in range(2):
        for j in range(i + 1, 3):
            assert res.mean[i, j].item() == pytest.approx(0.05, rel=1e-5)
            assert res.std[i, j].item() == pytest.approx(0.0, abs=1e-6)
        for j in range(i + 1):
            assert math.isnan(res.mean[i, j])


def test_table_and_model_left_unchanged():
    model = cnn().train()
    before = copy.deepcopy(model.state_dict())
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    x = torch.randn(4, 2, 6, 6)
    res = fm.noise_stability(model, x, trials=2)
    assert all(m.training for m in model.modules())  # training flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: no running-stat updates
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    text = str(res)
    assert "sigma=0.1" in text and "output" in text and "±" in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(res.layers)
    assert lines[2].startswith("0 ") and "-" in lines[2] and lines[3].startswith("3 ")


def test_uses_the_fused_perturbation_op():
    model = mlp()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fm.noise_stability(model, torch.randn(3, 12), trials=1)
    names = [e.name for e in prof.events()]
    assert names.count("fastmargin::all_layer_perturb_fwd") == 3  # one per injection layer


def test_examples_with_zero_activation_are_left_out():
    """An all-zero example has ||x_j|| = 0 everywhere (bias-free layers): its 0/0 ratios are
    left out, so the orthogonal layers give exactly sigma with no NaN."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4, bias=False) for _ in range(3)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight)
    model = nn.Sequential(*layers)
    x = torch.randn(3, 4)
    x[1] = 0.0
    res = fm.noise_stability(model, x, sigma=0.3, trials=2)
    for j in (1, 2):  # the second layer and the output
        assert res.mean[0, j].item() == pytest.approx(0.3, rel=1e-5)
        assert res.std[0, j].item() == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments():
    model = mlp()
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="sigma"):
        fm.noise_stability(model, x, sigma=0.0)
    with pytest.raises(TypeError, match="sigma"):
        fm.noise_stability(model, x, sigma="1")
    with pytest.raises(ValueError, match="trials"):
        fm.noise_stability(model, x, trials=0)
    with pytest.raises(TypeError, match="trials"):
        fm.noise_stability(model, x, trials=2.0)
    with pytest.raises(ValueError, match="layers: the model has no submodule named 'x'"):
        fm.noise_stability(model, x, layers=["x"])

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(12, 12)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match=r"layers: \['unused'\] did not run"):
        fm.noise_stability(Skip(), x, layers=["unused"])
