"""Device choice and torch threading, done inside each worker process (never before fork)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def resolve_device(setting: str) -> torch.device:
    """Pick the torch device from the ``IMGSIM_DEVICE`` setting.

    Args:
        setting: "auto", "cpu", "cuda" or "cuda:N".

    Returns:
        CUDA when asked for or (with "auto") when available, else CPU.
    """
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"IMGSIM_DEVICE={setting} but no CUDA device is available")
        return torch.device(setting)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` intra-op threads, then restore the process's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def configure_threads(torch_threads: int, concurrency: int) -> int:
    """Give each prefork child a fair share of the cores; return the thread count used."""
    threads = torch_threads or max(1, (os.cpu_count() or 1) // max(1, concurrency))
    torch.set_num_threads(threads)
    return threads


def _cpu_has_native_bf16() -> bool:
    # bf16 autocast on a CPU without bf16 instructions is emulated and slower than float32.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The lower precision to autocast to on ``device``, or None for plain float32.

    Args:
        device: where the model runs.
        precision: the ``IMGSIM_PRECISION`` setting: "auto" (bf16 where the hardware computes
            it natively: CUDA with bf16 support, CPUs with AVX512-BF16 or AMX) or "fp32".

    Returns:
        torch.bfloat16 or None.
    """
    if precision != "auto":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
