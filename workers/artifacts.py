"""Writer side of a model version: weights, config, planes, image list and vectors on disk."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.registry import (
    CENTER_FILE,
    CONFIG_FILE,
    IMAGES_FILE,
    PLANES_FILE,
    VECTORS_FILE,
    WEIGHTS_FILE,
)
from workers.model import ModelConfig, build_model

# File names live in shared/ so the API can check a version is complete before activating it.
WEIGHTS = WEIGHTS_FILE
CONFIG = CONFIG_FILE
IMAGES = IMAGES_FILE
VECTORS = VECTORS_FILE
PLANES = PLANES_FILE
CENTER = CENTER_FILE


def new_version_id() -> str:
    """Sortable, unique version id such as ``v20261203-221500-1a2b3c``."""
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class ModelVersion:
    """A loaded model version: encoder, hashing planes and the memory-mapped vector store."""

    version: str
    model: nn.Module
    model_config: ModelConfig
    config: dict
    planes: np.ndarray
    center: np.ndarray
    vectors: np.ndarray  # (N, D) float32, read-only memmap shared by every worker process
    image_ids: list[str]
    paths: list[str]
    dataset_root: str


def save_version(
    artifacts_dir: Path,
    version: str,
    model: nn.Module,
    config: dict,
    planes: np.ndarray,
    center: np.ndarray,
    vectors: np.ndarray,
    images: list[dict],
) -> Path:
    """Write every file of a version into a hidden temp folder, then rename it into place.

    Args:
        artifacts_dir: the configured artifacts folder.
        version: version id (the final folder name).
        model: trained model (weights saved as a state dict, loaded with weights_only=True).
        config: JSON config (model config, training params, LSH params, history).
        planes: (tables, bits, dim) float32 hyperplanes.
        center: (dim,) mean subtracted before normalising.
        vectors: (N, dim) float32 normalised embeddings, row i = images[i].
        images: [{"image_id", "path"}] in row order.

    Returns:
        The final folder; it only ever appears complete.
    """
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    staging = artifacts_dir / f".partial-{version}"
    final = artifacts_dir / version
    staging.mkdir()
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # Serialised in memory, then written by Python: a full or read-only disk surfaces as
        # an OSError naming the cause (torch's own file writer reports only "write failed").
        weights = io.BytesIO()
        torch.save(state, weights)
        (staging / WEIGHTS).write_bytes(weights.getbuffer())
        np.save(staging / VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
        np.save(staging / PLANES, np.asarray(planes, dtype=np.float32))
        np.save(staging / CENTER, np.asarray(center, dtype=np.float32))
        (staging / IMAGES).write_text(json.dumps(images, ensure_ascii=False))
        (staging / CONFIG).write_text(json.dumps(config, indent=2))
        for item in staging.iterdir():  # durable before it becomes visible
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_version(artifacts_dir: Path, version: str, device: torch.device) -> ModelVersion:
    """Load a saved version for querying.

    Args:
        artifacts_dir: the configured artifacts folder.
        version: version id.
        device: where the encoder runs.

    Returns:
        ModelVersion with the encoder in eval mode and vectors memory-mapped read-only.
    """
    folder = artifacts_dir / version
    config = json.loads((folder / CONFIG).read_text())
    # Configs written before the model revision was recorded hold revision-1 weights.
    model_config = ModelConfig(**{"revision": 1, **config["model"]})
    model = build_model(model_config)
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    images = json.loads((folder / IMAGES).read_text())
    return ModelVersion(
        version=version,
        model=model,
        model_config=model_config,
        config=config,
        planes=np.load(folder / PLANES),
        center=np.load(folder / CENTER),
        vectors=np.load(folder / VECTORS, mmap_mode="r"),
        image_ids=[entry["image_id"] for entry in images],
        paths=[entry["path"] for entry in images],
        dataset_root=config["dataset_root"],
    )
