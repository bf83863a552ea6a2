"""Train an autoencoder on decoded images with a validation split and early stopping."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from workers.augment import Augmentation, local_views, two_views
from workers.device import autocast
from workers.model import InvariantAutoencoder, ModelConfig, build_model


@dataclass(frozen=True)
class InvarianceObjective:
    """The default model's objective: rebuild clean crops from distorted views, and make the
    codes of the views of one image more alike than those of other images in the batch.

    Each image gives two large views (the decoder rebuilds their clean crops) and a few small
    local views (multi-crop: cheap at a quarter of the pixels, and matching a detail to the
    whole image is a harder, more useful task than matching two large crops).

    Attributes:
        view_fraction: large views are cut at this share of the image side (global pooling lets
            the encoder embed the full image afterwards; smaller views make training cheaper).
        target_size: side of the clean crops the decoder rebuilds.
        temperature: softmax temperature of the contrastive term.
        reconstruction_weight: weight of the reconstruction MSE against the contrastive term.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        local_views: small views per image (0: two views only, plain NT-Xent).
        local_fraction: their side as a share of the image side.
        local_scale: their crop area range as a share of the image.
        augmentation: distortions of every view.
    """

    view_fraction: float = 0.75
    target_size: int = 32
    temperature: float = 0.2
    reconstruction_weight: float = 1.0
    warmup_epochs: int = 1
    local_views: int = 6
    local_fraction: float = 0.375
    local_scale: tuple[float, float] = (0.05, 0.3)
    augmentation: Augmentation = field(default_factory=Augmentation)

    def view_size(self, image_size: int) -> int:
        return max(16, int(image_size * self.view_fraction) // 16 * 16)

    def local_size(self, image_size: int) -> int:
        # At least 16 px, so the last stage never convolves a 1x1 map: on this CPU, oneDNN's
        # bf16 weight gradient of a strided 3x3 conv over a 1x1 input is sometimes non-finite
        # (seen with 8 px views of 32 px images, one thread).
        return max(16, int(image_size * self.local_fraction) // 8 * 8)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings of one training run."""

    epochs: int
    batch_size: int
    learning_rate: float
    val_fraction: float
    patience: int
    seed: int
    invariance: InvarianceObjective = field(default_factory=InvarianceObjective)


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


def contrastive_loss(z: torch.Tensor, temperature: float, views: int = 2) -> torch.Tensor:
    """Contrastive loss over ``views`` views of N images (NT-Xent when ``views`` is 2).

    Every row is an anchor; its positives are the other views of its image, every other row
    is a negative. The loss is the mean over anchors and positives of -log softmax(positive)
    among all rows but the anchor itself.

    Args:
        z: (views * N, P) projections, view-major: rows i, i + N, i + 2N, ... are image i.
        temperature: softmax temperature.
        views: views per image.

    Returns:
        Scalar loss.
    """
    z = nn.functional.normalize(z.float(), dim=1)
    rows = z.shape[0]
    n = rows // views
    eye = torch.eye(rows, dtype=torch.bool, device=z.device)
    log_prob = (z @ z.T / temperature).masked_fill(eye, float("-inf")).log_softmax(dim=1)
    image = torch.arange(rows, device=z.device) % n
    positive = (image[:, None] == image[None, :]) & ~eye
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / (views - 1)).mean()


def _invariance_losses(model: nn.Module, x: torch.Tensor, objective: InvarianceObjective,
                       generator: torch.Generator, amp_dtype: torch.dtype | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction MSE, contrastive loss) of one batch of clean images in [-1, 1]."""
    view = objective.view_size(x.shape[-1])
    views, targets = two_views(x, view, objective.target_size, objective.augmentation,
                               generator)
    with autocast(x.device, amp_dtype):
        codes = model.encode(views)
        projections = model.project(codes)
        recon = model.decode(codes, objective.target_size)
        if objective.local_views:
            local = local_views(x, objective.local_views, objective.local_size(x.shape[-1]),
                                objective.local_scale, objective.augmentation, generator)
            projections = torch.cat([projections, model.project(model.encode(local))])
    reconstruction = nn.functional.mse_loss(recon.float(), targets)
    return reconstruction, contrastive_loss(projections, objective.temperature,
                                            2 + objective.local_views)


def _reconstruction_loss(model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                         amp_dtype: torch.dtype | None) -> torch.Tensor:
    """MSE of rebuilding a randomly mirrored batch (the seed's objective)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    with autocast(x.device, amp_dtype):
        recon = model(x)
    return nn.functional.mse_loss(recon.float(), x)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _evaluate(model: nn.Module, images: np.ndarray, rows: np.ndarray, config: TrainingConfig,
              device: torch.device, amp_dtype: torch.dtype | None) -> tuple[float, dict]:
    """Validation loss (and its parts) on held-out rows.

    For the invariance objective the views are drawn from a generator re-seeded on every call,
    so each epoch is scored on the same distorted views and losses are comparable over epochs.
    """
    model.eval()
    invariant = isinstance(model, InvariantAutoencoder)
    generator = _generator(device, config.seed + 2)
    # Summed on device: one host sync. Contrastive batches have the training batch size, since
    # the loss depends on how many negatives a view meets.
    sums = torch.zeros(2, device=device)
    count = 0
    batch = config.batch_size if invariant else 256
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            x = to_tensor(images[np.sort(rows[start : start + batch])], device)
            if invariant:  # batch norm runs on its statistics here: a batch of one is fine
                recon, contrast = _invariance_losses(model, x, config.invariance, generator,
                                                     amp_dtype)
                sums += torch.stack([recon, contrast]) * len(x)
                count += len(x)
            else:
                sums[0] += nn.functional.mse_loss(model(x), x, reduction="sum")
                count += x.numel()
    model.train()
    recon, contrast = (float(v) / max(count, 1) for v in sums)
    if not invariant:
        return recon, {}
    weight = config.invariance.reconstruction_weight
    parts = {"val_reconstruction": round(recon, 6), "val_contrastive": round(contrast, 6)}
    return weight * recon + contrast, parts


def _learning_rate(config: TrainingConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay to zero over the planned epochs (default model)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total // 2, config.invariance.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_autoencoder(
    images: np.ndarray,
    model_config: ModelConfig,
    config: TrainingConfig,
    device: torch.device,
    on_progress: Callable[[dict], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> TrainingOutcome:
    """Train an autoencoder with a validation split and early stopping.

    The seed architecture (and revision 1 of "default") learn plain MSE reconstruction of
    randomly mirrored images with Adam at a constant rate. The default architecture learns the
    ``InvarianceObjective``: two random crops of each image (resized, mirrored, colour-jittered,
    some gray) are encoded, the decoder rebuilds each clean crop from its code (MSE), and a
    contrastive term on the projected codes pulls the two views of an image together; Adam with
    a warm-up and cosine decay over the planned epochs. Validation uses the same loss.

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
    invariant = isinstance(model, InvariantAutoencoder)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_rows, val_rows = split_indices(len(images), config.val_fraction, config.seed)
    rng = np.random.default_rng(config.seed + 1)
    generator = _generator(device, config.seed + 1)
    history: list[dict] = []
    best_loss, best_state, best_epoch, bad_epochs = float("inf"), None, 0, 0
    per_epoch = len(train_rows)
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    step = 0
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
            if invariant:
                for group in optimiser.param_groups:
                    group["lr"] = _learning_rate(config, step, steps_per_epoch)
                recon, contrast = _invariance_losses(model, x, config.invariance, generator,
                                                     amp_dtype)
                loss = config.invariance.reconstruction_weight * recon + contrast
            else:
                loss = _reconstruction_loss(model, x, generator, amp_dtype)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.detach()
            batches += 1
            step += 1
            if on_progress:
                on_progress({
                    "epoch": epoch, "epochs": config.epochs,
                    "loss": None if not history else history[-1]["train_loss"],
                    "images_done": (epoch - 1) * per_epoch + min(start + len(rows), per_epoch),
                    "images_total": config.epochs * per_epoch,
                })
        train_loss = float(running) / max(batches, 1)
        val_loss, parts = _evaluate(model, images, val_rows, config, device, amp_dtype)
        history.append({
            "epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
            **parts, "seconds": round(time.perf_counter() - started, 2),
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
