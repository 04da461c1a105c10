"""MarginPruner: selection, exploration, distributed sharding, and a train-prune run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastmargin as fm


def _updated(n=20, margins=None, **kw):
    pruner = fm.MarginPruner(n, **kw)
    if margins is None:
        margins = torch.linspace(0.1, 2.0, n).flip(0)  # sample n-1 has the smallest margin
    pruner.update(torch.arange(n), margins)
    return pruner


def test_full_data_set_until_margins_are_known():
    pruner = fm.MarginPruner(list(range(10)), keep_fraction=0.2)
    assert sorted(pruner) == list(range(10)) and len(pruner) == 10
    pruner.update(torch.arange(5), torch.ones(5))  # half known: still everything
    assert not pruner.active and sorted(pruner) == list(range(10))
    pruner.update(torch.arange(5, 10), torch.ones(5))
    assert pruner.active and len(list(pruner)) == len(pruner) == 2


def test_keeps_the_lowest_margins_with_ties_to_the_lowest_index():
    margins = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5, 1.0, 4.0, float("nan"), 9.0, 8.0])
    pruner = _updated(10, margins, keep_fraction=0.4, require_separation=False)
    assert sorted(pruner) == [1, 3, 4, 7]  # NaN counts as -inf; of the 1.0 ties: 1 and 3
    assert len(pruner) == 4
    pruner = _updated(10, margins, keep_fraction=0.01, require_separation=False)
    assert list(pruner) == [7]  # at least one sample


def test_shuffles_per_epoch_deterministically():
    pruner = _updated(100, keep_fraction=0.3)
    first = list(pruner)
    assert list(pruner) == first
    assert sorted(first) == list(range(70, 100))
    pruner.set_epoch(1)
    assert list(pruner) != first and sorted(pruner) == list(range(70, 100))
    ordered = _updated(100, keep_fraction=0.3, shuffle=False)
    assert list(ordered) == list(range(70, 100))


def test_require_separation_and_latch():
    margins = torch.linspace(-1.0, 1.0, 10)
    pruner = _updated(10, margins, keep_fraction=0.2)
    assert not pruner.active and len(pruner) == 10  # not separated yet
    pruner.update(torch.arange(10), margins + 2.0)
    assert pruner.active and sorted(pruner) == [0, 1]
    pruner.update(torch.tensor([9]), torch.tensor([-5.0]))  # later updates re-rank ...
    assert pruner.active and sorted(pruner) == [0, 9]  # ... but do not switch pruning off
    eager = _updated(10, margins, keep_fraction=0.2, require_separation=False)
    assert eager.active and sorted(eager) == [0, 1]


def test_exploration_draws_from_the_rest_each_epoch():
    pruner = _updated(100, keep_fraction=0.1, explore_fraction=0.05)
    low = set(range(90, 100))
    draws = []
    for epoch in range(4):
        pruner.set_epoch(epoch)
        chosen = list(pruner)
        assert len(chosen) == len(pruner) == 15 and len(set(chosen)) == 15
        assert low <= set(chosen)
        draws.append(frozenset(chosen) - low)
    assert len(set(draws)) > 1  # redrawn per epoch
    pruner.set_epoch(2)
    assert frozenset(pruner) - low == draws[2]  # but reproducible
    everything = _updated(10, keep_fraction=0.5, explore_fraction=1.0)
    assert sorted(everything) == list(range(10))


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("active", [False, True])
def test_distributed_sharding(replicas, drop_last, active):
    n = 50
    margins = torch.linspace(0.1, 2.0, n) if active else torch.linspace(-1.0, 1.0, n)
    ranks = [
        _updated(n, margins, keep_fraction=0.3, explore_fraction=0.04, seed=7,
                 num_replicas=replicas, rank=r, drop_last=drop_last)
        for r in range(replicas)
    ]  # fmt: skip
    for p in ranks:
        p.set_epoch(3)
    shards = [list(p) for p in ranks]
    selection = ranks[0].kept_indices().tolist()
    total = len(selection)
    assert total == (17 if active else n)  # ceil(0.3 * 50) + round(0.04 * 50)
    per_rank = total // replicas if drop_last else math.ceil(total / replicas)
    assert all(len(s) == len(p) == per_rank for s, p in zip(shards, ranks))
    # interleaved like DistributedSampler: rank r takes positions r, r + R, ...
    padded = (selection * 2)[: per_rank * replicas]
    for r, shard in enumerate(shards):
        assert shard == padded[r::replicas]
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat)  # disjoint
    else:
        assert set(flat) == set(selection)  # everything covered, padding repeats the start


def test_inactive_unshuffled_shards_equal_distributed_sampler():
    data = TensorDataset(torch.arange(23))
    for replicas in (2, 3):
        for r in range(replicas):
            ours = fm.MarginPruner(data, shuffle=False, num_replicas=replicas, rank=r)
            theirs = DistributedSampler(data, num_replicas=replicas, rank=r, shuffle=False)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_state_dict_round_trip():
    pruner = _updated(30, keep_fraction=0.2)
    pruner.set_epoch(4)
    clone = fm.MarginPruner(30, keep_fraction=0.2)
    clone.load_state_dict(pruner.state_dict())
    assert list(clone) == list(pruner)
    with pytest.raises(ValueError, match="state"):
        fm.MarginPruner(31).load_state_dict(pruner.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_fraction"):
        fm.MarginPruner(10, keep_fraction=0.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        fm.MarginPruner(10, keep_fraction=1.5)
    with pytest.raises(ValueError, match="explore_fraction"):
        fm.MarginPruner(10, explore_fraction=-0.1)
    with pytest.raises(TypeError, match="data_source"):
        fm.MarginPruner(object())
    with pytest.raises(ValueError, match="data_source"):
        fm.MarginPruner(0)
    with pytest.raises(ValueError, match="num_replicas"):
        fm.MarginPruner(10, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="rank"):
        fm.MarginPruner(10, num_replicas=2, rank=2)
    pruner = fm.MarginPruner(10)
    with pytest.raises(ValueError, match="margins"):
        pruner.update(torch.arange(3), torch.ones(4))
    with pytest.raises(IndexError, match="indices"):
        pruner.update(torch.tensor([0, 10]), torch.ones(2))
    with pytest.raises(TypeError, match="indices"):
        pruner.update(torch.ones(2), torch.ones(2))
    assert not pruner.known.any()  # nothing recorded by the failed updates


# --- pruning works: train on 10% of a separable problem after it is separated -------------------


def _separable(n, seed, d=10, c=3, gap=1.0):
    """Points labelled by a random linear teacher, kept only where its margin exceeds `gap`."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(c, d, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(4 * n, d, generator=g)
    logits = x @ teacher.T
    y = logits.argmax(1)
    keep = fm.multiclass_margin(logits, y) > gap
    x, y = x[keep][:n], y[keep][:n]
    assert x.shape[0] == n
    return x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _train(x, y, epochs, pruner=None, keep_high=False):
    """Adam on a linear model; with a pruner, margins are refreshed every other epoch.

    ``keep_high`` is the control: it feeds the pruner 1000 - m once the data is separated, so it
    keeps the *highest*-margin tenth instead.
    """
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = TensorDataset(x, y)
    full_in_order = DataLoader(data, batch_size=1000, shuffle=False)
    loader = DataLoader(data, batch_size=50, sampler=pruner, shuffle=pruner is None)
    seen = []
    for epoch in range(epochs):
        if pruner is not None:
            if epoch % 2 == 0:
                margins = fm.margin_distribution(model, full_in_order)
                if keep_high and margins.min() > 0:
                    margins = 1000.0 - margins
                pruner.update(torch.arange(len(data)), margins)
            pruner.set_epoch(epoch)
        count = 0
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            count += xb.shape[0]
        seen.append(count)
    return model, seen


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


def test_train_on_pruned_low_margin_tenth_keeps_test_accuracy(one_thread):
    x, y = _separable(2000, seed=0, gap=1.0)
    x_test, y_test = _separable(2000, seed=1, gap=0.0)  # test points up to the boundary
    epochs = 24
    full, _ = _train(x, y, epochs)
    pruner = fm.MarginPruner(len(x), keep_fraction=0.1)
    pruned, seen = _train(x, y, epochs, pruner)
    # pruning switched on once the training set was separated, and then used 10% of it
    assert pruner.active
    assert seen.count(200) >= epochs // 2 and set(seen) <= {2000, 200}
    acc_full, acc_pruned = _accuracy(full, x_test, y_test), _accuracy(pruned, x_test, y_test)
    assert acc_full > 0.97
    # stated tolerance: within 1 percentage point of the full-data run
    assert acc_pruned >= acc_full - 0.01, (acc_full, acc_pruned)
    assert _accuracy(pruned, x, y) == 1.0  # still separates the whole training set
    # control: keeping the highest-margin tenth instead loses accuracy (the choice matters)
    high, _ = _train(x, y, epochs, fm.MarginPruner(len(x), keep_fraction=0.1), keep_high=True)
    assert _accuracy(high, x_test, y_test) < acc_pruned - 0.01


def test_min_separated_activates_with_a_few_misclassified_points(caplog):
    """93 % of the margins > 0: the default (all separated) stays off, min_separated=0.9 turns
    pruning on, visibly (attribute, epoch, log line)."""
    import logging

    n = 100
    margins = torch.linspace(-0.5, 3.0, n)  # 15 of 100 are <= 0
    margins[:8] = torch.linspace(0.01, 0.1, 8)  # now 93 % > 0
    strict = fm.MarginPruner(n, keep_fraction=0.2)
    strict.update(torch.arange(n), margins)
    assert not strict.active and strict.activated_epoch is None
    assert strict.separated_fraction == pytest.approx(0.93)
    assert len(list(strict)) == n
    pruner = fm.MarginPruner(n, keep_fraction=0.2, min_separated=0.9)
    pruner.set_epoch(6)
    with caplog.at_level(logging.INFO, logger="fastmargin.pruning"):
        pruner.update(torch.arange(n), margins)
    assert pruner.active and pruner.activated_epoch == 6
    assert "pruning is on from epoch 6: 93.0% of 100 margins are > 0" in caplog.text
    kept = sorted(pruner)
    assert len(kept) == 20
    assert set(kept) == set(torch.sort(margins, stable=True).indices[:20].tolist())
    state = pruner.state_dict()
    again = fm.MarginPruner(n, keep_fraction=0.2, min_separated=0.9)
    again.load_state_dict(state)
    assert again.activated_epoch == 6 and again.separated_fraction == pytest.approx(0.93)
    with pytest.raises(ValueError, match="min_separated"):
        fm.MarginPruner(n, min_separated=1.5)
