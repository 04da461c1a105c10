"""fm.MaxUp: selection, gradients, layout, BatchNorm semantics, soft targets, bad inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm

D, C = 5, 7


class Replay:
    """A 'random' augmentation with known outputs: call j returns x + noise[j]."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise = noise
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.noise[self.calls % len(self.noise)]
        self.calls += 1
        return out


class ReplaySoft(Replay):
    """Replay with per-copy soft targets (as CutMix would return)."""

    takes_target = True

    def __init__(self, noise: torch.Tensor, probs: torch.Tensor) -> None:
        super().__init__(noise)
        self.probs = probs

    def __call__(self, x, y):
        j = self.calls % len(self.noise)
        return super().__call__(x), self.probs[j]


def mlp(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, C)]
    return nn.Sequential(*layers).double()


def batch(B: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    noise = torch.randn(k, B, D, generator=g, dtype=torch.float64)
    return x, y, noise


def candidates(x, noise, include_clean):
    cands = [x + n for n in noise]
    return [x] + cands if include_clean else cands


def brute_force_index(model, cands, y):
    """Per sample, per candidate, one forward of that single copy: the worst copy's index."""
    idx = []
    with torch.no_grad():
        for b in range(y.shape[0]):
            losses = [F.cross_entropy(model(c[b : b + 1]), y[b : b + 1]) for c in cands]
            idx.append(int(torch.stack(losses).argmax()))
    return torch.tensor(idx)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["joint", "select"])
@pytest.mark.parametrize("include_clean", [False, True])
@pytest.mark.parametrize("B,k", [(1, 3), (6, 4), (9, 1)])
def test_selects_brute_force_worst_copy(mode, include_clean, B, k):
    # A batch viewed sample-major ((B, K, C) instead of (K, B, C)) would pair copies with the
    # wrong samples; the brute-force loop forwards every (sample, copy) pair on its own.
    model = mlp()
    x, y, noise = batch(B, k)
    step = fm.MaxUp(model, Replay(noise), k=k, mode=mode, include_clean=include_clean)
    _, index = step(x, y, return_index=True)
    expected = brute_force_index(model, candidates(x, noise, include_clean), y)
    assert torch.equal(index, expected)


def test_copy_major_layout():
    B, k = 3, 4
    x = torch.arange(B, dtype=torch.float64).view(B, 1).expand(B, D).contiguous()
    noise = (1000.0 * torch.arange(1, k + 1, dtype=torch.float64)).view(k, 1, 1).expand(k, B, D)
    step = fm.MaxUp(mlp(), Replay(noise), k=k, include_clean=True)
    xs, targets = step.make_copies(x, torch.zeros(B, dtype=torch.long))
    assert xs.shape == ((k + 1) * B, D) and targets == [None] * (k + 1)
    for j in range(k + 1):
        for b in range(B):
            assert torch.all(xs[j * B + b] == b + 1000.0 * j)  # row j*B + b: copy j, sample b


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.5},
        {"label_smoothing": 0.1},
        {"include_clean": True, "temperature": 2.0},
        {"ignore_index": 3},
    ],
)
def test_joint_gradient_matches_reference(kwargs):
    B, k = 8, 4
    x, y, noise = batch(B, k, seed=2)
    if "ignore_index" in kwargs:
        y[::3] = kwargs["ignore_index"]
    model = mlp(seed=3)
    ref_model = copy.deepcopy(model)

    loss = fm.MaxUp(model, Replay(noise), k=k, **kwargs)(x, y)
    loss.backward()

    include_clean = kwargs.pop("include_clean", False)
    cands = torch.cat(candidates(x, noise, include_clean))
    logits = ref_model(cands).view(len(cands) // B, B, C)
    ref = fm.reference.worst_of_k_cross_entropy(logits, y, dim=0, **kwargs)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_select_gradient_equals_training_on_selected(bn, label_smoothing):
    B, k = 8, 4
    x, y, noise = batch(B, k, seed=4)
    model = mlp(bn=bn, seed=5)
    ref_model = copy.deepcopy(model)
    step = fm.MaxUp(model, Replay(noise), k=k, mode="select", label_smoothing=label_smoothing)
    loss, index = step(x, y, return_index=True)
    loss.backward()

    x_sel = torch.stack([x[b] + noise[index[b], b] for b in range(B)])
    ref = F.cross_entropy(ref_model(x_sel), y, label_smoothing=label_smoothing)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, r)
    # The selection pass leaves BatchNorm's running statistics alone: one update per step.
    for a, b in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b)


def test_bn_modes_select_like_joint_and_flags_restored():
    B, k = 10, 4
    x, y, noise = batch(B, k, seed=6)
    model = mlp(bn=True, seed=7)
    _, joint_index = fm.MaxUp(model, Replay(noise), k=k)(x, y, return_index=True)
    _, select_index = fm.MaxUp(model, Replay(noise), k=k, mode="select")(x, y, return_index=True)
    assert torch.equal(joint_index, select_index)  # both normalise over the K*B copies

    step = fm.MaxUp(model, Replay(noise), k=k, mode="select", eval_bn_for_selection=True)
    _, eval_index = step(x, y, return_index=True)
    bn = model[1]
    assert bn.training and bn.track_running_stats
    model.eval()
    assert torch.equal(eval_index, brute_force_index(model, candidates(x, noise, False), y))


def test_in_place_augmentation_gives_distinct_copies_and_keeps_input():
    B, k = 4, 3
    x, y, _ = batch(B, k)
    x0 = x.clone()

    def in_place(t):
        return t.add_(torch.randn_like(t))

    class SharedBuffer:  # returns the same output tensor on every call
        def __init__(self):
            self.out = None

        def __call__(self, t):
            if self.out is None:
                self.out = torch.empty_like(t)
            return torch.add(t, torch.randn_like(t), out=self.out)

    for aug in (in_place, SharedBuffer()):
        step = fm.MaxUp(mlp(), aug, k=k)
        xs, _ = step.make_copies(x, y)
        copies = xs.view(k, B, D)
        for i in range(k):
            for j in range(i + 1, k):
                assert not torch.equal(copies[i], copies[j])
        step(x, y).backward()
        assert torch.equal(x, x0)


def test_deterministic_augmentation_warns_once():
    x, y, _ = batch(4, 2)
    step = fm.MaxUp(mlp(), lambda t: t.flip(-1), k=2, include_clean=True)
    with pytest.warns(RuntimeWarning, match="identical"):
        step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(x, y)  # checked once per MaxUp
        fm.MaxUp(mlp(), fm.augment.gaussian(0.1), k=2)(x, y)  # a random one does not warn


@pytest.mark.parametrize("mode", ["joint", "select"])
@pytest.mark.parametrize("include_clean", [False, True])
def test_soft_targets(mode, include_clean):
    B, k = 6, 3
    x, y, noise = batch(B, k, seed=8)
    probs = torch.softmax(torch.randn(k, B, C, dtype=torch.float64), dim=-1)
    model = mlp(seed=9)
    ref_model = copy.deepcopy(model)
    temperature = 0.7 if mode == "joint" else 0.0
    step = fm.MaxUp(
        model,
        ReplaySoft(noise, probs),
        k=k,
        mode=mode,
        temperature=temperature,
        label_smoothing=0.1,
        include_clean=include_clean,
    )
    loss, index = step(x, y, return_index=True)
    loss.backward()

    cands = candidates(x, noise, include_clean)
    targets = ([F.one_hot(y, C).double()] if include_clean else []) + list(probs)
    per_copy = torch.stack(
        [
            F.cross_entropy(ref_model(c), t, label_smoothing=0.1, reduction="none")
            for c, t in zip(cands, targets)
        ]
    )  # (K, B), one forward per candidate
    assert torch.equal(index, per_copy.argmax(dim=0))
    if mode == "joint":
        K = len(cands)
        ref = (
            temperature
            * (
                torch.logsumexp(per_copy / temperature, 0)
                - torch.log(torch.tensor(float(K), dtype=torch.float64))
            )
        ).mean()
    else:
        rows = torch.arange(B)
        x_sel = torch.stack(cands)[index, rows]
        t_sel = torch.stack(targets)[index, rows]
        ref = F.cross_entropy(ref_model(x_sel), t_sel, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    for g, r in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("mode", ["joint", "select"])
@pytest.mark.parametrize("aug", ["cutmix", "mixup"])
def test_builtin_mixing_augmentations_train(mode, aug):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, C)
    )
    x = torch.randn(5, 2, 6, 6)
    y = torch.randint(0, C, (5,))
    augment = getattr(fm.augment, aug)(1.0, num_classes=C)
    loss = fm.MaxUp(model, augment, k=3, mode=mode)(x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_close_to_float32():
    B, k = 8, 4
    x, y, noise = batch(B, k, seed=10)
    model = mlp(seed=11).float()
    x, noise = x.float(), noise.float()
    ref = fm.MaxUp(model, Replay(noise), k=k)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fm.MaxUp(model, Replay(noise), k=k)(x, y)
    assert loss.dtype == torch.float32  # as F.cross_entropy under autocast
    torch.testing.assert_close(loss.float(), ref, atol=0.05, rtol=0.02)


def test_bad_arguments():
    model = mlp()
    aug = Replay(torch.zeros(1, 2, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="k:"):
        fm.MaxUp(model, aug, k=0)
    with pytest.raises(ValueError, match="mode:"):
        fm.MaxUp(model, aug, mode="both")
    with pytest.raises(ValueError, match="temperature:"):
        fm.MaxUp(model, aug, mode="select", temperature=1.0)
    with pytest.raises(ValueError, match="temperature:"):
        fm.MaxUp(model, aug, temperature=-1.0)
    with pytest.raises(ValueError, match="label_smoothing:"):
        fm.MaxUp(model, aug, label_smoothing=1.5)
    with pytest.raises(TypeError, match="augment:"):
        fm.MaxUp(model, "flip")


def test_bad_inputs_leave_them_unchanged():
    B = 2
    x, y, noise = batch(B, 2)
    x0, y0 = x.clone(), y.clone()
    step = fm.MaxUp(mlp(), Replay(noise), k=2)
    with pytest.raises(ValueError, match="y:"):
        step(x, y[:1])
    with pytest.raises(TypeError, match="y:"):
        step(x, y.double())
    with pytest.raises(ValueError, match="x:"):
        step(x[:0], y[:0])
    with pytest.raises(IndexError, match="target:"):
        step(x, torch.tensor([0, C]))
    with pytest.raises(ValueError, match="augment:"):
        fm.MaxUp(mlp(), lambda t: t[:1], k=2)(x, y)
    with pytest.raises(TypeError, match="augment:"):
        fm.MaxUp(mlp(), lambda t: (t, y, y), k=2)(x, y)
    with pytest.raises(ValueError, match="augment: copy 1 is torch.float32"):
        fm.MaxUp(mlp(), lambda t: t.float(), k=2, include_clean=True)(x, y)
    with pytest.raises(RuntimeError, match="model:"):
        fm.MaxUp(lambda t: t.sum(1), Replay(noise), k=2)(x, y)
    bad_soft = fm.augment.with_target(
        lambda t, lab: (torch.randn_like(t), torch.full((B, C + 1), 0.1))
    )
    with pytest.raises(ValueError, match="soft targets"):
        fm.MaxUp(mlp(), bad_soft, k=2)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["joint", "select"])
def test_cuda_matches_cpu(mode):
    B, k = 16, 4
    x, y, noise = batch(B, k, seed=12)
    model = mlp(bn=True, seed=13).float()
    cuda_model = copy.deepcopy(model).cuda()
    x, noise = x.float(), noise.float()
    loss, index = fm.MaxUp(model, Replay(noise), k=k, mode=mode)(x, y, return_index=True)
    loss.backward()
    loss_c, index_c = fm.MaxUp(cuda_model, Replay(noise.cuda()), k=k, mode=mode)(
        x.cuda(), y.cuda(), return_index=True
    )
    loss_c.backward()
    torch.testing.assert_close(loss_c.cpu(), loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(index_c.cpu(), index)
    for g, r in zip(grads(cuda_model), grads(model)):
        torch.testing.assert_close(g.cpu(), r, atol=1e-5, rtol=1e-4)
