"""Embedding batch path and precision choice: one forward pass per batch, flip-invariant codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.settings import Settings, SettingsError
from workers.device import autocast_dtype
from workers.embedding import encode_images
from workers.model import ModelConfig, build_model
from workers.training import to_tensor

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("architecture", ["default", "seed"])
def test_codes_match_separate_passes_and_ignore_mirroring(images, architecture):
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture, 32, 16)).eval()
    codes = encode_images(model, images, CPU, batch_size=2)
    with torch.inference_mode():
        x = to_tensor(images, CPU)
        expected = ((model.encode(x) + model.encode(x.flip(3))) / 2).numpy()
    np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-5)
    mirrored = encode_images(model, np.ascontiguousarray(images[:, :, ::-1]), CPU)
    np.testing.assert_allclose(mirrored, codes, rtol=1e-4, atol=1e-5)
    single = encode_images(model, images[:1], CPU)  # the query path: a batch of one
    np.testing.assert_allclose(single, codes[:1], rtol=1e-4, atol=1e-5)


def test_to_tensor_takes_host_arrays_read_only_memmaps_and_device_tensors(images, tmp_path):
    np.save(tmp_path / "p.npy", images)
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    from_map = to_tensor(mapped[1:3], CPU)
    from_tensor = to_tensor(torch.from_numpy(images.copy())[1:3], CPU)
    assert from_map.shape == (2, 3, 32, 32)
    assert from_map.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(from_map, from_tensor)
    assert float(from_map.min()) >= -1.0 and float(from_map.max()) <= 1.0


def test_precision_setting_and_autocast_choice():
    assert Settings.from_env({}).precision == "auto"
    assert Settings.from_env({"IMGSIM_PRECISION": "FP32"}).precision == "fp32"
    with pytest.raises(SettingsError):
        Settings.from_env({"IMGSIM_PRECISION": "fp8"})
    assert Settings.from_env({"IMGSIM_PIXEL_CACHE_BYTES": "0"}).pixel_cache_bytes == 0
    assert autocast_dtype(CPU, "fp32") is None
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
