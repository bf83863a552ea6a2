"""The LSH index on the real Redis: storage layout, hashing, search paths, growth, bad vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import redis

from shared.collection import delete_namespace
from shared.keys import Keys
from tests.conftest import FIXTURES, REPO
from workers.lsh_index import (
    LshIndex,
    LshParams,
    generate_planes,
    unpack_rows,
)
from workers.vector_store import VectorStore


def _clustered(n: int, dim: int, seed: int = 0, per_cluster: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    labels = rng.integers(len(centres), size=n)
    x = centres[labels] / np.sqrt(dim) + rng.standard_normal((n, dim)).astype(np.float32) * 0.03
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    return np.argsort(np.linalg.norm(x - q, axis=1), kind="stable")[:k].tolist()


@pytest.fixture
def make_index(redis_client, key_prefix):
    def make(vectors, bits=6, tables=4, exact_below=0, version="v1", probes=4, folder=None):
        ns = Keys(key_prefix).version_namespace(version)
        planes = generate_planes(LshParams(bits, tables), vectors.shape[1], seed=3)
        store = VectorStore(vectors, folder)
        return LshIndex(redis_client, ns, planes, store, probes=probes, exact_below=exact_below)
    return make


def test_row_zero_round_trips_and_buckets_are_packed_uint32(make_index, redis_client):
    x = _clustered(40, 16)
    index = make_index(x, bits=3, tables=2)
    index.build(x)
    hits = index.query(x[0], 1)
    assert hits[0][0] == 0 and hits[0][1] < 1e-5
    # lshashpy3's own storage interface at the seam sees integer rows, 0 included.
    code = format(int(index.codes(x[0])[0, 0]), "x")
    assert 0 in index.hash_tables[0].get_list(code)
    raw = redis_client.get(index.keys.bucket(0, int(code, 16)))
    assert isinstance(raw, bytes) and len(raw) % 4 == 0
    assert 0 in unpack_rows(raw).tolist()
    # Every table together holds each row exactly once.
    for table in range(2):
        storage = index.hash_tables[table]
        names = storage.keys()
        rows = np.concatenate([unpack_rows(redis_client.get(storage.key(b))) for b in names])
        assert sorted(rows.tolist()) == list(range(40))


def test_everything_lives_in_one_database_under_the_namespace(make_index, redis_client,
                                                              redis_url, key_prefix):
    x = _clustered(200, 16)
    index = make_index(x)
    index.build(x, [{"image_id": f"{i:024x}", "path": f"p{i}.jpg", "root": "/r"}
                    for i in range(200)])
    db = int(redis_url.rsplit("/", 1)[1])
    base_url = redis_url.rsplit("/", 1)[0]
    for other in (d for d in range(16) if d != db):  # lshashpy3 as shipped: table i -> db i
        with redis.Redis.from_url(f"{base_url}/{other}") as client:
            assert not list(client.scan_iter(match=f"{key_prefix}*", count=1000))
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{key_prefix}*")]
    assert keys and all(k.startswith(index.namespace + ":") for k in keys)
    assert {k for k in keys if ":t" not in k} == {
        index.keys.images, index.keys.rows, index.keys.generation, index.keys.built}
    entry = json.loads(redis_client.hget(index.keys.images, f"{7:024x}"))
    assert entry == {"root": "/r", "path": "p7.jpg", "row": 7}
    assert delete_namespace(redis_client, index.namespace) == len(keys)
    assert not list(redis_client.scan_iter(match=f"{key_prefix}*"))


def test_two_processes_hash_identically_from_the_saved_planes(tmp_path):
    planes = generate_planes(LshParams(12, 3), 32, seed=11)
    points = _clustered(50, 32, seed=5)
    np.save(tmp_path / "planes.npy", planes)
    np.save(tmp_path / "points.npy", points)
    script = (
        "import sys, numpy as np, redis\n"
        "from workers.lsh_index import LshIndex\n"
        "p = np.load(sys.argv[1]); x = np.load(sys.argv[2])\n"
        "idx = LshIndex(redis.Redis(), 'unused', p)\n"
        "print(idx.codes(x).tolist())\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "planes.npy"),
                        str(tmp_path / "points.npy")], cwd=REPO, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"}).stdout
        for _ in range(2)
    }
    assert len(outputs) == 1
    # The per-table lshashpy3 hash agrees with the vectorised codes.
    idx = LshIndex(None, "unused", planes)
    codes = idx.codes(points)
    assert all(idx._hash(planes[t], points[4]) == format(int(codes[4, t]), "x")
               for t in range(3))


def test_lsh_query_returns_true_neighbours_and_scores_a_fraction(make_index):
    x = _clustered(3000, 32, seed=1)
    index = make_index(x, bits=8, tables=8, probes=6)
    index.build(x)
    rng = np.random.default_rng(9)
    recalls, fractions = [], []
    for i in rng.choice(3000, size=30, replace=False):
        q = x[i] + rng.standard_normal(32).astype(np.float32) * 0.01
        found = index.search(q, 10)
        assert found.method == "lsh" and found.probes == 6
        assert list(found.distances) == sorted(found.distances)
        recalls.append(len(set(found.rows.tolist()) & set(_exact(x, q, 10))) / 10)
        fractions.append(found.candidates / 3000)
    assert np.mean(recalls) >= 0.9
    assert np.mean(fractions) < 0.5


def test_small_collection_answers_exactly_and_says_so(make_index):
    x = _clustered(300, 16)
    index = make_index(x, exact_below=1000)
    index.build(x)
    found = index.search(x[5], 10)
    assert found.method == "exact" and "below the LSH threshold" in found.reason
    assert found.rows.tolist() == _exact(x, x[5], 10)
    forced = index.search(x[5], 10, probes=2)  # an explicit probe count uses the tables
    assert forced.method == "lsh"
    asked = make_index(x).search(x[5], 3, exact=True)
    assert asked.method == "exact" and asked.reason == "requested"


def test_short_buckets_widen_then_fall_back_to_exact(make_index, redis_client):
    x = _clustered(400, 16, per_cluster=1)  # one point per cluster: spread-out buckets
    index = make_index(x, bits=12, tables=1)
    index.build(x)
    widened = index.search(x[0], 10, probes=0)
    assert widened.method == "lsh" and widened.probes > 0  # own bucket alone was too small
    # Empty every bucket: the probe can never hold k rows, so the exact scan answers.
    delete_namespace(redis_client, index.namespace)
    redis_client.set(index.keys.rows, 400)
    fallback = index.search(x[0], 10)
    assert fallback.method == "exact_fallback" and "probes tried" in fallback.reason
    assert fallback.rows.tolist() == _exact(x, x[0], 10)


def test_bad_vectors_follow_the_manifest(make_index, redis_client):
    good = np.load(FIXTURES / "vec_float32_d64.npy").astype(np.float32).reshape(-1, 64)
    nan = np.load(FIXTURES / "vec_nan_d64.npy").reshape(-1, 64)
    zero = np.load(FIXTURES / "vec_zero_d64.npy").reshape(-1, 64)
    wrong = np.load(FIXTURES / "vec_wrong_dim_d63.npy").reshape(-1, 63)
    base = np.concatenate([_clustered(30, 64), good / np.linalg.norm(good)])
    index = make_index(base.astype(np.float32))
    index.build(base.astype(np.float32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        index.build(nan)
    with pytest.raises(ValueError, match="NaN or infinity"):
        index.search(nan[0], 5)
    with pytest.raises(ValueError, match="model/index dimension mismatch"):
        index.search(wrong[0], 5)
    with pytest.raises(ValueError, match="model/index dimension mismatch"):
        index.index_batch([99], wrong)
    assert int(redis_client.get(index.keys.rows)) == len(base)  # nothing stored by the refusals
    # A zero vector is indexed and queried without ever producing a NaN distance.
    with_zero = np.concatenate([base, zero]).astype(np.float32)
    zi = make_index(with_zero, version="v2")
    zi.build(with_zero)
    for query, probes in ((zero[0], None), (base[0], 3), (zero[0], 3)):
        found = zi.search(query, 10, probes=probes)
        assert np.isfinite(found.distances).all() and len(found.rows) == 10
    exact = zi.search(base[3], len(with_zero), exact=True)
    assert len(with_zero) - 1 in exact.rows.tolist()


def test_added_rows_and_tombstones_reach_another_process_view(make_index, tmp_path):
    x = _clustered(100, 16, seed=2)
    writer = make_index(x, folder=tmp_path)
    writer.build(x)
    reader = make_index(x, folder=tmp_path)  # another worker with its own memmaps
    reader.sync()
    new = _clustered(5, 16, seed=8)
    entries = [{"image_id": f"{i:024x}", "path": f"new{i}.jpg", "root": "/up"} for i in range(5)]
    added = writer.add(new, [*entries, entries[0]])  # the same content twice in one call
    assert [a["row"] for a in added] == [100, 101, 102, 103, 104, 100]
    assert added[-1]["skipped"] == "already indexed"
    again = writer.add(new[:1], entries[:1])
    assert again[0]["skipped"] == "already indexed" and again[0]["row"] == 100
    for probes, exact in ((3, False), (None, True)):
        found = reader.search(new[2], 1, probes=probes, exact=exact)
        assert found.rows.tolist() == [102] and found.distances[0] < 1e-5
    assert reader.added_meta[2]["path"] == "new2.jpg" and len(reader.store) == 105
    writer.delete_rows([102])
    for probes, exact in ((3, False), (None, True)):
        assert 102 not in reader.search(new[2], 10, probes=probes, exact=exact).rows.tolist()
    assert reader.alive_rows == 104


def test_an_uncommitted_tail_is_never_read_and_is_cut_by_the_next_writer(make_index, tmp_path):
    x = _clustered(20, 8)
    index = make_index(x, folder=tmp_path)
    index.build(x)
    index.store.append(np.ones((3, 8), dtype=np.float32), committed_rows=20)  # writer died here
    index.sync()
    assert len(index.store) == 20
    added = index.add(_clustered(1, 8, seed=4), [{"image_id": "a" * 24, "path": "a.jpg"}])
    assert added[0]["row"] == 20
    assert (tmp_path / "added_vectors.f32").stat().st_size == 8 * 4


def test_superseded_namespaces_go_after_the_grace_period_never_the_active(redis_client,
                                                                          key_prefix):
    from shared.registry import ModelRegistry
    from workers.indexing import collect_superseded

    keys = Keys(key_prefix)
    for version in ("v1", "v2", "v3"):
        ns = keys.namespace(version)
        redis_client.set(ns.rows, 1)
        redis_client.set(ns.built, 1)
        redis_client.set(ns.bucket(0, 5), b"\0\0\0\0")
    ModelRegistry(redis_client, keys).activate("v3")
    redis_client.zadd(keys.superseded(), {"v1": 100.0, "v2": 190.0, "v3": 100.0})
    assert collect_superseded(redis_client, keys, grace_s=50, now=200.0) == ["v1"]
    v1 = keys.namespace("v1")
    assert not redis_client.exists(v1.bucket(0, 5), v1.built)  # the tables are gone
    assert redis_client.exists(v1.rows)  # its small records stay: it can be rebuilt
    assert redis_client.exists(keys.namespace("v2").bucket(0, 5))  # inside its grace period
    assert redis_client.exists(keys.namespace("v3").bucket(0, 5))  # active again: kept
    assert redis_client.zrange(keys.superseded(), 0, -1) == [b"v2"]


def test_dropped_tables_are_rebuilt_from_the_store_with_added_rows(make_index, tmp_path):
    x = _clustered(300, 16, seed=6)
    index = make_index(x, folder=tmp_path, exact_below=10_000)
    index.build(x)
    index.add(_clustered(3, 16, seed=7), [{"image_id": f"{i:024x}", "path": f"{i}.jpg"}
                                          for i in range(3)])
    index.delete_rows([301])
    assert index.exists() and index.drop_tables() > 0 and not index.exists()
    assert index.search(x[0], 5, probes=2).method == "exact_fallback"
    index.sync()
    index.build(index.store.take(np.arange(len(index.store))))
    assert index.exists() and len(index.store) == 303
    found = index.search(index.store.take(np.asarray([302]))[0], 3, probes=2)
    assert found.method == "lsh" and found.rows[0] == 302 and 301 not in found.rows.tolist()
