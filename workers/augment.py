"""Batch augmentations in torch: random resized crops with flips, colour jitter, grayscale."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# RGB -> YIQ: hue is the angle in the IQ plane, so a hue shift is a rotation there.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Augmentation:
    """How strongly views are distorted.

    Attributes:
        min_scale: smallest crop area, as a share of the image.
        max_aspect: crops have aspect ratios in [1 / max_aspect, max_aspect].
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation: jitter factors drawn in [1 - s, 1 + s].
        hue: hue rotation drawn in [-hue, hue] turns.
        grayscale_p: probability of turning a view gray.
    """

    min_scale: float = 0.25
    max_aspect: float = 4 / 3
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo


def crop_grids(n: int, size: int, aug: Augmentation, generator: torch.Generator,
               device: torch.device, scale: tuple[float, float] | None = None) -> torch.Tensor:
    """Sampling grids of random resized crops, half of them mirrored.

    Args:
        n: how many crops.
        size: output side in pixels.
        aug: crop scale and aspect range.
        generator: random source (on ``device``).
        device: where the grids live.
        scale: crop area range as a share of the image; None: [aug.min_scale, 1].

    Returns:
        (n, size, size, 2) grids for ``grid_sample`` (coordinates in [-1, 1]).
    """
    lo, hi = scale or (aug.min_scale, 1.0)
    area = _uniform(n, lo, hi, generator, device)
    log_ratio = _uniform(n, -math.log(aug.max_aspect), math.log(aug.max_aspect), generator,
                         device)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(n, -1.0, 1.0, generator, device) * (1.0 - width)
    cy = _uniform(n, -1.0, 1.0, generator, device) * (1.0 - height)
    mirror = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    return F.affine_grid(theta, [n, 3, size, size], align_corners=False)


def resample(x: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Crops of ``x`` ((N, 3, S, S)) along ``grids`` (bilinear, borders reflected)."""
    return F.grid_sample(x, grids.to(x.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def colour_jitter(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation, hue and grayscale, per image.

    Args:
        x: (N, 3, H, W) in [-1, 1].
        aug: strengths and probabilities.
        generator: random source (on ``x``'s device).

    Returns:
        Jittered images in [-1, 1], same shape.
    """
    n, device = x.shape[0], x.device
    rgb = (x + 1.0) * 0.5
    on = (torch.rand(n, generator=generator, device=device) < aug.jitter_p).float()

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, 1.0 - strength, 1.0 + strength, generator, device)
        return (1.0 + on * (f - 1.0)).view(n, 1, 1, 1)  # 1 where jitter is off

    luma = _LUMA.to(device).view(1, 3, 1, 1)
    rgb = rgb * factor(aug.brightness)
    mean = (rgb * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    rgb = (rgb - mean) * factor(aug.contrast) + mean
    gray = (rgb * luma).sum(1, keepdim=True)
    rgb = (rgb - gray) * factor(aug.saturation) + gray
    # Hue: rotate the chroma in YIQ by a random angle; one 3x3 matrix per image.
    angle = _uniform(n, -aug.hue, aug.hue, generator, device) * 2 * math.pi * on
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(n, 3, 3, device=device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    to_yiq = _RGB_TO_YIQ.to(device)
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    rgb = torch.einsum("nij,njhw->nihw", matrix, rgb.clamp(0.0, 1.0))
    gray = (rgb * luma).sum(1, keepdim=True).expand_as(rgb)
    to_gray = torch.rand(n, generator=generator, device=device) < aug.grayscale_p
    rgb = torch.where(to_gray.view(n, 1, 1, 1), gray, rgb)
    return rgb.clamp(0.0, 1.0) * 2.0 - 1.0


def two_views(x: torch.Tensor, size: int, target_size: int, aug: Augmentation,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distorted views of every image and the clean crops they were cut from.

    Args:
        x: (N, 3, S, S) in [-1, 1].
        size: side of the views fed to the encoder.
        target_size: side of the clean crops the decoder rebuilds (same crop windows).
        aug: distortion strengths.
        generator: random source (on ``x``'s device).

    Returns:
        (views, targets): (2N, 3, size, size) jittered views, first all first views then all
        second views, and (2N, 3, target_size, target_size) the same crops without jitter.
    """
    n = x.shape[0]
    both = torch.cat([x, x])
    grids = crop_grids(2 * n, size, aug, generator, x.device)
    crops = resample(both, grids)
    if target_size == size:
        targets = crops
    else:  # the same windows sampled on a grid of the target's size
        targets = F.interpolate(crops, size=(target_size, target_size), mode="bilinear",
                                align_corners=False, antialias=target_size < size)
    views = colour_jitter(crops, aug, generator)
    return views.contiguous(memory_format=torch.channels_last), targets


def local_views(x: torch.Tensor, count: int, size: int, scale: tuple[float, float],
                aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """``count`` small jittered crops of every image (multi-crop), view-major.

    Args:
        x: (N, 3, S, S) in [-1, 1].
        count: crops per image.
        size: their side in pixels.
        scale: their area range as a share of the image.
        aug: distortion strengths.
        generator: random source (on ``x``'s device).

    Returns:
        (count * N, 3, size, size): all first crops, then all second crops, ...
    """
    both = x.repeat(count, 1, 1, 1)
    crops = resample(both, crop_grids(len(both), size, aug, generator, x.device, scale))
    return colour_jitter(crops, aug, generator).contiguous(memory_format=torch.channels_last)
