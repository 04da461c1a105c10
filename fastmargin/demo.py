"""The fastmargin demo: one small CNN on scikit-learn's digits, trained with each objective.

``python -m fastmargin demo`` trains the same network (same seed, same budget) with every
objective in :data:`OBJECTIVES` that this build offers and prints one markdown table:

* clean test accuracy;
* accuracy under Gaussian input noise (relative size σ, :func:`fastmargin.augment.gaussian`);
* accuracy under last-layer weight noise: W' = W + σ_W·rms(W)·E, E ~ N(0, I), averaged
  over a few draws (the perturbation the weight-robust and weight-noise objectives train for);
* margin AUC: the area under the empirical CDF of the test margins z_y − max_{c≠y} z_c on
  [lo, hi], divided by (hi − lo); lower means larger margins;
* seconds per training epoch.

The data set ships with scikit-learn (1797 8×8 images, no download). It runs on the CPU in
about a minute and uses the GPU when there is one. ``--plot FILE.png`` draws the test margin
CDFs. Objectives from optional parts of the library register only when those exist.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm

from . import augment as aug

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DemoConfig:
    """The fixed budget and evaluation settings (defaults: the README's table)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.01
    seed: int = 0
    k: int = 4  # copies for the worst-of-k objectives
    width: int = 16  # channels of the first conv (then 2x, 4x)
    train_fraction: float = 0.75
    input_noise: float = 0.5  # relative Gaussian input noise at evaluation
    weight_noise: float = 2.0  # last-layer weight noise, in units of rms(W)
    weight_noise_draws: int = 5
    weight_eps: float = 0.05  # ε of the weight-robust CE (radius ε‖h‖₂)
    weight_sigma: float = 0.1  # σ of the weight-noise MaxUp (scale σ‖h‖₂)
    margin_lo: float = 0.0
    margin_hi: float = 10.0
    # The network is tiny (8x8 inputs): on a CPU, one thread beats several (thread start-up
    # and contention with other processes cost more than the parallel work saves).
    cpu_threads: int = 1
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


class DigitsCNN(nn.Module):
    """Three 3×3 conv blocks (BatchNorm, ReLU) and a linear head; ``features`` gives the
    penultimate representation h, so the head's logits are z = W h + b."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# -- objectives ---------------------------------------------------------------------------------


def maxup_augmentation() -> Callable:
    """Digits are not mirror-symmetric: shift by up to one pixel, plus mild relative noise."""
    return aug.compose(aug.random_crop_flip(padding=1, flip=False), aug.gaussian(0.2))


def _ce(model: DigitsCNN, cfg: DemoConfig) -> Step:
    return lambda x, y: F.cross_entropy(model(x), y)


def _maxup(mode: str) -> Callable[[DigitsCNN, DemoConfig], Step]:
    def build(model: DigitsCNN, cfg: DemoConfig) -> Step:
        return fm.MaxUp(model, maxup_augmentation(), k=cfg.k, mode=mode)

    return build


def _amo(model: DigitsCNN, cfg: DemoConfig) -> Step:
    return fm.AllLayerMargin(model)


def _weight_robust(model: DigitsCNN, cfg: DemoConfig) -> Step:
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = model.features(x)
        radius = fm.weight_perturbation_radius(h, cfg.weight_eps)
        return fm.weight_robust_cross_entropy(model.head(h), y, radius)

    return step


def _weight_noise_maxup(model: DigitsCNN, cfg: DemoConfig) -> Step:
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = model.features(x)
        scale = fm.weight_perturbation_radius(h, cfg.weight_sigma)
        return fm.weight_noise_worst_of_k_cross_entropy(model.head(h), y, scale, k=cfg.k)

    return step


# name -> (builder, one-line description)
_ALL_OBJECTIVES = {
    "ce": (_ce, "plain cross-entropy"),
    "maxup-joint": (_maxup("joint"), "MaxUp, k copies in one batch"),
    "maxup-select": (_maxup("select"), "MaxUp, select then train worst copy"),
    "amo": (_amo, "all-layer margin optimisation"),
    "weight-robust": (_weight_robust, "exact worst case over last-layer weight balls"),
    "weight-noise-maxup": (_weight_noise_maxup, "worst of k last-layer weight-noise draws"),
}


def available_objectives() -> Dict[str, Callable[[DigitsCNN, DemoConfig], Step]]:
    """The registry: objective name -> builder of its training step."""
    return {name: build for name, (build, _) in _ALL_OBJECTIVES.items()}


OBJECTIVES = available_objectives()


# -- data, training, evaluation -----------------------------------------------------------------


def load_digits_split(cfg: DemoConfig):
    """(x_train, y_train, x_test, y_test) on cfg.device: (N, 1, 8, 8) floats scaled to [0, 1]
    and standardised with the training statistics, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    n_train = int(round(cfg.train_fraction * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    dev = torch.device(cfg.device)
    return x[tr].to(dev), y[tr].to(dev), x[te].to(dev), y[te].to(dev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model: nn.Module,
    step: Step,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DemoConfig,
    *,
    progress: bool = True,
    desc: str = "",
) -> float:
    """Trains in place (AdamW, one-cycle schedule); returns the mean seconds per epoch."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.epochs * steps_per_epoch, 1)
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    seconds = 0.0
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for _ in bar:
        _sync(x.device)
        t0 = time.perf_counter()
        order = torch.randperm(len(y), generator=gen).to(x.device)
        total = torch.zeros((), device=x.device)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = step(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        _sync(x.device)
        seconds += time.perf_counter() - t0
        bar.set_postfix(loss=f"{float(total) / steps_per_epoch:.3f}")
    return seconds / max(cfg.epochs, 1)


@torch.no_grad()
def evaluate(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig) -> dict:
    """Clean / input-noise / weight-noise accuracy, margin AUC and the test margins."""
    model.eval()
    h = model.features(x)
    logits = model.head(h)
    clean = (logits.argmax(1) == y).float().mean().item()

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed + 2)  # the same noise draws for every objective
    noisy_acc = []
    for _ in range(cfg.weight_noise_draws):
        xn = aug.gaussian(cfg.input_noise)(x)
        noisy_acc.append((model(xn).argmax(1) == y).float().mean().item())
    W, b = model.head.weight, model.head.bias
    rms = W.pow(2).mean().sqrt()
    wn_acc = []
    for _ in range(cfg.weight_noise_draws):
        Wn = W + cfg.weight_noise * rms * torch.randn_like(W)
        wn_acc.append((F.linear(h, Wn, b).argmax(1) == y).float().mean().item())
    torch.random.set_rng_state(gen_state)

    margins = fm.multiclass_margin(logits, y).float().cpu()
    return {
        "clean_acc": clean,
        "input_noise_acc": sum(noisy_acc) / len(noisy_acc),
        "weight_noise_acc": sum(wn_acc) / len(wn_acc),
        "margin_auc": fm.margin_auc(margins, cfg.margin_lo, cfg.margin_hi),
        "margins": margins,
    }


def run_demo(
    objectives: Sequence[str] | None = None,
    cfg: DemoConfig | None = None,
    *,
    progress: bool = True,
    plot: str | None = None,
) -> List[dict]:
    """Trains one DigitsCNN per objective (same seed and initial weights) and evaluates it.

    Returns one dict per objective: name, clean_acc, input_noise_acc, weight_noise_acc,
    margin_auc, sec_per_epoch, margins (the (N_test,) test margins, a CPU tensor).
    """
    cfg = cfg or DemoConfig()
    registry = available_objectives()
    names = list(registry) if objectives is None else list(objectives)
    for name in names:
        if name not in registry:
            raise ValueError(f"objectives: {name!r} is unknown; available: {', '.join(registry)}")
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg)
    threads = torch.get_num_threads()
    if x_tr.device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        results = _run(names, registry, cfg, x_tr, y_tr, x_te, y_te, progress)
    finally:
        torch.set_num_threads(threads)
    if plot:
        plot_margin_cdfs(results, plot)
    return results


def _run(names, registry, cfg, x_tr, y_tr, x_te, y_te, progress) -> List[dict]:
    results = []
    for name in names:
        torch.manual_seed(cfg.seed)
        model = DigitsCNN(cfg.width).to(cfg.device)
        step = registry[name](model, cfg)
        sec = train(model, step, x_tr, y_tr, cfg, progress=progress, desc=name)
        remover = getattr(step, "remove", None)  # AllLayerMargin's hooks: evaluate the bare
        if callable(remover):  # network, exactly as the other objectives are evaluated
            remover()
        res = {"objective": name, **evaluate(model, x_te, y_te, cfg), "sec_per_epoch": sec}
        results.append(res)
    return results


def format_table(results: List[dict], cfg: DemoConfig | None = None) -> str:
    """The results as one markdown table."""
    cfg = cfg or DemoConfig()
    head = (
        f"| objective | clean acc | acc, input noise {cfg.input_noise:g} "
        f"| acc, weight noise {cfg.weight_noise:g} "
        f"| margin AUC [{cfg.margin_lo:g}, {cfg.margin_hi:g}] | s / epoch |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(
            f"| {r['objective']} | {100 * r['clean_acc']:.1f}% | {100 * r['input_noise_acc']:.1f}% "
            f"| {100 * r['weight_noise_acc']:.1f}% | {r['margin_auc']:.3f} "
            f"| {r['sec_per_epoch']:.2f} |"
        )
    return "\n".join(lines)


def plot_margin_cdfs(results: List[dict], path: str) -> None:
    """Draws the empirical CDF of each objective's test margins into ``path`` (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        m = torch.sort(r["margins"]).values
        cdf = torch.arange(1, len(m) + 1, dtype=torch.float32) / len(m)
        ax.step(m.numpy(), cdf.numpy(), where="post", label=r["objective"])
    ax.set_xlabel("test margin  z_y − max_{c≠y} z_c")
    ax.set_ylabel("fraction of test samples ≤ margin")
    ax.set_title("Margin distributions on digits (further right = larger margins)")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (wired into `python -m fastmargin demo` by fastmargin/__main__.py) ------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the demo's options to ``parser`` (a sub-command parser of the CLI)."""
    d = DemoConfig()
    parser.add_argument(
        "--objectives",
        default=None,
        help=f"comma-separated subset of: {', '.join(_ALL_OBJECTIVES)} (default: all available)",
    )
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--k", type=int, default=d.k, help="copies for worst-of-k objectives")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda if any)")
    parser.add_argument(
        "--threads", type=int, default=d.cpu_threads, help="CPU threads (0: torch's default)"
    )
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="draw margin CDFs")
    parser.add_argument("--json", metavar="FILE.json", default=None, help="write the results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main_demo(args: argparse.Namespace) -> int:
    """Runs the demo from parsed arguments and prints the table; returns the exit code."""
    cfg = DemoConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        k=args.k,
        seed=args.seed,
        device=args.device,
        cpu_threads=args.threads,
    )
    names = None if not args.objectives else [n.strip() for n in args.objectives.split(",")]
    t0 = time.perf_counter()
    results = run_demo(names, cfg, progress=not args.no_progress, plot=args.plot)
    print(format_table(results, cfg))
    print(
        f"\nInput noise: Gaussian, relative size {cfg.input_noise:g} of each image's norm. "
        f"Weight noise: N(0, ({cfg.weight_noise:g}·rms(W))²) added to the last layer's weights, "
        f"{cfg.weight_noise_draws} draws averaged.\nMargin AUC: area under the CDF of the test "
        "margins z_y - max_{c≠y} z_c on that interval, over its length (lower = larger margins)."
    )
    print(
        f"\n{len(results)} objectives, {cfg.epochs} epochs each, on {cfg.device} "
        f"({time.perf_counter() - t0:.0f} s total; seed {cfg.seed})."
    )
    if args.plot:
        print(f"margin CDFs: {args.plot}")
    if args.json:
        rows = [{k: v for k, v in r.items() if k != "margins"} for r in results]
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_demo(add_demo_arguments(argparse.ArgumentParser()).parse_args()))
