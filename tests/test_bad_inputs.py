"""Every input error of worst_of_k_cross_entropy raises a clear Python exception naming the
argument, and leaves the inputs unchanged."""

from __future__ import annotations

import pytest
import torch

import fastmargin as fm


def good_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 6, generator=gen), torch.randint(0, 6, (4,), generator=gen)


CASES = [
    # (description, change to (logits, target, kwargs), exception type, message fragment)
    ("2-D logits", lambda x, t, kw: (x[:, 0], t, kw), ValueError, "logits: expected a 3-D"),
    ("4-D logits", lambda x, t, kw: (x[None], t, kw), ValueError, "logits: expected a 3-D"),
    ("int logits", lambda x, t, kw: (x.long(), t, kw), TypeError, "logits: expected a floating"),
    ("list logits", lambda x, t, kw: (x.tolist(), t, kw), TypeError, "logits: expected a torch"),
    ("k = 0", lambda x, t, kw: (x[:, :0], t, kw), ValueError, "k = 0"),
    # No classes: every class index is out of range, as in F.cross_entropy.
    ("C = 0", lambda x, t, kw: (x[..., :0], t, kw), IndexError, "out of range for 0 classes"),
    ("short target", lambda x, t, kw: (x, t[:3], kw), ValueError, "target: expected shape (4,)"),
    ("2-D target", lambda x, t, kw: (x, t[:, None], kw), ValueError, "target: expected shape"),
    ("float target", lambda x, t, kw: (x, t.float(), kw), TypeError, "target: expected an integer"),
    ("bool target", lambda x, t, kw: (x, t > 2, kw), TypeError, "target: expected an integer"),
    ("target too big", lambda x, t, kw: (x, t + 6, kw), IndexError, "target: value"),
    ("negative target", lambda x, t, kw: (x, t - 7, kw), IndexError, "out of range"),
    (
        "target on another device",
        lambda x, t, kw: (x, t.to("meta"), kw),
        RuntimeError,
        "target: expected a tensor on cpu",
    ),
    ("bad dim", lambda x, t, kw: (x, t, {**kw, "dim": 2}), ValueError, "dim: expected 0"),
    (
        "negative temperature",
        lambda x, t, kw: (x, t, {**kw, "temperature": -0.1}),
        ValueError,
        "temperature",
    ),
    (
        "NaN temperature",
        lambda x, t, kw: (x, t, {**kw, "temperature": float("nan")}),
        ValueError,
        "temperature",
    ),
    (
        "tensor temperature",
        lambda x, t, kw: (x, t, {**kw, "temperature": torch.tensor(1.0)}),
        TypeError,
        "temperature: expected a float",
    ),
    (
        "label_smoothing > 1",
        lambda x, t, kw: (x, t, {**kw, "label_smoothing": 1.5}),
        ValueError,
        "label_smoothing",
    ),
    (
        "negative label_smoothing",
        lambda x, t, kw: (x, t, {**kw, "label_smoothing": -0.5}),
        ValueError,
        "label_smoothing",
    ),
    ("bad reduction", lambda x, t, kw: (x, t, {**kw, "reduction": "avg"}), ValueError, "reduction"),
    (
        "float ignore_index",
        lambda x, t, kw: (x, t, {**kw, "ignore_index": 1.5}),
        TypeError,
        "ignore_index",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error_and_leaves_inputs_unchanged(case):
    _name, change, exc, fragment = case
    logits, target = good_inputs()
    logits_before, target_before = logits.clone(), target.clone()
    x, t, kw = change(logits, target, {})
    snapshot = [a.clone() for a in (x, t) if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fm.worst_of_k_cross_entropy(x, t, **{"dim": 1, **kw})
    after = [a for a in (x, t) if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
    for before, now in zip(snapshot, after):
        assert torch.equal(before, now)
    assert torch.equal(logits, logits_before) and torch.equal(target, target_before)


def test_validation_can_be_switched_off_and_on():
    logits, target = good_inputs()
    target[0] = 99
    fm.set_validation(False)
    assert not fm.validation_enabled()
    loss = fm.worst_of_k_cross_entropy(logits, target, dim=1, reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    fm.set_validation(True)
    with pytest.raises(IndexError, match="target"):
        fm.worst_of_k_cross_entropy(logits, target, dim=1)


def test_env_var_disables_validation_at_import():
    import subprocess
    import sys

    code = "import fastmargin as fm; print(fm.validation_enabled())"
    env = {"FASTMARGIN_VALIDATE": "0", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"


def test_raw_op_rejects_bad_shapes_with_runtime_error():
    """Direct torch.ops calls are checked in C++ too (no crash, a message naming the arg)."""
    logits, target = good_inputs()
    with pytest.raises(RuntimeError, match="logits: expected a 3-D"):
        torch.ops.fastmargin.worst_of_k_ce_fwd(logits[:, 0], target, None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="target: expected shape"):
        torch.ops.fastmargin.worst_of_k_ce_fwd(logits, target[:2], None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="target: expected int64"):
        torch.ops.fastmargin.worst_of_k_ce_fwd(logits, target.int(), None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="radius: expected shape"):
        torch.ops.fastmargin.worst_of_k_ce_fwd(logits, target, torch.ones(3), 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="class dim must be contiguous"):
        torch.ops.fastmargin.worst_of_k_ce_fwd(logits.transpose(1, 2), target, None, 0.0, 0.0, -100)
