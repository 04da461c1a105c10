"""The demo: a quick end-to-end run, the objective registry, the CLI entry points."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import fastmargin as fm
from fastmargin import demo

TINY = dict(epochs=1, width=4, batch_size=128, weight_noise_draws=2, device="cpu")


def test_tiny_run_all_objectives_table_and_plot(tmp_path):
    plot = tmp_path / "margins.png"
    cfg = demo.DemoConfig(**TINY)
    names = ["ce", "maxup-joint", "maxup-select"]
    threads = torch.get_num_threads()
    results = demo.run_demo(names, cfg, progress=False, plot=str(plot))
    assert torch.get_num_threads() == threads  # restored
    assert [r["objective"] for r in results] == names
    for r in results:
        for key in ("clean_acc", "input_noise_acc", "weight_noise_acc", "margin_auc"):
            assert 0.0 <= r[key] <= 1.0
        assert r["sec_per_epoch"] > 0 and r["margins"].shape == (449,)  # 1797 - 1348
    table = demo.format_table(results, cfg)
    assert table.count("\n") == len(names) + 1 and "| maxup-select |" in table
    assert plot.stat().st_size > 1000


def test_ce_reaches_good_accuracy_with_the_default_budget():
    cfg = demo.DemoConfig(device="cpu")
    (r,) = demo.run_demo(["ce"], cfg, progress=False)
    assert r["clean_acc"] >= 0.95
    assert r["input_noise_acc"] < r["clean_acc"]  # the noise level is not vacuous


def test_same_seed_same_initial_model_and_data():
    cfg = demo.DemoConfig(**TINY)
    a = demo.run_demo(["ce"], cfg, progress=False)[0]
    b = demo.run_demo(["ce"], cfg, progress=False)[0]
    assert torch.equal(a["margins"], b["margins"])


def _fake_features(monkeypatch):
    """Plain-PyTorch stand-ins with the DESIGN.md signatures, for the optional objectives."""

    class FakeAllLayerMargin:
        removed = 0

        def __init__(self, model, modules=None, *, inner_lr=0.01, inner_steps=1, loss_fn=None):
            self.model = model

        def __call__(self, x, y):
            return F.cross_entropy(self.model(x), y)

        def remove(self):
            FakeAllLayerMargin.removed += 1

    def radius(h, eps, p=2.0):
        return eps * h.norm(dim=1)

    def robust(z, y, r, **kw):
        sign = 1.0 - 2.0 * F.one_hot(y, z.shape[1]).to(z.dtype)
        return F.cross_entropy(z + r[:, None] * sign, y)

    def noise_worst(z, y, scale, *, k=4, **kw):
        zs = z[None] + scale[None, :, None] * torch.randn(k, *z.shape)
        return fm.reference.worst_of_k_cross_entropy(zs, y, dim=0)

    monkeypatch.setattr(fm, "AllLayerMargin", FakeAllLayerMargin, raising=False)
    monkeypatch.setattr(fm, "weight_perturbation_radius", radius, raising=False)
    monkeypatch.setattr(fm, "weight_robust_cross_entropy", robust, raising=False)
    monkeypatch.setattr(fm, "weight_noise_worst_of_k_cross_entropy", noise_worst, raising=False)
    return FakeAllLayerMargin


def test_optional_objectives_register_when_the_library_has_them(monkeypatch):
    optional = ["amo", "weight-robust", "weight-noise-maxup"]
    base = demo.available_objectives()
    for name in optional:
        assert (name in base) == all(hasattr(fm, a) for a in demo._ALL_OBJECTIVES[name][1])
    fake_amo = _fake_features(monkeypatch)
    registry = demo.available_objectives()
    assert list(registry) == list(demo._ALL_OBJECTIVES)
    results = demo.run_demo(optional, demo.DemoConfig(**TINY), progress=False)
    assert [r["objective"] for r in results] == optional
    assert fake_amo.removed == 1  # the AMO step's hooks are removed after training


def test_unknown_or_unavailable_objective_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="objectives: 'nope' is unknown"):
        demo.run_demo(["nope"], demo.DemoConfig(**TINY), progress=False)
    monkeypatch.delattr(fm, "AllLayerMargin", raising=False)
    with pytest.raises(ValueError, match="not available"):
        demo.run_demo(["amo"], demo.DemoConfig(**TINY), progress=False)


def test_margin_helpers_fallbacks(monkeypatch):
    monkeypatch.delattr(fm, "multiclass_margin", raising=False)
    monkeypatch.delattr(fm, "margin_auc", raising=False)
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    m = demo.margins_of(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(m, torch.tensor([2.0, -3.0]))
    # CDF area on [0, 4]: m=2 covers half the interval, m=-3 all of it.
    assert demo.margin_auc(m, 0.0, 4.0) == pytest.approx((0.5 + 1.0) / 2)


def test_cli_entry_points(tmp_path, capsys):
    parser = demo.add_demo_arguments(argparse.ArgumentParser())
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--objectives",
            "ce",
            "--epochs",
            "1",
            "--no-progress",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert demo.main_demo(args) == 0
    printed = capsys.readouterr().out
    assert "| ce |" in printed
    data = json.loads(out.read_text())
    assert data["results"][0]["objective"] == "ce" and data["config"]["epochs"] == 1
