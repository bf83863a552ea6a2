"""LSH tables in Redis through lshashpy3's ``LSHash`` and storage interface, fixed at the seam.

lshashpy3 0.0.9 as shipped: imports ``pkg_resources`` (gone from setuptools >= 82), puts table i
in Redis *database* i, stores every vector as JSON in every table, returns bytes that its own
``query()`` rejects, drops ``extra_data=0`` and keeps its random planes in process memory only.
Here the planes come from the model version (so every worker hashes identically), all tables
live in one database under a per-version hash-tagged namespace, buckets hold compact integer
row ids (Redis intsets), vectors live once in a float32 matrix, Redis calls are pipelined and
re-ranking is one matrix product.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import redis


def _import_lshashpy3() -> types.ModuleType:
    # lshashpy3/__init__.py does a bare `import pkg_resources` it never uses. With setuptools
    # >= 82 that module no longer exists, so give the import an empty stand-in rather than
    # pinning an old setuptools (whose pkg_resources warns on import).
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        sys.modules.setdefault("pkg_resources", types.ModuleType("pkg_resources"))
    return importlib.import_module("lshashpy3")


_lshashpy3 = _import_lshashpy3()
from lshashpy3.lshash import LSHash  # noqa: E402  (needs the shim above)
from lshashpy3.storage import BaseStorage  # noqa: E402

# Buckets per table are read with one pipelined round trip; keep a query's key count bounded.
MAX_PROBES_PER_TABLE = 64


@dataclass(frozen=True)
class LshParams:
    """Shape of the LSH index of one model version."""

    hash_bits: int
    num_tables: int

    @classmethod
    def for_size(cls, n_items: int, hash_bits: int | None = None, num_tables: int | None = None):
        """Pick bits so buckets hold ~8 items, unless the caller chose.

        Args:
            n_items: how many vectors will be indexed.
            hash_bits: explicit bits per table, or None.
            num_tables: explicit number of tables, or None (default 8).

        Returns:
            LshParams.
        """
        bits = hash_bits or int(min(24, max(2, round(math.log2(max(n_items, 2) / 8)))))
        return cls(hash_bits=bits, num_tables=num_tables or 8)


def generate_planes(params: LshParams, dim: int, seed: int) -> np.ndarray:
    """Random hyperplanes saved with the model version: shape (tables, bits, dim), float32."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((params.num_tables, params.hash_bits, dim)).astype(np.float32)


class RedisBucketStorage(BaseStorage):
    """lshashpy3 storage for one table: a Redis SET of integer row ids per bucket.

    Keys are ``<namespace>:t<table>:<bucket hex>`` in the configured database; nothing is
    written to other databases, and no vector is stored here.
    """

    def __init__(self, config: dict) -> None:
        self.name = "redis"
        self.storage: redis.Redis = config["client"]
        self.prefix: str = config["prefix"]

    def key(self, bucket: str) -> str:
        return self.prefix + bucket

    def keys(self, pattern: str = "*") -> list[str]:
        start = len(self.prefix)
        return [k.decode()[start:] for k in self.storage.scan_iter(match=self.prefix + pattern)]

    def set_val(self, key: str, val) -> None:
        self.storage.set(self.key(key), val)

    def get_val(self, key: str):
        return self.storage.get(self.key(key))

    def append_val(self, key: str, val) -> None:
        self.storage.sadd(self.key(key), int(val))

    def get_list(self, key: str) -> list[int]:
        return sorted(int(v) for v in self.storage.smembers(self.key(key)))


@dataclass(frozen=True)
class SearchResult:
    """Ranked rows and how they were found."""

    rows: np.ndarray  # int64 row ids, best first
    distances: np.ndarray  # float32 euclidean distances
    method: str  # "lsh" or "exact_fallback" or "exact"
    candidates: int  # how many rows were scored


class LshIndex(LSHash):
    """An lshashpy3 ``LSHash`` over one model version's vectors, stored in one Redis namespace.

    Args:
        client: Redis connection (any database; the namespace isolates versions).
        namespace: key prefix of this version, e.g. ``imgsim:{v1}``.
        planes: (tables, bits, dim) hyperplanes from the model artifact.
        vectors: (N, dim) float32 matrix whose row i is item i (may be a read-only memmap).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        planes: np.ndarray,
        vectors: np.ndarray | None = None,
    ) -> None:
        planes = np.asarray(planes, dtype=np.float32)
        if planes.ndim != 3:
            raise ValueError("planes must have shape (tables, bits, dim)")
        self._client = client
        self.namespace = namespace
        self.planes = planes
        self.vectors = vectors
        # lshashpy3 keeps planes it finds already set instead of drawing new random ones.
        self.uniform_planes = list(planes)
        self._weights = (1 << np.arange(planes.shape[1], dtype=np.int64)).astype(np.int64)
        super().__init__(
            hash_size=planes.shape[1],
            input_dim=planes.shape[2],
            num_hashtables=planes.shape[0],
            storage_config={"redis": {"client": client, "prefix": namespace}},
        )

    def _init_hashtables(self) -> None:
        self.hash_tables = [
            RedisBucketStorage({"client": self._client, "prefix": f"{self.namespace}:t{i}:"})
            for i in range(self.num_hashtables)
        ]

    # -- hashing ---------------------------------------------------------------------------

    def _check_dim(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float32)
        if points.ndim == 1:
            points = points[None, :]
        if points.shape[1] != self.input_dim:
            raise ValueError(
                f"model/index dimension mismatch: vectors have {points.shape[1]} values, "
                f"the index expects {self.input_dim}"
            )
        if not np.isfinite(points).all():
            raise ValueError("vector contains NaN or infinity")
        return points

    def projections(self, points: np.ndarray) -> np.ndarray:
        """(N, tables, bits) signed projections of ``points`` on every plane."""
        points = self._check_dim(points)
        return np.einsum("nd,tbd->ntb", points, self.planes, optimize=True)

    def codes(self, points: np.ndarray) -> np.ndarray:
        """(N, tables) integer bucket codes; bit j set when the projection on plane j > 0."""
        return ((self.projections(points) > 0).astype(np.int64) * self._weights).sum(axis=2)

    def _hash(self, planes, input_point) -> str:
        # lshashpy3 calls this per table; one bucket naming scheme for both paths.
        bits = (np.dot(planes, np.asarray(input_point, dtype=np.float32)) > 0).astype(np.int64)
        return format(int((bits * self._weights).sum()), "x")

    # -- writing ---------------------------------------------------------------------------

    def index(self, input_point, extra_data=None):
        """lshashpy3's single-item ``index``: ``extra_data`` is the integer row id (0 is kept)."""
        if extra_data is None:
            raise ValueError("extra_data must be the item's integer row id")
        self.index_batch(np.asarray([int(extra_data)]), np.asarray(input_point)[None, :])
        return [format(int(c), "x") for c in self.codes(np.asarray(input_point))[0]]

    def index_batch(self, rows: Iterable[int], points: np.ndarray, chunk: int = 10_000) -> None:
        """Add rows to every table with pipelined SADDs, one per (table, bucket).

        Args:
            rows: integer row ids (row i of the vector store).
            points: (N, dim) vectors for those rows.
            chunk: rows hashed and written per round trip.
        """
        rows = np.asarray(list(rows), dtype=np.int64)
        points = self._check_dim(points)
        for start in range(0, len(rows), chunk):
            part_rows = rows[start : start + chunk]
            codes = self.codes(points[start : start + chunk])
            pipe = self._client.pipeline(transaction=False)
            for table in range(self.num_hashtables):
                order = np.argsort(codes[:, table], kind="stable")
                sorted_codes = codes[order, table]
                bounds = np.flatnonzero(np.diff(sorted_codes)) + 1
                for group in np.split(np.arange(len(order)), bounds):
                    code = int(sorted_codes[group[0]])
                    members = part_rows[order[group]].tolist()
                    pipe.sadd(f"{self.namespace}:t{table}:{code:x}", *members)
            pipe.execute()

    def delete_all(self, batch: int = 1000) -> int:
        """Remove every key of this namespace with SCAN + UNLINK (never KEYS); return count."""
        return delete_namespace(self._client, self.namespace, batch)

    # -- reading ---------------------------------------------------------------------------

    def probe_codes(self, query: np.ndarray, probes: int) -> list[list[int]]:
        """Per table: the query's bucket, then neighbours that flip the least certain bits.

        Args:
            query: (dim,) vector.
            probes: how many single-bit-flip neighbours to add per table.

        Returns:
            A list (one per table) of bucket codes, own bucket first.
        """
        proj = self.projections(query)[0]  # (tables, bits)
        own = ((proj > 0).astype(np.int64) * self._weights).sum(axis=1)
        order = np.argsort(np.abs(proj), axis=1)  # smallest margin first = likeliest misses
        probes = min(probes, self.hash_size, MAX_PROBES_PER_TABLE)
        out = []
        for table in range(self.num_hashtables):
            codes = [int(own[table])]
            for bit in order[table, :probes]:
                codes.append(int(own[table]) ^ (1 << int(bit)))
            out.append(codes)
        return out

    def candidate_rows(self, query: np.ndarray, probes: int) -> np.ndarray:
        """Union of the rows in all probed buckets, read in one pipelined round trip."""
        pipe = self._client.pipeline(transaction=False)
        for table, codes in enumerate(self.probe_codes(query, probes)):
            for code in codes:
                pipe.smembers(f"{self.namespace}:t{table}:{code:x}")
        members: set[int] = set()
        for result in pipe.execute():
            members.update(int(v) for v in result)
        return np.fromiter(members, dtype=np.int64, count=len(members))

    def rank(self, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact euclidean re-rank of ``rows`` against ``query``, vectorised; best k first."""
        if self.vectors is None:
            raise RuntimeError("this index was opened without its vector store")
        query = self._check_dim(query)[0]
        rows = np.unique(np.asarray(rows, dtype=np.int64))  # sorted: memmap reads stay local
        if len(rows) == 0:
            return rows, np.zeros(0, dtype=np.float32)
        block = np.asarray(self.vectors[rows], dtype=np.float32)
        # Direct differences (not the |a|^2 - 2ab + |b|^2 expansion) so a self-match is ~0.
        dist = np.linalg.norm(block - query, axis=1).astype(np.float32)
        k = min(k, len(rows))
        top = np.argpartition(dist, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        top = top[np.lexsort((rows[top], dist[top]))]  # ties broken by row id: deterministic
        return rows[top], dist[top]

    def query(self, query_point, num_results=None, distance_func=None):
        """lshashpy3's ``query``: [(row id, euclidean distance)], best first."""
        if distance_func not in (None, "true_euclidean", "euclidean"):
            raise ValueError("only euclidean distance is supported by this index")
        result = self.search(np.asarray(query_point), num_results or 10)
        dist = result.distances if distance_func != "euclidean" else result.distances ** 2
        return list(zip(result.rows.tolist(), dist.tolist(), strict=True))

    def search(self, query: np.ndarray, k: int, probes: int | None = None,
               exact: bool = False) -> SearchResult:
        """Find the k nearest rows: LSH candidates re-ranked exactly, widening when short.

        Args:
            query: (dim,) vector, in the same space as the stored vectors.
            k: how many results.
            probes: single-bit-flip neighbours per table; None starts at 0 and widens.
            exact: skip LSH and scan every vector.

        Returns:
            SearchResult; ``method`` says whether LSH or the exact fallback produced it.
        """
        total = 0 if self.vectors is None else len(self.vectors)
        k = min(k, total)
        if exact or k == 0:
            rows, dist = self.rank(query, np.arange(total), k)
            return SearchResult(rows, dist, "exact", total)
        steps = ([probes] if probes is not None
                 else [0, 1, max(2, self.hash_size // 2), self.hash_size])
        rows = np.zeros(0, dtype=np.int64)
        for step in steps:
            rows = self.candidate_rows(query, step)
            if len(rows) >= k:
                top, dist = self.rank(query, rows, k)
                return SearchResult(top, dist, "lsh", len(rows))
        # Buckets came back short even after widening: answer exactly and say so.
        top, dist = self.rank(query, np.arange(total), k)
        return SearchResult(top, dist, "exact_fallback", total)


def delete_namespace(client: redis.Redis, namespace: str, batch: int = 1000) -> int:
    """UNLINK every key under ``namespace:`` found by SCAN; return how many were removed."""
    removed = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{namespace}:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            removed += client.unlink(*keys)
            keys = []
    if keys:
        removed += client.unlink(*keys)
    return removed
