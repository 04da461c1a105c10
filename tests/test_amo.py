"""fm.AllLayerMargin (AMO) against a plain-PyTorch hook implementation written here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm

# --- the plain-PyTorch version of AMO (what the library must compute) ---------------------


# --- models --------------------------------------------------------------------------------


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    ).to(dtype)


def cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).to(dtype)


class Shared(nn.Module):
    """A Linear layer applied twice in one forward (one delta per call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(10, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


def data(model_kind, seed=0, B=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 3, 8, 8) if model_kind == "cnn" else (B, 10)
    return torch.randn(shape, generator=g).to(dtype), torch.randint(0, 5, (B,), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn}


def default_layers(model):
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return convs[:-1]


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("steps,lr", [(1, 0.01), (2, 0.5), (3, 0.1)])
def test_matches_plain_hook_implementation(kind, steps, lr):
    model = MODELS[kind]()
    twin = copy.deepcopy(model)
    x, y = data(kind)
    amo = fm.AllLayerMargin(model, inner_lr=lr, inner_steps=steps)
    loss = amo(x, y)
    loss.backward()
    ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=lr, steps=steps)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_channels_last_cnn_matches_plain_hook_implementation():
    model = cnn().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x, y = data("cnn")
    x = x.contiguous(memory_format=torch.channels_last)
    loss = fm.AllLayerMargin(model, inner_lr=0.5, inner_steps=2)(x, y)
    ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=0.5, steps=2)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b)


def test_first_step_runs_no_perturbation_op():
    """From delta = 0 the first ascent step needs no op: only the final forward runs it."""
    model = cnn()
    x, y = data("cnn")
    amo = fm.AllLayerMargin(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        amo(x, y).backward()
    names = [e.name for e in prof.events()]
    assert names.count("fastmargin::all_layer_perturb_fwd") == len(amo.layers)


def test_inplace_op_after_a_layer_falls_back_to_the_op():
    """nn.ReLU(inplace=True) right after a Linear modifies its output in place: dL/du would
    be taken after the ReLU, so that layer goes through the op (with a zero delta)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )
    twin = copy.deepcopy(model)
    x, y = data("mlp")
    amo = fm.AllLayerMargin(model, inner_lr=0.5)
    for _ in range(2):  # the second call uses the op for layer 0 at once
        loss = amo(x, y)
        ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=0.5)
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
        for a, b in zip(_grads(model), _grads(twin)):
            torch.testing.assert_close(a, b)
    assert amo._no_capture == {0}


def test_frozen_first_layer():
    """A layer whose output needs no gradient (frozen weights, plain input) still gets its
    delta (through the op)."""
    model = cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    twin = copy.deepcopy(model)
    x, y = data("cnn")
    loss = fm.AllLayerMargin(model, inner_lr=0.5)(x, y)
    ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=0.5)
    torch.testing.assert_close(loss, ref)


def test_shared_layer_gets_a_delta_per_call():
    model = Shared()
    twin = copy.deepcopy(model)
    x, y = data("mlp")
    loss = fm.AllLayerMargin(model, inner_lr=0.3, inner_steps=2)(x, y)
    ref = fm.reference.all_layer_margin_loss(twin, [twin.inp, twin.mid], x, y, lr=0.3, steps=2)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("seed", range(4))
def test_perturbed_loss_is_at_least_clean_loss(kind, seed):
    model = MODELS[kind](seed, torch.float64)
    x, y = data(kind, seed, dtype=torch.float64)
    frozen = copy.deepcopy(model)
    clean = F.cross_entropy(frozen(x), y)
    loss = fm.AllLayerMargin(model)(x, y)
    assert loss.item() > clean.item()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ascent_leaves_param_grad_untouched(kind):
    model = MODELS[kind]()
    x, y = data(kind)
    params = list(model.parameters())
    sentinels = {}
    for i, p in enumerate(params):
        if i % 2 == 0:
            p.grad = torch.full_like(p, float(i))
            sentinels[i] = p.grad.clone()
    computed = []
    handles = [p.register_hook(lambda g, i=i: computed.append(i)) for i, p in enumerate(params)]
    amo = fm.AllLayerMargin(model, inner_steps=3)
    loss = amo(x, y)
    assert computed == []  # no parameter gradient was even computed by the ascent
    for i, p in enumerate(params):
        if i in sentinels:
            assert torch.equal(p.grad, sentinels[i])
        else:
            assert p.grad is None
    loss.backward()
    assert sorted(computed) == list(range(len(params)))
    for h in handles:
        h.remove()


@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize("steps", [1, 2])
def test_batchnorm_running_stats(freeze, steps):
    model = cnn()
    twin = copy.deepcopy(model)
    x, y = data("cnn")
    amo = fm.AllLayerMargin(model, inner_lr=0.2, inner_steps=steps, freeze_bn_stats=freeze)
    amo(x, y)
    fm.reference.all_layer_margin_loss(
        twin, default_layers(twin), x, y, lr=0.2, steps=steps, freeze_bn=freeze
    )
    bn = model[1]
    assert bn.num_batches_tracked.item() == (1 if freeze else 1 + steps)
    assert bn.track_running_stats  # restored after the ascent
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_eval_mode_model_keeps_running_stats():
    model = cnn().eval()
    before = copy.deepcopy(model.state_dict())
    x, y = data("cnn")
    fm.AllLayerMargin(model)(x, y).backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_autocast_bfloat16_cpu(kind):
    model = MODELS[kind]()
    twin = copy.deepcopy(model)
    x, y = data(kind)
    seen = []
    amo = fm.AllLayerMargin(model, inner_lr=0.5)
    # Registered after AMO's hook, so it sees the perturbed output.
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = amo(x, y)
        ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=0.5)
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    ref.backward()
    for a, b in zip(_grads(model), _grads(twin)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_remove_restores_the_model_exactly():
    model = cnn().eval()
    x, y = data("cnn")
    before_out = model(x)
    before_state = copy.deepcopy(model.state_dict())
    n_hooks = _hook_count(model)
    amo = fm.AllLayerMargin(model)
    assert _hook_count(model) == n_hooks  # the default layers are chosen at the first call
    amo.trace(x)
    assert _hook_count(model) == n_hooks + 2
    torch.testing.assert_close(model(x), before_out)  # hooks are inert outside a call
    amo(x, y)
    amo.remove()
    assert _hook_count(model) == n_hooks
    assert torch.equal(model(x), before_out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k])
    with pytest.raises(RuntimeError, match="removed"):
        amo(x, y)
    amo.close()  # an alias of remove(), idempotent
    with fm.AllLayerMargin(model, ["0", "3"]) as amo2:
        amo2(x, y)
        assert _hook_count(model) == n_hooks + 2
    assert _hook_count(model) == n_hooks


def test_hooks_clean_after_an_error_in_the_loss():
    model = mlp()
    x, y = data("mlp")

    def broken(logits, target):
        raise ArithmeticError("boom")

    amo = fm.AllLayerMargin(model, loss_fn=broken)
    with pytest.raises(ArithmeticError):
        amo(x, y)
    assert amo._mode is None  # a failed call leaves the hooks inert
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))


def test_inner_steps_zero_is_the_clean_loss():
    model = cnn()
    x, y = data("cnn")
    twin = copy.deepcopy(model)
    loss = fm.AllLayerMargin(model, inner_steps=0)(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(twin(x), y))


def test_custom_loss_fn():
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = data("mlp")

    def loss_fn(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum")

    loss = fm.AllLayerMargin(model, loss_fn=loss_fn, inner_lr=0.05)(x, y)
    assert loss > loss_fn(twin(x), y)


def test_module_selection():
    model = cnn()
    amo = fm.AllLayerMargin(model)
    with pytest.raises(RuntimeError, match="call amo.trace"):
        _ = amo.layer_names
    assert amo.trace(data("cnn")[0]) == ["0", "3"]  # every Conv/Linear but the last one run
    amo.remove()
    amo = fm.AllLayerMargin(model, ["2", model[8]])
    assert amo.layer_names == ["2", "8"]
    amo.remove()
    amo = fm.AllLayerMargin(model, lambda name, m: isinstance(m, nn.BatchNorm2d))
    assert amo.layer_names == ["1", "4"]
    amo.remove()
    with pytest.raises(ValueError, match="modules: the model has no submodule named 'nope'"):
        fm.AllLayerMargin(model, ["nope"])
    with pytest.raises(ValueError, match="modules: Linear module is not a submodule"):
        fm.AllLayerMargin(model, [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="modules: expected modules or module names"):
        fm.AllLayerMargin(model, [3])
    with pytest.raises(ValueError, match="modules: no layers were selected"):
        fm.AllLayerMargin(model, lambda n, m: False)
    with pytest.raises(ValueError, match="modules: the model's forward runs no Conv or Linear"):
        fm.AllLayerMargin(nn.Sequential(nn.Linear(3, 2))).trace(torch.randn(2, 3))
    assert _hook_count(model) == 0


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="inner_lr"):
        fm.AllLayerMargin(model, inner_lr=-1.0)
    with pytest.raises(ValueError, match="inner_lr"):
        fm.AllLayerMargin(model, inner_lr=float("nan"))
    with pytest.raises(TypeError, match="inner_lr"):
        fm.AllLayerMargin(model, inner_lr="0.1")
    with pytest.raises(ValueError, match="inner_steps"):
        fm.AllLayerMargin(model, inner_steps=-1)
    with pytest.raises(TypeError, match="inner_steps"):
        fm.AllLayerMargin(model, inner_steps=1.5)
    with pytest.raises(TypeError, match="loss_fn"):
        fm.AllLayerMargin(model, loss_fn=3)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        fm.AllLayerMargin(lambda x: x)
    assert _hook_count(model) == 0


def test_layer_returning_a_tuple_is_rejected():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(10, 5)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    net = Net()
    x, y = data("mlp")
    with pytest.raises(TypeError, match="layer 'pair' returned tuple"):
        fm.AllLayerMargin(net, ["pair"])(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_matches_plain_hook_implementation(kind, autocast):
    model = MODELS[kind]().cuda()
    if kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x, y = data(kind)
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = fm.AllLayerMargin(model, inner_lr=0.5, inner_steps=2)(x, y)
        ref = fm.reference.all_layer_margin_loss(twin, default_layers(twin), x, y, lr=0.5, steps=2)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref, **tol)
    loss.backward()
    ref.backward()
    gtol = dict(rtol=5e-2, atol=5e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b, **gtol)


# (DistributedDataParallel: tests/test_ddp.py runs AMO in 2 gloo processes.)


# --- training check ------------------------------------------------------------------------


@pytest.mark.slow
def test_amo_trains_on_digits():
    """AMO on scikit-learn's 8x8 digits (shipped with sklearn) reaches > 90 % test accuracy."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    amo = fm.AllLayerMargin(model, inner_lr=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a loaded CI machine
    try:
        _train(model, amo, opt, X, y, train, g)
    finally:
        torch.set_num_threads(threads)
    amo.remove()
    model.eval()
    with torch.no_grad():
        acc = (model(X[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9, acc


def _train(model, amo, opt, X, y, train, g):
    for _epoch in range(8):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad(set_to_none=True)
            amo(X[idx], y[idx]).backward()
            opt.step()
