"""LSH tables in Redis through lshashpy3's ``LSHash`` and storage interface, fixed at the seam.

lshashpy3 0.0.9 as shipped: imports ``pkg_resources`` (gone from setuptools >= 82), puts table i
in Redis *database* i, stores every vector as JSON in every table, returns bytes that its own
``query()`` rejects, drops ``extra_data=0`` and keeps its random planes in process memory only.
Here the planes come from the model version (so every worker hashes identically), all tables
live in one database under a per-version hash-tagged namespace, a bucket is one Redis string of
packed little-endian uint32 row ids (about 4 bytes per entry per table, grown with APPEND),
vectors live once in a memory-mapped float32 store, hashing is one matrix product, a query reads
every probed bucket with one MGET, and re-ranking is one matrix product.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import sys
import time
import types
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import redis

from shared.collection import delete_namespace
from shared.keys import NamespaceKeys
from workers.vector_store import VectorStore


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

ROW_DTYPE = np.dtype("<u4")
# Multi-probe perturbs the `PROBE_BITS` least certain bits of each table, up to 3 at a time.
PROBE_BITS = 10
PROBE_MAX_FLIPS = 3
MAX_PROBES_PER_TABLE = sum(math.comb(PROBE_BITS, f) for f in range(1, PROBE_MAX_FLIPS + 1))
# Collections smaller than this are answered by the exact scan: below it the scan of a
# memory-mapped float32 matrix is as fast as a Redis round trip (see bench/search_bench.py).
DEFAULT_EXACT_BELOW = 20_000
# Buckets written per MSET / APPEND round trip while building.
WRITE_BATCH = 4096


@dataclass(frozen=True)
class LshParams:
    """Shape of the LSH index of one model version and its default multi-probe depth."""

    hash_bits: int
    num_tables: int
    probes: int = 16

    @classmethod
    def for_size(cls, n_items: int, hash_bits: int | None = None, num_tables: int | None = None,
                 probes: int | None = None) -> LshParams:
        """Choose bits, tables and probes from the collection size, unless the caller chose.

        Buckets of ~12 rows (bits = floor(log2(N / 12))) keep the Redis overhead per key small
        against the 4 bytes per row; 16 tables, probed deeper as buckets get finer, reach
        recall@10 >= 0.95 at 100k and >= 0.9 at 1M clustered vectors while scoring ~1% of the
        collection (bench/search_bench.py measures it).

        Args:
            n_items: how many vectors will be indexed (at least the training set).
            hash_bits: explicit bits per table, or None.
            num_tables: explicit number of tables, or None.
            probes: explicit extra buckets probed per table, or None.

        Returns:
            LshParams.
        """
        bits = hash_bits or int(min(24, max(4, math.floor(math.log2(max(n_items, 2) / 12)))))
        default_probes = max(8, 12 + 4 * (bits - 13))
        return cls(hash_bits=bits, num_tables=num_tables or 16,
                   probes=probes if probes is not None else default_probes)

    def to_dict(self) -> dict:
        return {"hash_bits": self.hash_bits, "num_tables": self.num_tables, "probes": self.probes}

    @classmethod
    def from_dict(cls, data: dict) -> LshParams:
        return cls(int(data["hash_bits"]), int(data["num_tables"]), int(data.get("probes", 16)))


def generate_planes(params: LshParams, dim: int, seed: int) -> np.ndarray:
    """Random hyperplanes saved with the model version: shape (tables, bits, dim), float32."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((params.num_tables, params.hash_bits, dim)).astype(np.float32)


def pack_rows(rows: Iterable[int]) -> bytes:
    """Row ids as the bytes of a bucket value (little-endian uint32)."""
    return np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows,
                      dtype=ROW_DTYPE).tobytes()


def unpack_rows(value: bytes | None) -> np.ndarray:
    """A bucket value back to int64 row ids (empty for a missing bucket)."""
    return np.frombuffer(value or b"", dtype=ROW_DTYPE).astype(np.int64)


class PackedBucketStorage(BaseStorage):
    """lshashpy3 storage for one table: a Redis string of packed uint32 row ids per bucket.

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
        self.storage.set(self.key(key), pack_rows(val) if not isinstance(val, bytes) else val)

    def get_val(self, key: str):
        return self.storage.get(self.key(key))

    def append_val(self, key: str, val) -> None:
        self.storage.append(self.key(key), pack_rows([int(val)]))

    def get_list(self, key: str) -> list[int]:
        return unpack_rows(self.storage.get(self.key(key))).tolist()


@dataclass(frozen=True)
class SearchResult:
    """Ranked rows and how they were found."""

    rows: np.ndarray  # int64 row ids, best first
    distances: np.ndarray  # float32 euclidean distances
    method: str  # "lsh", "exact" or "exact_fallback"
    candidates: int  # how many rows were scored
    reason: str = ""  # why "exact" / "exact_fallback" answered
    probes: int = 0  # extra buckets per table the answer used (lsh)


def _matvec(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """block @ query on the calling thread (einsum, not BLAS: see ``projections``)."""
    return np.einsum("ij,j->i", block, query)


def _probe_subsets(bits: int) -> np.ndarray:
    """(S, bits) 0/1 matrix: the empty set, then every set of 1..3 of the ``bits`` positions."""
    rows = [np.zeros(bits, dtype=np.float32)]
    for flips in range(1, min(PROBE_MAX_FLIPS, bits) + 1):
        for combo in itertools.combinations(range(bits), flips):
            row = np.zeros(bits, dtype=np.float32)
            row[list(combo)] = 1
            rows.append(row)
    return np.stack(rows)


class LshIndex(LSHash):
    """An lshashpy3 ``LSHash`` over one model version's collection, stored in one Redis namespace.

    Args:
        client: Redis connection (any database; the namespace isolates versions).
        namespace: key prefix of this version, e.g. ``imgsim:{v1}``.
        planes: (tables, bits, dim) hyperplanes from the model artifact.
        vectors: the vector store, or a (N, dim) float32 matrix (row i is item i).
        probes: default extra buckets probed per table.
        exact_below: collections smaller than this are answered by the exact scan.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        planes: np.ndarray,
        vectors: VectorStore | np.ndarray | None = None,
        probes: int = 16,
        exact_below: int = DEFAULT_EXACT_BELOW,
    ) -> None:
        planes = np.asarray(planes, dtype=np.float32)
        if planes.ndim != 3:
            raise ValueError("planes must have shape (tables, bits, dim)")
        if planes.shape[1] > 24:
            raise ValueError("at most 24 hash bits per table")
        self._client = client
        self.namespace = namespace
        self.keys = NamespaceKeys(namespace)
        self.planes = planes
        self._flat_planes = np.ascontiguousarray(planes.reshape(-1, planes.shape[2]).T)
        if vectors is not None and not isinstance(vectors, VectorStore):
            vectors = VectorStore(np.asarray(vectors, dtype=np.float32))
        self.store: VectorStore | None = vectors
        self.default_probes = probes
        self.exact_below = exact_below
        # lshashpy3 keeps planes it finds already set instead of drawing new random ones.
        self.uniform_planes = list(planes)
        # Bit j of a code has weight 2**j; float32 holds these sums exactly up to 24 bits.
        self._weights = (2.0 ** np.arange(planes.shape[1])).astype(np.float32)
        bits = planes.shape[1]
        self._probe_bits = min(PROBE_BITS, bits)
        self._subsets = _probe_subsets(self._probe_bits)
        self.generation: int | None = None
        # Same names as NamespaceKeys.bucket, formatted without a call per key.
        self._table_prefixes = [self.keys.bucket(t, 0)[:-1] for t in range(planes.shape[0])]
        self.added_meta: list[dict] = []
        self._alive = np.ones(len(self.store) if self.store is not None else 0, dtype=bool)
        super().__init__(
            hash_size=bits,
            input_dim=planes.shape[2],
            num_hashtables=planes.shape[0],
            storage_config={"redis": {"client": client, "prefix": namespace}},
        )

    @property
    def client(self) -> redis.Redis:
        return self._client

    def _init_hashtables(self) -> None:
        self.hash_tables = [
            PackedBucketStorage({"client": self._client, "prefix": f"{self.namespace}:t{i}:"})
            for i in range(self.num_hashtables)
        ]

    # -- hashing ---------------------------------------------------------------------------

    def check_vectors(self, points: np.ndarray) -> np.ndarray:
        """(n, dim) float32 view of ``points``; refuses a wrong dimension or NaN / infinity.

        Raises:
            ValueError: "model/index dimension mismatch ..." or "vector contains NaN ...".
        """
        points = np.asarray(points, dtype=np.float32)
        if points.ndim == 1:
            points = points[None, :]
        if points.ndim != 2 or points.shape[1] != self.input_dim:
            got = points.shape[-1] if points.ndim else 0
            raise ValueError(
                f"model/index dimension mismatch: vectors have {got} values, "
                f"the index expects {self.input_dim}"
            )
        finite = np.isfinite(points).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)[:10].tolist()
            raise ValueError(f"vector contains NaN or infinity (rows {bad})")
        return points

    def projections(self, points: np.ndarray) -> np.ndarray:
        """(N, tables, bits) signed projections of ``points`` on every plane."""
        points = self.check_vectors(points)
        # A query is one row: einsum stays on this thread (BLAS would wake its thread pool,
        # which costs milliseconds on a busy machine); batches go through BLAS.
        proj = (np.einsum("nd,dk->nk", points, self._flat_planes) if len(points) <= 16
                else points @ self._flat_planes)
        return proj.reshape(len(points), self.num_hashtables, self.hash_size)

    def codes(self, points: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """(N, tables) uint32 bucket codes; bit j set when the projection on plane j > 0."""
        points = self.check_vectors(points)
        out = np.empty((len(points), self.num_hashtables), dtype=np.uint32)
        for start in range(0, len(points), chunk):
            bits = (self.projections(points[start : start + chunk]) > 0).astype(np.float32)
            out[start : start + chunk] = bits @ self._weights
        return out

    def _hash(self, planes, input_point) -> str:
        # lshashpy3 calls this per table; one bucket naming scheme for both paths.
        bits = (np.dot(planes, np.asarray(input_point, dtype=np.float32)) > 0).astype(np.int64)
        return format(int((bits << np.arange(len(bits))).sum()), "x")

    # -- writing ---------------------------------------------------------------------------

    def _bucket_values(self, rows: np.ndarray, codes: np.ndarray) -> Iterable[tuple[str, bytes]]:
        """(bucket key, packed rows) for every non-empty bucket of every table."""
        for table in range(self.num_hashtables):
            order = np.argsort(codes[:, table], kind="stable")
            sorted_codes = codes[order, table]
            starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
            ends = np.r_[starts[1:], len(order)]
            packed = rows[order].astype(ROW_DTYPE).tobytes()
            prefix = self._table_prefixes[table]
            for code, lo, hi in zip(sorted_codes[starts].tolist(), (4 * starts).tolist(),
                                    (4 * ends).tolist(), strict=True):
                yield f"{prefix}{code:x}", packed[lo:hi]

    @staticmethod
    def _entry_fields(entries: Sequence[dict], first_row: int) -> dict[str, str]:
        return {e["image_id"]: json.dumps({"root": e.get("root"), "path": e["path"],
                                          "row": first_row + i})
                for i, e in enumerate(entries)}

    def build(self, vectors: np.ndarray, entries: Sequence[dict] | None = None) -> None:
        """Write a fresh namespace: every bucket once (MSET), then the row count.

        Args:
            vectors: (N, dim) rows 0..N-1.
            entries: optional [{"image_id", "path", "root"}] in row order (the images hash).
        """
        vectors = self.check_vectors(vectors)
        rows = np.arange(len(vectors), dtype=np.int64)
        codes = self.codes(vectors)
        pipe = self._client.pipeline(transaction=False)
        values = self._bucket_values(rows, codes)
        while batch := dict(itertools.islice(values, WRITE_BATCH)):
            pipe.mset(batch)
            if len(pipe) >= 64:  # bound the client-side buffer on big builds
                pipe.execute()
        if entries:
            for start in range(0, len(entries), 1000):
                pipe.hset(self.keys.images,
                          mapping=self._entry_fields(entries[start : start + 1000], start))
        pipe.set(self.keys.rows, len(vectors))
        pipe.set(self.keys.built, 1)
        pipe.incr(self.keys.generation)
        pipe.execute()

    def drop_tables(self) -> int:
        """Remove the LSH tables only (SCAN + UNLINK of ``t*``); rows, images hash, added-row
        metadata and tombstones stay, so ``build`` over the stored vectors restores them."""
        self._client.unlink(self.keys.built)
        return delete_namespace(self._client, self.namespace, pattern="t*")

    def index_batch(self, rows: Iterable[int], points: np.ndarray) -> None:
        """Append rows to every table (APPEND per bucket, pipelined); does not move the count.

        Args:
            rows: integer row ids (row i of the vector store).
            points: (N, dim) vectors for those rows.
        """
        rows = np.asarray(list(rows), dtype=np.int64)
        codes = self.codes(points)
        pipe = self._client.pipeline(transaction=False)
        for i, (key, value) in enumerate(self._bucket_values(rows, codes), start=1):
            pipe.append(key, value)
            if i % WRITE_BATCH == 0:
                pipe.execute()
        pipe.execute()

    def index(self, input_point, extra_data=None):
        """lshashpy3's single-item ``index``: ``extra_data`` is the integer row id (0 is kept)."""
        if extra_data is None:
            raise ValueError("extra_data must be the item's integer row id")
        self.index_batch([int(extra_data)], np.asarray(input_point)[None, :])
        return [format(int(c), "x") for c in self.codes(np.asarray(input_point))[0]]

    def add(self, vectors: np.ndarray, entries: Sequence[dict], lock_timeout_s: float = 60.0
            ) -> list[dict]:
        """Add rows to a live collection: vectors to the store, ids to the tables, atomically.

        Content already present (same ``image_id``) is not added again. Readers see either none
        or all of this call's rows: buckets, row metadata, images hash, row count and generation
        move in one MULTI/EXEC after the vectors are durable on disk.

        Args:
            vectors: (n, dim) finite rows.
            entries: [{"image_id", "path", "root"}] for those rows.
            lock_timeout_s: how long to wait for another writer of this version.

        Returns:
            Per entry: {"image_id", "path", "row"} when added, or {"image_id", "path",
            "skipped": "already indexed" , "row"} when the content was already there.
        """
        vectors = self.check_vectors(vectors)
        if self.store is None:
            raise RuntimeError("this index was opened without its vector store")
        with self._write_lock(lock_timeout_s):
            existing = self._client.hmget(self.keys.images, [e["image_id"] for e in entries]) \
                if entries else []
            committed = int(self._client.get(self.keys.rows) or len(self.store))
            out: list[dict] = []
            fresh: list[int] = []
            seen: dict[str, int] = {}
            for i, (entry, raw) in enumerate(zip(entries, existing, strict=True)):
                image_id = entry["image_id"]
                if raw is not None or image_id in seen:
                    row = json.loads(raw)["row"] if raw is not None else seen[image_id]
                    out.append({"image_id": image_id, "path": entry["path"], "row": row,
                                "skipped": "already indexed"})
                    continue
                seen[image_id] = committed + len(fresh)
                fresh.append(i)
                out.append({"image_id": image_id, "path": entry["path"], "row": seen[image_id]})
            if not fresh:
                return out
            first = self.store.append(vectors[fresh], committed)
            rows = np.arange(first, first + len(fresh), dtype=np.int64)
            new_entries = [entries[i] for i in fresh]
            pipe = self._client.pipeline(transaction=True)
            for key, value in self._bucket_values(rows, self.codes(vectors[fresh])):
                pipe.append(key, value)
            pipe.rpush(self.keys.added, *[json.dumps({
                "image_id": e["image_id"], "path": e["path"],
                **({"name": e["name"]} if e.get("name") else {})}) for e in new_entries])
            pipe.hset(self.keys.images, mapping=self._entry_fields(new_entries, first))
            pipe.set(self.keys.rows, first + len(fresh))
            pipe.incr(self.keys.generation)
            pipe.execute()
        return out

    class _Lock:
        def __init__(self, client: redis.Redis, key: str, timeout_s: float) -> None:
            self.client, self.key, self.timeout_s = client, key, timeout_s
            self.token = uuid.uuid4().hex

        def __enter__(self):
            deadline = time.monotonic() + self.timeout_s
            while not self.client.set(self.key, self.token, nx=True, ex=300):
                if time.monotonic() > deadline:
                    raise TimeoutError("another writer holds this collection")
                time.sleep(0.05)
            return self

        def __exit__(self, *exc) -> None:
            # Release only our own lock (it may have expired and been taken by another writer).
            self.client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                             "return redis.call('del', KEYS[1]) end return 0",
                             1, self.key, self.token)

    def _write_lock(self, timeout_s: float) -> LshIndex._Lock:
        return LshIndex._Lock(self._client, self.keys.write_lock, timeout_s)

    def delete_rows(self, rows: Iterable[int]) -> None:
        """Tombstone rows: they stay in the buckets and the store but no query returns them."""
        rows = [int(r) for r in rows]
        if rows:
            pipe = self._client.pipeline(transaction=True)
            pipe.sadd(self.keys.deleted, *rows)
            pipe.incr(self.keys.generation)
            pipe.execute()

    def delete_all(self, batch: int = 1000) -> int:
        """Remove every key of this namespace with SCAN + UNLINK (never KEYS); return count."""
        return delete_namespace(self._client, self.namespace, batch)

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether this namespace's tables are built."""
        return bool(self._client.exists(self.keys.built))

    def sync(self, generation: int | None = None) -> None:
        """Catch up with commits by other processes (added rows, tombstones) when they moved.

        Args:
            generation: the generation just read, or None to read it.
        """
        if generation is None:
            raw = self._client.get(self.keys.generation)
            generation = int(raw) if raw else 0
        if generation == self.generation or self.store is None:
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self.keys.generation)
        pipe.get(self.keys.rows)
        pipe.lrange(self.keys.added, len(self.added_meta), -1)
        pipe.smembers(self.keys.deleted)
        gen_raw, rows_raw, added, deleted = pipe.execute()
        total = int(rows_raw) if rows_raw else self.store.base_rows
        self.store.resize(total)
        self.added_meta.extend(json.loads(item) for item in added)
        alive = np.ones(len(self.store), dtype=bool)
        dead = np.fromiter((int(v) for v in deleted), dtype=np.int64, count=len(deleted))
        alive[dead[dead < len(alive)]] = False
        self._alive = alive
        self.generation = int(gen_raw) if gen_raw else 0

    @property
    def alive_rows(self) -> int:
        return int(self._alive.sum())

    def probe_codes(self, query: np.ndarray, probes: int) -> list[list[int]]:
        """Per table: the query's bucket, then the likeliest neighbouring buckets.

        Query-directed multi-probe: a bucket that differs in a set of bits is scored by the sum
        of the squared projections of those bits (how close the query lies to those planes);
        the ``tables * probes`` best-scored neighbours over all tables are probed, so tables
        where the query sits near a plane get more probes.

        Args:
            query: (dim,) vector.
            probes: extra buckets per table on average (0: own buckets only).

        Returns:
            A list (one per table) of bucket codes, own bucket first.
        """
        proj = self.projections(query)[0]  # (tables, bits)
        own = (proj > 0).astype(np.float32) @ self._weights
        own = own.astype(np.int64)
        probes = max(0, min(int(probes), MAX_PROBES_PER_TABLE, len(self._subsets) - 1))
        out = [[int(c)] for c in own]
        if probes == 0:
            return out
        order = np.argsort(np.abs(proj), axis=1)[:, : self._probe_bits]  # least certain first
        margins = np.take_along_axis(proj, order, axis=1) ** 2  # (tables, m)
        subsets = self._subsets[1:]  # without the empty set
        scores = margins @ subsets.T  # (tables, S)
        flips = (subsets @ (2.0 ** order.T).astype(np.float64)).T.astype(np.int64)  # (T, S)
        budget = self.num_hashtables * probes
        flat = scores.ravel()
        best = np.argpartition(flat, budget - 1)[:budget] if budget < flat.size \
            else np.arange(flat.size)
        best = best[np.argsort(flat[best], kind="stable")]
        tables, which = np.divmod(best, scores.shape[1])
        for table, s in zip(tables.tolist(), which.tolist(), strict=True):
            out[table].append(int(own[table]) ^ int(flips[table, s]))
        return out

    def candidate_rows(self, query: np.ndarray, probes: int) -> np.ndarray:
        """Sorted unique live rows in every probed bucket, read with one MGET.

        The generation is read in the same command, so rows added by another process since
        the last query are picked up before ranking.
        """
        keys = [self.keys.generation]
        for prefix, codes in zip(self._table_prefixes, self.probe_codes(query, probes),
                                 strict=True):
            keys.extend(f"{prefix}{code:x}" for code in codes)
        values = self._client.mget(keys)
        self.sync(int(values[0]) if values[0] else 0)
        joined = b"".join(v for v in values[1:] if v)
        rows = np.unique(np.frombuffer(joined, dtype=ROW_DTYPE)).astype(np.int64)
        rows = rows[rows < len(self._alive)]
        return rows[self._alive[rows]]

    def _top_k(self, query: np.ndarray, rows: np.ndarray, sq: np.ndarray, block: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k of ``rows`` by squared distance from |x|^2 + |q|^2 - 2 x.q (one product)."""
        d2 = sq + float(query @ query) - 2.0 * _matvec(block, query)
        k = min(k, len(rows))
        top = np.argpartition(d2, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        return rows[top], d2[top]

    def _finish(self, query: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances of the final rows by direct differences (a self-match gives ~0)."""
        rows = np.sort(rows)
        dist = np.linalg.norm(self.store.take(rows) - query, axis=1).astype(np.float32)
        order = np.lexsort((rows, dist))  # ties broken by row id: deterministic
        return rows[order], dist[order]

    def rank(self, query: np.ndarray, rows: np.ndarray, k: int,
             sorted_unique: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Exact euclidean re-rank of ``rows`` against ``query``, vectorised; best k first."""
        if self.store is None:
            raise RuntimeError("this index was opened without its vector store")
        query = self.check_vectors(query)[0]
        if not sorted_unique:  # sorted: memmap reads stay local
            rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0 or k <= 0:
            return rows[:0], np.zeros(0, dtype=np.float32)
        block = self.store.take(rows)
        sq = np.einsum("ij,ij->i", block, block)
        top, _ = self._top_k(query, rows, sq, block, k)
        return self._finish(query, top)

    def exact(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scan every live row (blocked matrix-vector products); best k first."""
        query = self.check_vectors(query)[0]
        best_rows, best_d2 = [], []
        for start, block, sq in self.store.scan():
            rows = np.arange(start, start + len(block), dtype=np.int64)
            d2 = sq + float(query @ query) - 2.0 * _matvec(block, query)
            alive = self._alive[start : start + len(block)]
            if not alive.all():
                d2 = np.where(alive, d2, np.inf)
            kk = min(k, len(rows))
            top = np.argpartition(d2, kk - 1)[:kk] if kk < len(rows) else np.arange(len(rows))
            best_rows.append(rows[top])
            best_d2.append(d2[top])
        if not best_rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        rows, d2 = np.concatenate(best_rows), np.concatenate(best_d2)
        keep = np.isfinite(d2)
        rows, d2 = rows[keep], d2[keep]
        kk = min(k, len(rows))
        if kk == 0:
            return rows[:0], np.zeros(0, dtype=np.float32)
        top = np.argpartition(d2, kk - 1)[:kk] if kk < len(rows) else np.arange(len(rows))
        return self._finish(query, rows[top])

    def query(self, query_point, num_results=None, distance_func=None):
        """lshashpy3's ``query``: [(row id, euclidean distance)], best first."""
        if distance_func not in (None, "true_euclidean", "euclidean"):
            raise ValueError("only euclidean distance is supported by this index")
        result = self.search(np.asarray(query_point), num_results or 10)
        dist = result.distances if distance_func != "euclidean" else result.distances ** 2
        return list(zip(result.rows.tolist(), dist.tolist(), strict=True))

    def search(self, query: np.ndarray, k: int, probes: int | None = None,
               exact: bool = False) -> SearchResult:
        """Find the k nearest live rows.

        Small collections (fewer than ``exact_below`` live rows) and ``exact=True`` scan every
        row; otherwise LSH candidates are re-ranked exactly, widening the probe when the
        buckets hold fewer than k live rows, and scanning everything as a last resort.

        Args:
            query: (dim,) vector, in the same space as the stored vectors.
            k: how many results.
            probes: extra buckets per table; None uses the version's default. Giving it
                forces the LSH path even on a small collection.
            exact: skip LSH and scan every vector.

        Returns:
            SearchResult; ``method`` and ``reason`` say how the answer was produced.
        """
        if self.store is None:
            raise RuntimeError("this index was opened without its vector store")
        query = self.check_vectors(query)[0]
        if k <= 0:
            return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32), "exact", 0)
        if exact or (probes is None and self.alive_rows < self.exact_below):
            self.sync()  # the size seen so far may be stale: rows may have been added
            live = self.alive_rows
            if exact or live < self.exact_below:
                reason = "requested" if exact else (
                    f"{live} rows is below the LSH threshold of {self.exact_below} "
                    "(IMGSIM_LSH_MIN_ROWS): scanning every row is as fast")
                top, dist = self.exact(query, k)
                return SearchResult(top, dist, "exact", live, reason)
        step = self.default_probes if probes is None else max(0, int(probes))
        tried: list[int] = []
        while True:
            rows = self.candidate_rows(query, step)
            tried.append(step)
            if len(rows) >= min(k, self.alive_rows):
                top, dist = self.rank(query, rows, k, sorted_unique=True)
                return SearchResult(top, dist, "lsh", len(rows), probes=step)
            if step >= MAX_PROBES_PER_TABLE:
                break
            step = min(MAX_PROBES_PER_TABLE, step * 2 + 1)
        # Buckets came back short even after widening: answer exactly and say so.
        top, dist = self.exact(query, k)
        return SearchResult(top, dist, "exact_fallback", self.alive_rows,
                            f"probed buckets held {len(rows)} live rows < k={k} "
                            f"(probes tried {tried})")
