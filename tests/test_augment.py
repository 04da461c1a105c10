"""fm.augment: Gaussian noise, random crop + flip, CutMix and MixUp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastmargin as fm
from fastmargin import augment as A


def images(B=16, Cc=3, H=8, W=10, seed=0):
    return torch.randn(B, Cc, H, W, generator=torch.Generator().manual_seed(seed))


def test_gaussian_relative_scales_with_each_example_norm():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[:32] *= 100.0  # two groups of very different norms
    x0 = x.clone()
    out = A.gaussian(0.5)(x)
    assert torch.equal(x, x0)
    ratio = (out - x).norm(dim=1) / x.norm(dim=1)
    torch.testing.assert_close(ratio.mean(), torch.tensor(0.5), atol=0.03, rtol=0)
    assert ratio.std() < 0.05  # the same relative size in both groups


def test_gaussian_absolute_and_half_precision():
    torch.manual_seed(0)
    x = 1000.0 * torch.randn(4000, 8)
    noise = A.gaussian(0.3, relative=False)(x) - x
    torch.testing.assert_close(noise.std(), torch.tensor(0.3), atol=0.02, rtol=0)
    h = (300.0 * torch.randn(8, 4096)).half()  # sum of squares would overflow in half
    out = A.gaussian(0.1)(h)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_gaussian_differs_per_call():
    x = torch.randn(4, 5)
    g = A.gaussian(0.1)
    assert not torch.equal(g(x), g(x))


def brute_crop_flip(x, p, dy, dx, flip):
    xp = F.pad(x, (p, p, p, p))
    H, W = x.shape[-2:]
    out = torch.stack([xp[b, :, dy[b] : dy[b] + H, dx[b] : dx[b] + W] for b in range(x.shape[0])])
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


@pytest.mark.parametrize("padding", [0, 1, 4])
@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_matches_per_example_loop(padding, flip):
    x = images()
    x0 = x.clone()
    torch.manual_seed(3)
    out = A.random_crop_flip(padding, flip=flip)(x)
    assert torch.equal(x, x0) and out.shape == x.shape
    # Replay the same draws (same generator order as the implementation).
    torch.manual_seed(3)
    B = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (B, 1)).view(-1)
    dx = torch.randint(0, 2 * padding + 1, (B, 1)).view(-1)
    fl = (torch.rand(B, 1) < 0.5).view(-1) if flip else torch.zeros(B, dtype=torch.bool)
    torch.testing.assert_close(out, brute_crop_flip(x, padding, dy, dx, fl), rtol=0, atol=0)


def test_random_crop_flip_draws_per_example():
    torch.manual_seed(0)
    x = images(B=64).abs() + 1.0  # no zeros, so the padding is visible
    out = A.random_crop_flip(2)(x)
    shifted = (out == 0).flatten(1).any(dim=1)
    assert 0 < int(shifted.sum()) < 64  # some examples cropped off-centre, not all alike
    with pytest.raises(ValueError, match="x:"):
        A.random_crop_flip(2)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="padding:"):
        A.random_crop_flip(-1)


@pytest.mark.parametrize("name", ["cutmix", "mixup"])
def test_mixing_soft_targets_match_pixels(name):
    torch.manual_seed(0)
    C = 5
    B = 32
    # Each image is filled with its own label, so the mixed pixels reveal the mixing ratio.
    y = torch.randint(0, C, (B,))
    x = y.double().view(B, 1, 1, 1).expand(B, 2, 8, 8).clone()
    x0 = x.clone()
    aug = getattr(A, name)(1.0, num_classes=C)
    assert A.takes_target(aug)
    xa, ys = aug(x, y)
    assert torch.equal(x, x0)
    assert ys.shape == (B, C) and ys.dtype == x.dtype
    torch.testing.assert_close(ys.sum(1), torch.ones(B, dtype=x.dtype))
    # E_pixels[label] equals sum_c c * y_soft[c] under either mixing.
    torch.testing.assert_close(xa.mean(dim=(1, 2, 3)), ys @ torch.arange(C, dtype=x.dtype))
    xb, _ = aug(x, y)
    assert not torch.equal(xa, xb)  # fresh partner and ratio per call


def test_cutmix_box_area_matches_ratio():
    torch.manual_seed(1)
    B = 8
    y = torch.arange(B)  # one class per image: y_soft[b, b] is the kept fraction of image b
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 1, 16, 16).contiguous()
    aug = A.cutmix(0.5, num_classes=B)
    fractions = []
    for _ in range(10):
        xa, ys = aug(x, y)
        kept = (xa == x).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(kept, ys[y, y])
        fractions.append(float(kept.min()))
    assert min(fractions) < 0.9  # boxes of varying size were drawn
    with pytest.raises(ValueError, match="alpha:"):
        A.cutmix(0.0, num_classes=3)
    with pytest.raises(ValueError, match="num_classes:"):
        A.mixup(1.0, num_classes=0)
    with pytest.raises(ValueError, match="y:"):
        A.mixup(1.0, num_classes=3)(torch.randn(4, 2), torch.rand(4))


def test_compose_and_with_target():
    torch.manual_seed(0)
    x = images(B=4)
    f = A.compose(A.random_crop_flip(1), A.gaussian(0.0))
    assert f(x).shape == x.shape
    with pytest.raises(ValueError, match="compose"):
        A.compose(A.mixup(1.0, num_classes=3))
    w = A.with_target(lambda t, lab: (t, lab))
    assert A.takes_target(w) and not A.takes_target(f)
    assert fm.augment is A
    assert math.isfinite(float(f(x).sum()))
