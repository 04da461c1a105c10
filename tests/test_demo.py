"""The demo: a quick end-to-end run, the objective registry, the CLI entry points."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

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


def test_every_objective_uses_the_library_and_amo_hooks_are_removed(monkeypatch):
    removed = []
    original_remove = fm.AllLayerMargin.remove

    def tracking_remove(self):
        removed.append(self)
        return original_remove(self)

    monkeypatch.setattr(fm.AllLayerMargin, "remove", tracking_remove)
    names = ["amo", "weight-robust", "weight-noise-maxup"]
    assert list(demo.available_objectives()) == list(demo._ALL_OBJECTIVES)
    results = demo.run_demo(names, demo.DemoConfig(**TINY), progress=False)
    assert [r["objective"] for r in results] == names
    assert len(removed) == 1  # the AMO step's hooks are removed after training


def test_unknown_objective_is_a_clear_error():
    with pytest.raises(ValueError, match="objectives: 'nope' is unknown"):
        demo.run_demo(["nope"], demo.DemoConfig(**TINY), progress=False)


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
