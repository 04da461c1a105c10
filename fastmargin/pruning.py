"""Dynamic data-set pruning to the low-margin samples (Banburski et al. 2021, arXiv 2107.10199).

Once a model separates its training data, the samples with the smallest margins carry almost all
of the gradient signal (the others are classified with room to spare), so training can continue
on a small low-margin fraction of the data set at a fraction of the cost. ``MarginPruner`` is a
``Sampler`` that yields that fraction, refreshed whenever new margins are passed to ``update``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, Sequence, Sized, Union

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def _fraction(value: float, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return value


class MarginPruner(Sampler[int]):
    """Sampler over the lowest-margin ``keep_fraction`` of a data set (plus optional exploration).

    Until margins are known for every sample (and, with ``require_separation``, until at least
    ``min_separated`` of them are > 0, i.e. the model separates that fraction of the training
    data; 1.0 asks for all, which label noise or strong augmentation may never allow), it
    yields the whole data set. The switch is latched (later updates change which samples are
    kept, not whether pruning is on) and visible: :attr:`active` turns True,
    :attr:`activated_epoch` records the epoch (as last given to ``set_epoch``), and an INFO
    line is logged on the ``fastmargin.pruning`` logger; :attr:`separated_fraction` holds the
    fraction of margins > 0 after every update. From then on each epoch yields

    * the ``ceil(keep_fraction * N)`` samples with the smallest margins (ties to the lowest
      index; a NaN margin counts as -inf, so broken samples are kept, not hidden), and
    * ``round(explore_fraction * N)`` samples drawn uniformly from the rest, redrawn every epoch,
      so samples whose margin shrank since the last refresh can come back,

    in an order shuffled by ``seed + epoch`` (call ``set_epoch`` every epoch, as with
    ``DistributedSampler``). Refresh the margins every few epochs with ``update(indices,
    margins)``, e.g. from ``fm.margin_distribution`` over an unshuffled loader of the data set::

        pruner = fm.MarginPruner(train_set, keep_fraction=0.1, explore_fraction=0.02)
        loader = DataLoader(train_set, batch_size=128, sampler=pruner)
        for epoch in range(epochs):
            if epoch % 5 == 0:
                pruner.update(torch.arange(len(train_set)),
                              fm.margin_distribution(model, full_unshuffled_loader))
            pruner.set_epoch(epoch)
            for x, y in loader: ...

    Distributed mode (``num_replicas``/``rank``, defaulting to ``torch.distributed``'s world
    when it is initialised): every rank must hold the same margins (update all ranks with the
    full, gathered margins); the kept set is then built identically on every rank, padded by
    repeating its start to a multiple of ``num_replicas`` (or truncated with ``drop_last``), and
    rank i takes every ``num_replicas``-th index from position i, as ``DistributedSampler`` does.
    """

    def __init__(
        self,
        data_source: Union[Sized, int],
        keep_fraction: float = 0.1,
        *,
        explore_fraction: float = 0.0,
        require_separation: bool = True,
        min_separated: float = 1.0,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(data_source, int) and not isinstance(data_source, bool):
            n = data_source
        elif isinstance(data_source, Sized):
            n = len(data_source)
        else:
            raise TypeError(
                "data_source: expected a sized data set or an int, got "
                f"{type(data_source).__name__}"
            )
        if n < 1:
            raise ValueError(f"data_source: expected at least one sample, got {n}")
        self.num_total = n
        self.keep_fraction = _fraction(keep_fraction, "keep_fraction", allow_zero=False)
        self.explore_fraction = _fraction(explore_fraction, "explore_fraction", allow_zero=True)
        self.require_separation = bool(require_separation)
        self.min_separated = _fraction(min_separated, "min_separated", allow_zero=True)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = self._replicas(num_replicas, rank)
        self.epoch = 0
        self.margins = torch.full((n,), -math.inf, dtype=torch.float64)
        self.known = torch.zeros(n, dtype=torch.bool)
        self.active = False
        self.activated_epoch: int | None = None
        self.separated_fraction = 0.0

    @staticmethod
    def _replicas(num_replicas: int | None, rank: int | None) -> tuple:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas: expected an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank: expected an int in [0, {num_replicas}), got {rank!r}")
        return num_replicas, rank

    # --- state -----------------------------------------------------------------------------

    def update(self, indices: Union[torch.Tensor, Sequence[int]], margins: torch.Tensor) -> None:
        """Records the current margins of the samples ``indices`` (any subset, any order)."""
        idx = torch.as_tensor(indices).detach().cpu()
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1:
            raise TypeError(
                f"indices: expected a 1-D integer tensor, got {idx.dtype} {idx.dim()}-D"
            )
        m = torch.as_tensor(margins).detach().cpu().to(torch.float64)
        if m.shape != idx.shape:
            raise ValueError(
                f"margins: expected shape {tuple(idx.shape)} (one per index), got {tuple(m.shape)}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_total):
            raise IndexError(
                f"indices: expected values in [0, {self.num_total}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        self.margins[idx] = torch.nan_to_num(m, nan=-math.inf)
        self.known[idx] = True
        self.separated_fraction = float((self.margins > 0).double().mean())
        if self.active or not bool(self.known.all()):
            return
        if not self.require_separation or self.separated_fraction >= self.min_separated:
            self.active = True
            self.activated_epoch = self.epoch
            logger.info(
                "MarginPruner: pruning is on from epoch %d: %.1f%% of %d margins are > 0; "
                "keeping the lowest-margin %d samples per epoch (+ %d explored)",
                self.epoch,
                100.0 * self.separated_fraction,
                self.num_total,
                *self._counts(),
            )

    def set_epoch(self, epoch: int) -> None:
        """Seeds this epoch's exploration draw and shuffle (same on every rank)."""
        self.epoch = int(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "margins": self.margins.clone(),
            "known": self.known.clone(),
            "active": self.active,
            "epoch": self.epoch,
            "activated_epoch": self.activated_epoch,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["margins"].shape != self.margins.shape:
            raise ValueError(
                f"state: margins for {state['margins'].shape[0]} samples, "
                f"this pruner has {self.num_total}"
            )
        self.margins = state["margins"].clone().to(torch.float64)
        self.known = state["known"].clone().to(torch.bool)
        self.active = bool(state["active"])
        self.epoch = int(state["epoch"])
        self.activated_epoch = state.get("activated_epoch")
        self.separated_fraction = float((self.margins > 0).double().mean())

    # --- sampling --------------------------------------------------------------------------

    def _counts(self) -> tuple:
        """(kept by margin, explored) for the current state."""
        if not self.active:
            return self.num_total, 0
        keep = min(self.num_total, max(1, math.ceil(self.keep_fraction * self.num_total)))
        explore = min(self.num_total - keep, round(self.explore_fraction * self.num_total))
        return keep, explore

    def kept_indices(self) -> torch.Tensor:
        """This epoch's selection before sharding: low-margin + explored, shuffled if asked."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        keep, explore = self._counts()
        if not self.active:
            chosen = torch.arange(self.num_total)
        else:
            order = torch.sort(self.margins, stable=True).indices
            chosen = order[:keep]
            if explore:
                rest = order[keep:]
                chosen = torch.cat(
                    [chosen, rest[torch.randperm(rest.numel(), generator=g)[:explore]]]
                )
        if self.shuffle:
            chosen = chosen[torch.randperm(chosen.numel(), generator=g)]
        else:
            chosen = chosen.sort().values
        return chosen

    def _per_rank(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        chosen = self.kept_indices()
        per_rank = self._per_rank(chosen.numel())
        size = per_rank * self.num_replicas
        if size > chosen.numel():  # pad by cycling from the start
            reps = math.ceil(size / chosen.numel())
            chosen = chosen.repeat(reps)
        chosen = chosen[:size]
        return iter(chosen[self.rank : size : self.num_replicas].tolist())

    def __len__(self) -> int:
        keep, explore = self._counts()
        return self._per_rank(keep + explore)
