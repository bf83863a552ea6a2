"""Search benchmark: exact numpy vs the product's LSH index on real Redis vs lshashpy3 as shipped.

One run prints one table. Rows: the real animals embeddings (a short model trained through the
pipeline functions, or an existing version folder given with --version-dir), synthetic
clustered vectors at 100k and 1M, and a noise-only 100k row, all at the product's embedding
dimension. Queries run in a separate "worker" process that maps the vectors read-only, as a
Celery worker does, so its resident memory is what a worker would hold.

    PYTHONPATH=$PWD .venv/bin/python bench/search_bench.py            # the README table
    PYTHONPATH=$PWD .venv/bin/python bench/search_bench.py --sizes 100000 --queries 100

Everything goes to Redis database 14 under a random prefix and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.collection import delete_namespace  # noqa: E402
from workers.lsh_index import (  # noqa: E402
    LshIndex,
    LshParams,
    generate_planes,
)
from workers.vector_store import SCAN_BLOCK, VectorStore  # noqa: E402

DIM = 256
K = 10


# -- data ----------------------------------------------------------------------------------

def write_clustered(path: Path, n: int, rng: np.random.Generator, per_cluster: int = 100,
                    spread: float = 0.6, noise_only: bool = False) -> np.ndarray:
    """Unit vectors, written block by block into a .npy: Gaussian blobs around random centres.

    Each point is centre + N(0, spread^2 / dim) noise (|noise| ~ spread against |centre| = 1),
    then normalised; ``noise_only`` draws every point uniformly on the sphere instead.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    centres = rng.standard_normal((max(1, n // per_cluster), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, SCAN_BLOCK):
        m = min(SCAN_BLOCK, n - start)
        noise = rng.standard_normal((m, DIM), dtype=np.float32)
        x = noise if noise_only else centres[rng.integers(len(centres), size=m)] + noise * (
            spread / np.sqrt(DIM))
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return centres


def queries_like(centres: np.ndarray, count: int, rng: np.random.Generator,
                 spread: float = 0.6, noise_only: bool = False) -> np.ndarray:
    """Held-out queries from the same distribution as the indexed points."""
    noise = rng.standard_normal((count, DIM), dtype=np.float32)
    x = noise if noise_only else centres[rng.integers(len(centres), size=count)] + noise * (
        spread / np.sqrt(DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def animals_vectors(args, work: Path) -> tuple[np.ndarray, str]:
    """Embeddings of the real animal photos: from a version folder, or a short training run."""
    if args.version_dir:
        return np.load(Path(args.version_dir) / "embeddings.npy"), f"from {args.version_dir}"
    import torch

    from workers.embedding import encode_images, normalise
    from workers.model import ModelConfig
    from workers.reader import decode_dataset
    from workers.training import TrainingConfig, train_autoencoder

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    decoded = decode_dataset(Path(args.animals), 64, 40_000_000, 20 * 1024 * 1024, threads=2)
    outcome = train_autoencoder(decoded.images, ModelConfig("default", 64, DIM),
                                TrainingConfig(args.epochs, 64, 1e-3, 0.1, 3, 0),
                                torch.device("cpu"))
    codes = encode_images(outcome.model, decoded.images, torch.device("cpu"))
    vectors = normalise(codes, codes.mean(axis=0))
    note = f"trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s"
    return vectors, note


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth: (Q, k) row ids by blocked batched products (not timed)."""
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    best_d = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(vectors), SCAN_BLOCK):
        block = np.asarray(vectors[start : start + SCAN_BLOCK])
        d2 = np.einsum("ij,ij->i", block, block)[None, :] - 2 * queries @ block.T
        top = np.argpartition(d2, min(k, d2.shape[1] - 1), axis=1)[:, :k]
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        best_d = np.concatenate([best_d, np.take_along_axis(d2, top, axis=1)], axis=1)
        keep = np.argsort(best_d, axis=1)[:, :k]
        best_rows = np.take_along_axis(best_rows, keep, axis=1)
        best_d = np.take_along_axis(best_d, keep, axis=1)
    return best_rows


# -- the worker process ---------------------------------------------------------------------

def rss_mb() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def worker_main(spec_path: str) -> None:
    """Child process: map the vectors read-only and time single queries, one at a time."""
    spec = json.loads(Path(spec_path).read_text())
    vectors = np.load(spec["vectors"], mmap_mode="r")
    queries = np.load(spec["queries"])
    client = redis.Redis.from_url(spec["redis_url"])
    out: dict = {"rss_before_mb": rss_mb()}
    if spec["method"] == "exact":
        lat, rows = [], []
        for q in queries[: spec["timed"]]:
            t0 = time.perf_counter()
            best = []
            for start in range(0, len(vectors), SCAN_BLOCK):
                block = vectors[start : start + SCAN_BLOCK]
                d = np.einsum("ij,ij->i", block, block) - 2 * np.einsum("ij,j->i", block, q)
                top = np.argpartition(d, K - 1)[:K]
                best.extend(zip(d[top].tolist(), (top + start).tolist(), strict=True))
            rows.append([r for _, r in sorted(best)[:K]])
            lat.append(time.perf_counter() - t0)
        out.update(lat=lat, rows=rows, candidates=[len(vectors)] * len(lat))
    else:
        planes = np.load(spec["planes"])
        index = LshIndex(client, spec["namespace"], planes, VectorStore(vectors),
                         probes=spec["probes"], exact_below=spec["exact_below"])
        index.sync()
        lat, rows, cand, methods = [], [], [], []
        for q in queries:
            t0 = time.perf_counter()
            found = index.search(q, K, probes=spec.get("force_probes"))
            lat.append(time.perf_counter() - t0)
            rows.append(found.rows.tolist())
            cand.append(found.candidates)
            methods.append(found.method)
        out.update(lat=lat, rows=rows, candidates=cand, methods=sorted(set(methods)))
    out["rss_after_mb"] = rss_mb()
    print(json.dumps(out))


def run_worker(spec: dict, work: Path) -> dict:
    spec_path = work / f"spec-{uuid.uuid4().hex[:6]}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- measuring ---------------------------------------------------------------------------

def recall(rows: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t.tolist())) / K
                          for r, t in zip(rows, truth, strict=False)]))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def bench_dataset(name: str, vectors_path: Path, queries: np.ndarray, args, client,
                  prefix: str, work: Path) -> list[dict]:
    vectors = np.load(vectors_path, mmap_mode="r")
    n = len(vectors)
    raw_mb = n * DIM * 4 / 2**20
    np.save(work / "queries.npy", queries)
    truth = exact_topk(vectors, queries, K)
    base = {"vectors": str(vectors_path), "queries": str(work / "queries.npy"),
            "redis_url": args.redis_url}
    rows = []

    exact = run_worker({**base, "method": "exact", "timed": min(len(queries), args.exact_timed)},
                       work)
    exact_p50 = pct(exact["lat"], 50)
    rows.append({"dataset": name, "N": n, "method": "exact numpy",
                 "recall": recall(exact["rows"], truth), "p50": exact_p50,
                 "p95": pct(exact["lat"], 95), "cand": n, "bytes": None, "build": None,
                 "rss": exact["rss_after_mb"], "raw_mb": raw_mb})

    params = LshParams.for_size(n)
    planes = generate_planes(params, DIM, seed=0)
    np.save(work / "planes.npy", planes)
    namespace = f"{prefix}:{{{name}}}"
    index = LshIndex(client, namespace, planes, VectorStore(vectors), probes=params.probes)
    before = client.info("memory")["used_memory"]
    t0 = time.perf_counter()
    index.build(np.asarray(vectors))
    build_s = time.perf_counter() - t0
    redis_bytes = (client.info("memory")["used_memory"] - before) / (n * params.num_tables)
    spec = {**base, "method": "lsh", "namespace": namespace, "planes": str(work / "planes.npy"),
            "probes": params.probes, "exact_below": args.exact_below}
    shape = f"{params.hash_bits}b x {params.num_tables}t"
    variants = [("product (auto)", None)]
    if n < args.exact_below:  # the product answers exactly here; show its LSH path too
        variants.append((f"product LSH forced, probes {params.probes}", params.probes))
    for label, force in variants:
        res = run_worker({**spec, "force_probes": force}, work)
        rows.append({"dataset": name, "N": n,
                     "method": f"{label} [{shape}] -> {'/'.join(res['methods'])}",
                     "recall": recall(res["rows"], truth), "p50": pct(res["lat"], 50),
                     "p95": pct(res["lat"], 95), "cand": float(np.mean(res["candidates"])),
                     "bytes": redis_bytes, "build": n / build_s, "rss": res["rss_after_mb"],
                     "raw_mb": raw_mb})
    delete_namespace(client, namespace)

    if n <= args.lshashpy3_max:
        rows.append(bench_lshashpy3(name, np.asarray(vectors), queries, truth, raw_mb))
    for row in rows:
        row["ratio"] = row["p50"] / exact_p50
    return rows


def bench_lshashpy3(name, vectors, queries, truth, raw_mb) -> dict:
    """lshashpy3 0.0.9 as shipped, with its default in-memory storage and the seed's shape
    (its Redis storage would write table i into database i, outside our test database)."""
    from workers.lsh_index import LSHash

    lsh = LSHash(hash_size=10, input_dim=DIM, num_hashtables=5)
    t0 = time.perf_counter()
    for row, vector in enumerate(vectors):
        lsh.index(vector, extra_data=row + 1)  # as shipped, extra_data=0 would be dropped
    build = len(vectors) / (time.perf_counter() - t0)
    lat, rows, cand = [], [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = lsh.query(q, num_results=K, distance_func="euclidean")
        lat.append(time.perf_counter() - t0)
        rows.append([int(h[0][1]) - 1 for h in hits])
        cand.append(sum(len(lsh.hash_tables[i].get_list(lsh._hash(lsh.uniform_planes[i], q)))
                        for i in range(5)))
    return {"dataset": name, "N": len(vectors), "method": "lshashpy3 as shipped [10b x 5t]",
            "recall": recall(rows, truth), "p50": pct(lat, 50), "p95": pct(lat, 95),
            "cand": float(np.mean(cand)), "bytes": None, "build": build,
            "rss": None, "raw_mb": raw_mb}  # runs inside the bench process: no worker RSS


def print_table(rows: list[dict]) -> None:
    header = ("| data | N | method -> answered by | recall@10 | p50 ms | p95 ms | p50 / exact "
              "| candidates/query | Redis B/entry/table | build vec/s | worker RSS MB "
              "(anon + file) | RSS / raw vectors |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        rss = r["rss"]
        memory = "in-process, not measured | " if rss is None else (
            f"{rss.get('VmRSS', 0):,.0f} ({rss.get('RssAnon', 0):,.0f} + "
            f"{rss.get('RssFile', 0):,.0f}) | {rss.get('VmRSS', 0) / r['raw_mb']:.2f}")
        redis_bytes = "" if r["bytes"] is None else f"{r['bytes']:.1f}"
        build = "" if r["build"] is None else f"{r['build']:,.0f}"
        print(f"| {r['dataset']} | {r['N']:,} | {r['method']} | {r['recall']:.3f} "
              f"| {r['p50']:.2f} | {r['p95']:.2f} | {r['ratio']:.3f} | {r['cand']:,.0f} "
              f"| {redis_bytes} | {build} | {memory} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--sizes", default="100000,1000000", help="synthetic clustered sizes")
    parser.add_argument("--noise-size", type=int, default=100_000, help="0 to skip")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-timed", type=int, default=100, help="queries timed for exact")
    parser.add_argument("--animals", default=str(REPO.parent / "shared" / "datasets" / "animals"))
    parser.add_argument("--version-dir", help="reuse a model version folder's embeddings.npy")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--exact-below", type=int, default=20_000,
                        help="the product's IMGSIM_LSH_MIN_ROWS")
    parser.add_argument("--lshashpy3-max", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="search_bench_") as tmp:
        work = Path(tmp)
        try:
            if args.animals != "none":
                vectors, note = animals_vectors(args, work)
                print(f"animals: {len(vectors)} embeddings ({note})", file=sys.stderr)
                np.save(work / "animals.npy", vectors.astype(np.float32))
                picks = rng.choice(len(vectors), size=min(args.queries, len(vectors)),
                                   replace=False)
                rows += bench_dataset("animals (real)", work / "animals.npy", vectors[picks],
                                      args, client, prefix, work)
            datasets = [(f"clustered {int(s):,}", int(s), False)
                        for s in args.sizes.split(",") if s]
            if args.noise_size:
                datasets.append((f"noise {args.noise_size:,}", args.noise_size, True))
            for name, n, noise in datasets:
                path = work / "synthetic.npy"
                centres = write_clustered(path, n, rng, noise_only=noise)
                queries = queries_like(centres, args.queries, rng, noise_only=noise)
                print(f"{name}: generated", file=sys.stderr)
                rows += bench_dataset(name, path, queries, args, client, prefix, work)
                path.unlink()
        finally:
            delete_namespace(client, prefix)
            for key in client.scan_iter(match=f"{prefix}*"):
                client.unlink(key)
    print_table(rows)


if __name__ == "__main__":
    main()
