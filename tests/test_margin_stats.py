"""margin_distribution, margin_auc, weight_norm_product and plot_margin_cdf."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmargin as fm
from fastmargin import reference


def _data(n=23, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _model(d=5, c=4, dropout=0.0):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, c))


def test_margin_distribution_streams_in_loader_order():
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    m = fm.margin_distribution(model, loader)
    with torch.no_grad():
        expect = reference.multiclass_margin(model(x), y)
    assert m.dtype == torch.float32 and m.shape == (23,) and not m.requires_grad
    torch.testing.assert_close(m, expect)
    assert all(p.grad is None for p in model.parameters())


def test_margin_distribution_normalizers():
    x, y = _data()
    model = _model()
    loader = [(x[:10], y[:10]), (x[10:], y[10:], "extra items are ignored")]
    raw = fm.margin_distribution(model, loader)
    prod = model[0].weight.norm() * model[3].weight.norm()
    torch.testing.assert_close(fm.weight_norm_product(model), prod.detach())
    torch.testing.assert_close(
        fm.margin_distribution(model, loader, normalize="weights"), raw / prod
    )
    torch.testing.assert_close(
        fm.margin_distribution(model, loader, normalize=lambda mod: 4.0), raw / 4.0
    )


def test_margin_distribution_eval_mode_and_flags_restored():
    x, y = _data()
    model = _model(dropout=0.9)
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    flags = [mod.training for mod in model.modules()]
    loader = [(x, y)]
    a = fm.margin_distribution(model, loader)
    b = fm.margin_distribution(model, loader)
    assert torch.equal(a, b)  # dropout off
    assert [mod.training for mod in model.modules()] == flags
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(a, reference.multiclass_margin(model(x), y))
    model.train()
    c = fm.margin_distribution(model, loader, eval_mode=False)
    assert not torch.equal(a, c)  # dropout on: the model ran in training mode


def test_margin_distribution_bad_inputs():
    x, y = _data()
    model = _model()
    with pytest.raises(TypeError, match="model"):
        fm.margin_distribution(lambda t: t, [(x, y)])
    with pytest.raises(TypeError, match="loader"):
        fm.margin_distribution(model, [x])
    with pytest.raises(ValueError, match="normalize"):
        fm.margin_distribution(model, [(x, y)], normalize="spectral")
    with pytest.raises(ValueError, match="normalize"):
        fm.margin_distribution(model, [(x, y)], normalize=lambda mod: 0.0)
    with pytest.raises(TypeError, match="normalize"):
        fm.margin_distribution(model, [(x, y)], normalize=3.0)
    with pytest.raises(ValueError, match="normalize"):
        fm.margin_distribution(nn.ReLU(), [(x, y)], normalize="weights")
    with pytest.raises(ValueError, match="model"):
        fm.margin_distribution(nn.Flatten(0), [(x, y)])
    assert fm.margin_distribution(model, []).shape == (0,)


def test_margin_auc_is_the_area_under_the_empirical_cdf():
    m = torch.randn(200, dtype=torch.float64) * 2
    lo, hi = -1.5, 2.5
    grid = torch.linspace(lo, hi, 400001, dtype=torch.float64)
    cdf = (m.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(1)
    area = torch.trapezoid(cdf, grid) / (hi - lo)
    assert fm.margin_auc(m, lo, hi) == pytest.approx(float(area), abs=1e-4)
    assert fm.margin_auc(m.float(), lo, hi) == pytest.approx(float(area), abs=1e-4)


def test_margin_auc_limits():
    m = torch.tensor([0.5, 1.0, 1.5])
    assert fm.margin_auc(m, 2.0, 3.0) == 1.0  # every margin below the range
    assert fm.margin_auc(m, -1.0, 0.0) == 0.0  # every margin above it
    assert fm.margin_auc(m, 0.0, 2.0) == pytest.approx((1.5 + 1.0 + 0.5) / 3 / 2)
    assert fm.margin_auc([0.0, 2.0], 0.0, 2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lo, hi"):
        fm.margin_auc(m, 1.0, 1.0)
    with pytest.raises(ValueError, match="lo, hi"):
        fm.margin_auc(m, 0.0, float("inf"))
    with pytest.raises(ValueError, match="margins"):
        fm.margin_auc(torch.empty(0), 0.0, 1.0)


def test_plot_margin_cdf():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    a, b = torch.randn(50), torch.randn(30) + 1
    ax = fm.plot_margin_cdf({"a": a, "b": b}, lo=-2.0, hi=3.0)
    lines = ax.get_lines()
    assert len(lines) == 2
    xs = torch.as_tensor(lines[1].get_xdata())
    ys = torch.as_tensor(lines[1].get_ydata())
    torch.testing.assert_close(xs.float(), b.sort().values)
    torch.testing.assert_close(ys, torch.arange(1, 31, dtype=torch.float64) / 30)
    assert ax.get_xlim() == (-2.0, 3.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    ax2 = fm.plot_margin_cdf([a], labels=["only"], ax=ax)
    assert ax2 is ax and len(ax.get_lines()) == 3
    with pytest.raises(ValueError, match="labels"):
        fm.plot_margin_cdf([a, b], labels=["one"], ax=ax)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plot_margin_cdf_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="matplotlib"):
        fm.plot_margin_cdf(torch.randn(5))


@pytest.mark.cuda
def test_margin_distribution_on_cuda_model():
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    on_cpu = fm.margin_distribution(model, loader)
    on_gpu = fm.margin_distribution(model.cuda(), loader)  # batches are moved to the model
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
