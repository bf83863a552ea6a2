"""Train an autoencoder on decoded images with a validation split and early stopping."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workers.device import autocast
from workers.model import ModelConfig, build_model


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings of one training run."""

    epochs: int
    batch_size: int
    learning_rate: float
    val_fraction: float
    patience: int
    seed: int


@dataclass
class TrainingOutcome:
    """The best model (by validation loss) and the per-epoch history."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    stopped_early: bool


def to_tensor(batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], channels-last in memory.

    ``batch`` may already be a uint8 tensor on ``device`` (images staged there once, see
    ``workers.reader.stage_images``); host arrays go through pinned memory to a GPU so the
    copy is asynchronous.
    """
    if isinstance(batch, torch.Tensor):
        x = batch.to(device, non_blocking=True)
    else:
        if not batch.flags.writeable:  # decoded PIL arrays and cache memmaps are read-only
            batch = batch.copy()
        x = torch.from_numpy(batch)
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle and split row indices; with too few images validation reuses the training set."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 2:
        return order, order
    return order[n_val:], order[:n_val]


def _evaluate(model: nn.Module, images: np.ndarray, rows: np.ndarray, batch: int,
              device: torch.device) -> float:
    model.eval()
    total, count = torch.zeros((), device=device), 0  # summed on device: one host sync
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            x = to_tensor(images[np.sort(rows[start : start + batch])], device)
            total += nn.functional.mse_loss(model(x), x, reduction="sum")
            count += x.numel()
    model.train()
    return float(total) / max(count, 1)


def train_autoencoder(
    images: np.ndarray,
    model_config: ModelConfig,
    config: TrainingConfig,
    device: torch.device,
    on_progress: Callable[[dict], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> TrainingOutcome:
    """Train with MSE reconstruction, Adam, random horizontal flips and early stopping.

    Args:
        images: (N, S, S, 3) uint8, S == model_config.image_size.
        model_config: architecture and sizes.
        config: optimisation settings.
        device: where to train.
        on_progress: receives {"epoch", "epochs", "loss", "images_done", "images_total"}.
        amp_dtype: autocast the forward pass to this dtype (None: float32); see
            ``workers.device.autocast_dtype``.

    Returns:
        TrainingOutcome holding the weights of the best validation epoch.
    """
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_rows, val_rows = split_indices(len(images), config.val_fraction, config.seed)
    rng = np.random.default_rng(config.seed + 1)
    history: list[dict] = []
    best_loss, best_state, best_epoch, bad_epochs = float("inf"), None, 0, 0
    per_epoch = len(train_rows)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        order = rng.permutation(train_rows)
        running = torch.zeros((), device=device)  # summed on device: no per-batch host sync
        batches = 0
        for start in range(0, len(order), config.batch_size):
            rows = np.sort(order[start : start + config.batch_size])
            if len(rows) < 2 and batches:  # a batch of one breaks batch norm statistics
                continue
            x = to_tensor(images[rows], device)
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            with autocast(device, amp_dtype):
                recon = model(x)
            loss = nn.functional.mse_loss(recon.float(), x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.detach()
            batches += 1
            if on_progress:
                on_progress({
                    "epoch": epoch, "epochs": config.epochs,
                    "loss": None if not history else history[-1]["train_loss"],
                    "images_done": (epoch - 1) * per_epoch + min(start + len(rows), per_epoch),
                    "images_total": config.epochs * per_epoch,
                })
        train_loss = float(running) / max(batches, 1)
        val_loss = _evaluate(model, images, val_rows, 256, device)
        history.append({
            "epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
            "seconds": round(time.perf_counter() - started, 2),
        })
        if on_progress:
            # The losses so far travel with the progress so clients can chart them live.
            on_progress({"epoch": epoch, "epochs": config.epochs, "loss": round(train_loss, 6),
                         "val_loss": round(val_loss, 6), "images_done": epoch * per_epoch,
                         "images_total": config.epochs * per_epoch,
                         "history": [dict(h) for h in history]})
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss})")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainingOutcome(model, history, best_epoch, stopped_early=len(history) < config.epochs)
