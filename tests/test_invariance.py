"""The default model's objective: batch augmentations, the contrastive term, revisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workers.artifacts import load_version, save_version
from workers.augment import Augmentation, colour_jitter, crop_grids, resample, two_views
from workers.device import autocast_dtype, torch_threads
from workers.model import (
    InvariantAutoencoder,
    ModelConfig,
    SeedAutoencoder,
    SpatialCodeAutoencoder,
    build_model,
)
from workers.training import (
    InvarianceObjective,
    TrainingConfig,
    contrastive_loss,
    to_tensor,
    train_autoencoder,
)

CPU = torch.device("cpu")
NO_JITTER = Augmentation(jitter_p=0.0, grayscale_p=0.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_full_crop_without_jitter_is_the_image_or_its_mirror():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    whole = Augmentation(min_scale=1.0, max_aspect=1.0, jitter_p=0.0, grayscale_p=0.0)
    out = resample(x, crop_grids(6, 16, whole, _gen(), CPU))
    for i in range(6):
        same = torch.allclose(out[i], x[i], atol=1e-5)
        mirrored = torch.allclose(out[i], x[i].flip(2), atol=1e-5)
        assert same or mirrored
    assert colour_jitter(x, NO_JITTER, _gen()).sub(x).abs().max() < 1e-5


def test_two_views_shapes_range_and_determinism():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    views, targets = two_views(x, 16, 8, Augmentation(), _gen(3))
    assert views.shape == (8, 3, 16, 16) and targets.shape == (8, 3, 8, 8)
    assert views.is_contiguous(memory_format=torch.channels_last)
    assert float(views.min()) >= -1.0 and float(views.max()) <= 1.0
    again, _ = two_views(x, 16, 8, Augmentation(), _gen(3))
    torch.testing.assert_close(views, again)
    other, _ = two_views(x, 16, 8, Augmentation(), _gen(4))
    assert not torch.allclose(views, other)
    # Grayscale always: the three channels are equal.
    gray = colour_jitter(x, Augmentation(jitter_p=0.0, grayscale_p=1.0), _gen())
    torch.testing.assert_close(gray[:, 0], gray[:, 2])


def test_contrastive_loss_by_hand():
    # Two images, two views each, orthogonal: row 0's positive (row 2) has cosine 1, its two
    # negatives cosine 0. At temperature 1: -log(e / (e + 1 + 1)) = log(2 + e) - 1 per row.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(contrastive_loss(z, 1.0)) == pytest.approx(math.log(2 + math.e) - 1, abs=1e-6)
    # Three views: each row has two positives (cosine 1) and three negatives (cosine 0).
    z3 = torch.cat([z[:2]] * 3)
    expected = -(1 - math.log(2 * math.e + 3))
    assert float(contrastive_loss(z3, 1.0, views=3)) == pytest.approx(expected, abs=1e-6)
    # Telling images apart is rewarded: swapping a positive for a negative raises the loss.
    worse = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(contrastive_loss(worse, 1.0)) > float(contrastive_loss(z, 1.0))


def test_default_model_embeds_any_multiple_of_16_and_decodes_requested_size():
    model = build_model(ModelConfig("default", 64, 32)).eval()
    assert isinstance(model, InvariantAutoencoder)
    with torch.inference_mode():
        assert model.encode(torch.zeros(2, 3, 64, 64)).shape == (2, 32)
        assert model.encode(torch.zeros(2, 3, 48, 48)).shape == (2, 32)
        assert model.decode(torch.zeros(2, 32), 24).shape == (2, 3, 24, 24)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert isinstance(build_model(ModelConfig("seed", 32, 16)), SeedAutoencoder)


def test_invariance_training_reports_both_parts_and_keeps_the_best_epoch():
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    config = TrainingConfig(epochs=3, batch_size=4, learning_rate=1e-3, val_fraction=0.25,
                            patience=5, seed=0)
    outcome = train_autoencoder(images, ModelConfig("default", 32, 16), config, CPU)
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3]
    for h in outcome.history:
        assert h["val_loss"] == pytest.approx(h["val_reconstruction"] + h["val_contrastive"],
                                              abs=2e-6)
        assert np.isfinite(h["train_loss"])
    best = min(outcome.history, key=lambda h: h["val_loss"])
    assert outcome.best_epoch == best["epoch"]
    assert not outcome.model.training


def test_versions_saved_before_revisions_load_the_revision_1_design(tmp_path):
    old = SpatialCodeAutoencoder(ModelConfig("default", 32, 16, revision=1)).eval()
    config = {"model": {"architecture": "default", "image_size": 32, "embedding_dim": 16},
              "dataset_root": str(tmp_path)}
    vectors = np.zeros((1, 16), np.float32)
    save_version(tmp_path, "v1", old, config, np.zeros((1, 2, 16), np.float32),
                 np.zeros(16, np.float32), vectors, [{"image_id": "a", "path": "a.png"}])
    loaded = load_version(tmp_path, "v1", CPU)
    assert isinstance(loaded.model, SpatialCodeAutoencoder)
    x = to_tensor(np.full((1, 32, 32, 3), 90, np.uint8), CPU)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.encode(x), old.encode(x))
    # New versions record their revision and get the current design back.
    new = build_model(ModelConfig("default", 32, 16))
    config = {"model": ModelConfig("default", 32, 16).to_dict(), "dataset_root": str(tmp_path)}
    save_version(tmp_path, "v2", new, config, np.zeros((1, 2, 16), np.float32),
                 np.zeros(16, np.float32), vectors, [{"image_id": "a", "path": "a.png"}])
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["model"]["revision"] == 2
    assert isinstance(load_version(tmp_path, "v2", CPU).model, InvariantAutoencoder)


def test_small_images_train_without_non_finite_gradients():
    # 8 px local views of 32 px images once fed a 1x1 map to the last stage, whose bf16 weight
    # gradient oneDNN sometimes returned as NaN (one thread, the messy folder of
    # tests/integration/test_job_api.py): views are now at least 16 px. That failure came and
    # went between runs, so the sizes are checked directly; the training below is a smoke run
    # at the smallest image size and batch, in the precision jobs use.
    assert InvarianceObjective().local_size(32) == 16
    assert InvarianceObjective().local_size(64) == 24
    images = np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    config = TrainingConfig(epochs=3, batch_size=2, learning_rate=1e-3, val_fraction=0.1,
                            patience=5, seed=3)
    with torch_threads(1):
        outcome = train_autoencoder(images, ModelConfig("default", 32, 32), config, CPU,
                                    amp_dtype=autocast_dtype(CPU, "auto"))
    assert all(np.isfinite(h["train_loss"]) for h in outcome.history)
    assert all(torch.isfinite(v).all() for v in outcome.model.state_dict().values()
               if v.is_floating_point())
