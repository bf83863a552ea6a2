"""A version's vectors: trained rows (memory-mapped .npy) plus an append-only file of added rows.

Every worker process maps the same files read-only, so the pages live once in the page cache
however many processes serve queries. Rows added after training go to ``added_vectors.f32``
(raw little-endian float32, row-major); the committed row count lives in Redis, and a reader
re-maps the file when that count grows. Bytes past the committed count (a writer that died
between its file append and its Redis commit) are never read and are cut off by the next writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ADDED_VECTORS = "added_vectors.f32"
# Rows per block when scanning everything: bounds the temporary (block x dim) products.
SCAN_BLOCK = 131_072


class VectorStore:
    """Row i of the collection, for i in [0, len(self)).

    Args:
        base: (N0, dim) float32 rows from training (a read-only memmap in workers).
        folder: the version folder holding ``added_vectors.f32``; None for a fixed matrix.
    """

    def __init__(self, base: np.ndarray, folder: Path | None = None) -> None:
        if base.ndim != 2:
            raise ValueError("vectors must be a (rows, dim) matrix")
        self.base = base
        self.dim = int(base.shape[1])
        self.folder = folder
        self.extra = np.zeros((0, self.dim), dtype=np.float32)
        self._base_sq = None

    @property
    def base_rows(self) -> int:
        return int(self.base.shape[0])

    def __len__(self) -> int:
        return self.base_rows + int(self.extra.shape[0])

    @property
    def added_path(self) -> Path | None:
        return None if self.folder is None else self.folder / ADDED_VECTORS

    def resize(self, total_rows: int) -> None:
        """Map the added-rows file up to ``total_rows`` rows in all (the committed count)."""
        extra_rows = max(0, total_rows - self.base_rows)
        if extra_rows == self.extra.shape[0]:
            return
        if extra_rows == 0 or self.added_path is None:
            self.extra = np.zeros((0, self.dim), dtype=np.float32)
            return
        self.extra = np.memmap(self.added_path, dtype="<f4", mode="r",
                               shape=(extra_rows, self.dim))

    def append(self, vectors: np.ndarray, committed_rows: int) -> int:
        """Writer side: append rows after the committed ones, durable on return.

        Args:
            vectors: (n, dim) float32 rows.
            committed_rows: the row count Redis holds now (the caller holds the write lock).

        Returns:
            The row id of the first appended row.
        """
        if self.added_path is None:
            raise RuntimeError("this vector store has no folder to append to")
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        keep_bytes = max(0, committed_rows - self.base_rows) * self.dim * 4
        with open(self.added_path, "ab") as handle:
            handle.truncate(keep_bytes)  # drop an uncommitted tail left by a failed writer
            handle.seek(keep_bytes)
            handle.write(vectors.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        return max(committed_rows, self.base_rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) float32 copy of ``rows``, which must be sorted ascending."""
        rows = np.asarray(rows, dtype=np.int64)
        split = int(np.searchsorted(rows, self.base_rows))
        low = np.asarray(self.base[rows[:split]], dtype=np.float32)
        if split == len(rows):
            return low
        high = np.asarray(self.extra[rows[split:] - self.base_rows], dtype=np.float32)
        return np.concatenate([low, high])

    def base_sq_norms(self) -> np.ndarray:
        """Squared norms of the trained rows, computed once (they never change)."""
        if self._base_sq is None:
            parts = [np.einsum("ij,ij->i", block, block) for _, block in self._blocks(self.base)]
            self._base_sq = (np.concatenate(parts) if parts else np.zeros(0)).astype(np.float32)
        return self._base_sq

    @staticmethod
    def _blocks(matrix: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, matrix.shape[0], SCAN_BLOCK):
            yield start, np.asarray(matrix[start : start + SCAN_BLOCK], dtype=np.float32)

    def scan(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Every row in blocks: (first row id, block, squared norms of the block)."""
        sq = self.base_sq_norms()
        for start, block in self._blocks(self.base):
            yield start, block, sq[start : start + len(block)]
        for start, block in self._blocks(self.extra):
            yield self.base_rows + start, block, np.einsum("ij,ij->i", block, block)
