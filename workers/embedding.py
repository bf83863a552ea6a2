"""Mapper: images -> float32 embeddings, centred and L2-normalised, flip-invariant."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.device import autocast, autocast_dtype
from workers.training import to_tensor


@torch.inference_mode()
def encode_images(model: nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                  batch_size: int = 256, precision: str = "auto") -> np.ndarray:
    """Raw encoder codes, averaged over the image and its mirror image.

    Averaging with the horizontal flip makes a mirrored photo embed exactly like the original.
    Each batch and its mirror go through the encoder as one forward pass (half the calls; a
    single query is one batch of two). Codes stay on the device until the end: one host sync.

    Args:
        model: a trained autoencoder with ``encode``.
        images: (N, S, S, 3) uint8, a host array or a tensor already on ``device``.
        device: where the model lives.
        batch_size: images per forward pass (twice as many rows with the mirrors).
        precision: the ``IMGSIM_PRECISION`` setting. Autocast applies on CUDA only: on a CPU,
            float32 already encodes far faster than needed and keeps the index and query
            vectors of the same image equal (bf16 rounding differs with the batch shape).

    Returns:
        (N, D) float32 codes.
    """
    model.eval()
    amp_dtype = autocast_dtype(device, precision) if device.type == "cuda" else None
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], device)
        with autocast(device, amp_dtype):
            both = model.encode(torch.cat([x, x.flip(3)])).float()
        chunks.append((both[: len(x)] + both[len(x) :]) / 2)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).cpu().numpy().astype(np.float32)


def normalise(codes: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Centre on the collection mean and scale to unit length (zero vectors stay zero).

    Args:
        codes: (N, D) raw codes.
        center: (D,) mean of the indexed collection's codes.

    Returns:
        (N, D) float32; euclidean distance between rows is then in [0, 2].
    """
    centred = np.asarray(codes, dtype=np.float32) - center
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.where(norms > 1e-12, centred / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
