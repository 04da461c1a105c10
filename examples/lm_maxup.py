"""A small word-level language model trained on the CPU: cross-entropy vs MaxUp (worst of k
noisy copies of the input embeddings), both through the fused linear head
``fm.LinearWorstOfKCrossEntropy``, which never holds the (k * tokens, vocab) logits.

The text is the source code of Python's own standard library (it ships with every Python,
nothing is downloaded). The model is a neural n-gram model: the embeddings of the previous
``context`` tokens, concatenated, go through an MLP to a ``width``-sized hidden state, and the
output layer is the input embedding matrix (tied weights, plus a bias).

Prints the held-out perplexity of each objective after the same wall-clock budget, and the peak
extra memory of one MaxUp training step with the fused head and with the unfused head
(``F.linear`` then ``fm.worst_of_k_cross_entropy``).

    python examples/lm_maxup.py                 # about a minute on a laptop CPU
    python examples/lm_maxup.py --seconds 5     # quicker
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm
from fastmargin.benchmarks.memory import peak_extra_bytes

_TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]|\n")


def stdlib_text(max_chars: int) -> str:
    """Concatenated source of the standard library's top-level modules (sorted, so the text
    is the same on every run of one Python version)."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def tokenize(text: str, vocab_size: int) -> Tuple[torch.Tensor, List[str]]:
    """Word / number / punctuation tokens; the vocab_size - 1 most frequent, plus <unk> (0)."""
    words = _TOKEN.findall(text)
    common = [w for w, _ in collections.Counter(words).most_common(vocab_size - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}
    ids = torch.tensor([index.get(w, 0) for w in words], dtype=torch.long)
    return ids, ["<unk>"] + common


class NGramLM(nn.Module):
    """Embeddings of the previous ``context`` tokens -> MLP -> hidden state (``width``)."""

    def __init__(self, vocab: int, width: int, context: int, inner: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(
            nn.Linear(context * width, inner), nn.GELU(), nn.Linear(inner, width)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.embed.weight  # tied input and output embeddings
        nn.init.normal_(self.embed.weight, std=width**-0.5)

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., context, width) embeddings -> (..., width) hidden states."""
        return self.norm(self.mlp(emb.flatten(-2)))


def windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return ids[starts[:, None] + torch.arange(context)]  # (B, context)


def noisy_copies(emb: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """(k, B, context, width): k copies of the embeddings, each with its own Gaussian noise."""
    return emb.unsqueeze(0) + sigma * torch.randn((k,) + emb.shape)


def train(args, ids: torch.Tensor, vocab: int, k: int, seconds: float, seed: int) -> NGramLM:
    torch.manual_seed(seed)
    model = NGramLM(vocab, args.width, args.context, args.inner)
    loss_fn = fm.LinearWorstOfKCrossEntropy(model.head, dim=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    n = ids.numel() - args.context
    deadline, steps = time.perf_counter() + seconds, 0
    while steps < args.max_steps and (steps == 0 or time.perf_counter() < deadline):
        starts = torch.randint(0, n, (args.batch,))
        emb = model.embed(windows(ids, starts, args.context))
        copies = noisy_copies(emb, k, args.sigma) if k > 1 else emb.unsqueeze(0)
        loss = loss_fn(model.features(copies), ids[starts + args.context])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    model.steps = steps
    return model


@torch.no_grad()
def perplexity(model: NGramLM, ids: torch.Tensor, context: int, max_tokens: int) -> float:
    """exp(mean clean cross-entropy) over the held-out tokens (fused head, k = 1)."""
    n = min(ids.numel() - context, max_tokens)
    total = 0.0
    for s in range(0, n, 4096):
        starts = torch.arange(s, min(n, s + 4096))
        h = model.features(model.embed(windows(ids, starts, context)))
        loss = fm.linear_worst_of_k_cross_entropy(
            h, model.head.weight, ids[starts + context], model.head.bias, reduction="sum"
        )
        total += float(loss)
    return math.exp(total / n)


def step_memory(args, vocab: int) -> Tuple[float, float]:
    """Peak extra MiB of one MaxUp step (forward + backward) with the fused and the unfused
    head, on ``args.memory_tokens`` tokens with k = ``args.k`` copies."""
    torch.manual_seed(0)
    model = NGramLM(vocab, args.width, args.context, args.inner)
    ids = torch.randint(0, vocab, (args.memory_tokens + args.context,))
    starts = torch.arange(args.memory_tokens)
    target = ids[starts + args.context]
    fused_fn = fm.LinearWorstOfKCrossEntropy(model.head, dim=0)
    with torch.no_grad():  # the backbone's activations are the same for both heads
        emb = noisy_copies(model.embed(windows(ids, starts, args.context)), args.k, args.sigma)
        hidden = model.features(emb)
    hidden.requires_grad_(True)
    params = (hidden, model.head.weight, model.head.bias)

    def fused():
        return torch.autograd.grad(fused_fn(hidden, target), params)

    def unfused():
        logits = F.linear(hidden, model.head.weight, model.head.bias)
        return torch.autograd.grad(fm.worst_of_k_cross_entropy(logits, target, dim=0), params)

    return tuple(peak_extra_bytes(fn, "cpu") / 2**20 for fn in (fused, unfused))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="training budget per objective")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--chars", type=int, default=3_000_000, help="characters of stdlib source")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--inner", type=int, default=256)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="tokens per step")
    p.add_argument("--k", type=int, default=4, help="MaxUp copies")
    p.add_argument("--sigma", type=float, default=0.1, help="embedding noise of MaxUp")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--memory-tokens", type=int, default=4096)
    return p.parse_args(argv)


def main(argv: Sequence[str] = ()) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids, words = tokenize(stdlib_text(args.chars), args.vocab)
    split = int(0.9 * ids.numel())
    train_ids, val_ids = ids[:split], ids[split:]
    print(
        f"text: {ids.numel():,} tokens of Python {sys.version.split()[0]} standard-library "
        f"source, vocabulary {len(words)}; model width {args.width}, context {args.context}"
    )
    results = {}
    for name, k in (("CE", 1), (f"MaxUp (k={args.k}, sigma={args.sigma})", args.k)):
        model = train(args, train_ids, len(words), k, args.seconds, seed=0)
        ppl = perplexity(model, val_ids, args.context, args.eval_tokens)
        results[name] = ppl
        print(f"{name:<28} {model.steps:6d} steps  held-out perplexity {ppl:8.2f}")
    fused_mb, unfused_mb = step_memory(args, len(words))
    print(
        f"one MaxUp step on {args.memory_tokens} tokens x {args.k} copies, vocabulary "
        f"{len(words)}: peak extra memory {fused_mb:.1f} MiB with the fused head, "
        f"{unfused_mb:.1f} MiB unfused (F.linear + worst_of_k_cross_entropy)"
    )
    results["memory_mib"] = (fused_mb, unfused_mb)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
