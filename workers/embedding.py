"""Mapper: images -> float32 embeddings, centred and L2-normalised, flip-invariant."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.training import to_tensor


@torch.inference_mode()
def encode_images(model: nn.Module, images: np.ndarray, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """Raw encoder codes, averaged over the image and its mirror image.

    Averaging with the horizontal flip makes a mirrored photo embed exactly like the original.

    Args:
        model: a trained autoencoder with ``encode``.
        images: (N, S, S, 3) uint8.
        device: where the model lives.
        batch_size: images per forward pass.

    Returns:
        (N, D) float32 codes.
    """
    model.eval()
    use_amp = device.type == "cuda"
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            codes = (model.encode(x).float() + model.encode(x.flip(3)).float()) / 2
        chunks.append(codes)
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
