"""The training helpers under DistributedDataParallel: 2 gloo processes on the CPU.

One test spawns the 2 processes once (starting them costs more than the checks) and runs
every group of checks in them; the process groups have short collective timeouts and the
test a join deadline, so a hang fails in seconds."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import warnings

import pytest
import torch
from _resnets import ResNet

import fastmargin as fm

WORLD = 2
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, group: str, timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        GROUPS[group](rank)
    finally:
        dist.destroy_process_group()


def _spawn(group: str, *, collective_timeout_s: float = 30.0, deadline_s: float = 120.0) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), group, collective_timeout_s),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{group}: the 2-process DDP run did not finish in {deadline_s} s")


# --- helpers run inside the processes -------------------------------------------------------


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ResNet(widths=(4, 8))


def _batch(rank: int, step: int = 0, B: int = 6):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 5, (B,), generator=g)


def _assert_replicas_identical(model: torch.nn.Module, what: str) -> None:
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten() for p in fm._layers.unwrap(model).parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"{what}: the replicas' parameters differ"


def _assert_grads_are_the_average(ddp, local, what: str) -> None:
    import torch.distributed as dist

    for p, q in zip(ddp.module.parameters(), local.parameters()):
        dist.all_reduce(q.grad)
        torch.testing.assert_close(p.grad, q.grad / WORLD, msg=f"{what}: gradient not averaged")


def _train(model, step_fn, rank: int, what: str, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = step_fn(x, y)
        assert torch.isfinite(loss), what
        loss.backward()
        opt.step()
    _assert_replicas_identical(model, what)


def _maxup_and_amo(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    augment = fm.augment.gaussian(0.3)
    for mode in ("joint", "select"):
        # First step against a local replica with the same augmentation draws.
        net = _net()
        local = copy.deepcopy(net)
        ddp = DDP(net)
        x, y = _batch(rank)
        torch.manual_seed(rank)
        fm.MaxUp(ddp, augment, k=3, mode=mode)(x, y).backward()
        torch.manual_seed(rank)
        fm.MaxUp(local, augment, k=3, mode=mode)(x, y).backward()
        _assert_grads_are_the_average(ddp, local, f"MaxUp {mode}")
        # Several steps: the replicas stay identical.
        ddp = DDP(_net())
        step = fm.MaxUp(ddp, augment, k=3, mode=mode)
        _train(ddp, step, rank, f"MaxUp {mode}")

    import torch.distributed as dist

    net = _net()
    local = copy.deepcopy(net)
    ddp = DDP(net)
    reduced = []

    def count_allreduce(state, bucket):
        reduced.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / WORLD)

    ddp.register_comm_hook(None, count_allreduce)
    x, y = _batch(rank)
    loss = fm.AllLayerMargin(ddp, "official", inner_lr=0.3, inner_steps=2)(x, y)
    assert reduced == [], "the AMO ascent triggered a gradient all-reduce"
    assert all(p.grad is None for p in ddp.parameters())
    loss.backward()
    assert reduced, "the backward of the AMO loss did not sync gradients"
    fm.AllLayerMargin(local, "official", inner_lr=0.3, inner_steps=2)(x, y).backward()
    _assert_grads_are_the_average(ddp, local, "AMO")
    ddp = DDP(_net())
    amo = fm.AllLayerMargin(ddp, inner_lr=0.3, inner_steps=2)
    _train(ddp, amo, rank, "AMO")
    assert amo.layer_names[0] == "conv1"  # names of the wrapped module, no "module." prefix


def _head_losses(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Weight-robust CE: deterministic, so the first step is checked against a local replica.
    net = _net()
    local = copy.deepcopy(net)
    ddp = DDP(net)
    x, y = _batch(rank)
    fm.HeadLoss(ddp, fm.WeightRobustCrossEntropy(net.fc, eps=0.2))(x, y).backward()
    crit = fm.WeightRobustCrossEntropy(local.fc, eps=0.2)
    h = torch.flatten(
        local.avgpool(local.layer2(local.layer1(local.relu(local.bn1(local.conv1(x)))))), 1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crit(h, y).backward()  # the head outside a DDP forward (here: a local replica)
    assert any("fm.HeadLoss" in str(w.message) for w in caught), "no warning"
    _assert_grads_are_the_average(ddp, local, "HeadLoss(WeightRobustCrossEntropy)")

    for make in (
        lambda fc: fm.WeightRobustCrossEntropy(fc, eps=0.2),
        lambda fc: fm.WeightNoiseWorstOfKCrossEntropy(fc, eps=0.2, k=3),
    ):
        net = _net()
        ddp = DDP(net)
        step = fm.HeadLoss(ddp, make(net.fc))
        _train(ddp, step, rank, repr(step))
        step = fm.HeadLoss(ddp, make(None), "fc")  # the head by name
        _train(ddp, step, rank, repr(step))


def _pruner(rank: int) -> None:
    n = 50
    margins = torch.linspace(-0.2, 2.0, n)  # 5 of 50 <= 0: 90 % separated
    pruner = fm.MarginPruner(n, keep_fraction=0.2, min_separated=0.9, seed=3)
    assert (pruner.num_replicas, pruner.rank) == (WORLD, rank)
    pruner.update(torch.arange(n), margins)
    assert pruner.active
    pruner.set_epoch(1)
    mine = torch.tensor(list(pruner))
    import torch.distributed as dist

    both = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(both, mine)
    assert not set(both[0].tolist()) & set(both[1].tolist()), "the shards overlap"
    assert set(both[0].tolist()) | set(both[1].tolist()) == set(range(10))


def _diagnostics(rank: int) -> None:
    """Rank 0 alone runs the no-grad helpers on the DDP model; with a collective inside, it
    would wait for rank 1 (already at the barrier) until the 10 s timeout of DDP's group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    short = dist.new_group(ranks=list(range(WORLD)), timeout=datetime.timedelta(seconds=10))
    net = _net()
    ddp = DDP(net, process_group=short)
    x, y = _batch(rank)
    if rank == 0:
        stats = fm.noise_stability(ddp, x, trials=2)
        assert stats.layers[0] == "conv1"
        loader = [(x[:3], y[:3]), (x[3:], y[3:])]
        margins = fm.margin_distribution(ddp, loader)
        with torch.no_grad():
            torch.testing.assert_close(margins, fm.multiclass_margin(net.eval()(x), y))
    dist.barrier()


def _all_groups(rank: int) -> None:
    _diagnostics(rank)
    _maxup_and_amo(rank)
    _head_losses(rank)
    _pruner(rank)


GROUPS = {"all": _all_groups}


def test_helpers_under_ddp():
    """* noise_stability and margin_distribution on rank 0 alone return (no collective);
    * MaxUp (joint, select), AMO and HeadLoss (both weight-perturbation losses): the first
      step's gradients are the average of the ranks' local gradients, and the parameters
      stay identical over several steps;
    * MarginPruner activates on both ranks at the threshold and shards its kept set."""
    _spawn("all")
