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
