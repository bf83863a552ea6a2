"""Retrieval quality: baselines, the seed preset and the default model on held-out queries.

For each dataset: decode through the product's reader, hold out ~20% of each class as queries
(never trained on nor indexed), train on the rest with the product's ``train_autoencoder``,
embed with ``encode_images`` + ``normalise``, and score precision@k / mAP@k of the queries
against the index, exactly and through the product's LSH index on the real Redis (database
15, a key prefix of its own, removed afterwards). Prints one table.

    PYTHONPATH=$PWD .venv/bin/python bench/quality_bench.py [--datasets animals monkeys]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import torch

from shared.collection import delete_namespace
from shared.labels import LabelResolver, read_labels_csv
from shared.schema import TrainParams
from workers.device import autocast_dtype
from workers.embedding import encode_images, normalise
from workers.lsh_index import LshIndex, LshParams, generate_planes
from workers.model import ModelConfig
from workers.quality import (
    colour_histogram_features,
    holdout_split,
    nearest,
    random_hits,
    random_precision,
    relevant_counts,
    retrieval_metrics,
    tiny_image_features,
)
from workers.reader import decode_dataset
from workers.training import TrainingConfig, train_autoencoder
from workers.vector_store import VectorStore

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 40_000_000
MAX_BYTES = 20 * 2**20


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def score(hits: np.ndarray, index_labels: list[str], query_labels: list[str], k: int) -> dict:
    """Metrics of (Q, k) index rows against the query classes."""
    return retrieval_metrics(query_labels, [[index_labels[r] for r in row] for row in hits], k,
                             relevant_counts(index_labels, query_labels))


def lsh_hits(client: redis.Redis, prefix: str, vectors: np.ndarray, queries: np.ndarray,
             k: int, seed: int) -> tuple[np.ndarray, str, float]:
    """Hits through the product's LSH index (forced past the small-collection exact scan).

    Returns:
        (Q, k) rows, the shape and probe depth, mean candidates scored per query.
    """
    params = LshParams.for_size(len(vectors))
    planes = generate_planes(params, vectors.shape[1], seed)
    namespace = f"{prefix}:{{{uuid.uuid4().hex[:8]}}}"
    index = LshIndex(client, namespace, planes, VectorStore(vectors), probes=params.probes,
                     exact_below=0)
    try:
        index.build(vectors)
        rows, candidates, methods = [], [], set()
        for query in queries:
            result = index.search(query, k)
            rows.append(result.rows[:k])
            candidates.append(result.candidates)
            methods.add(result.method)
    finally:
        delete_namespace(client, namespace)
    shape = f"{params.hash_bits}b x {params.num_tables}t, probes {params.probes}, " \
            f"{'/'.join(sorted(methods))}"
    return np.stack(rows), shape, float(np.mean(candidates))


def train_and_embed(images: np.ndarray, index_rows: np.ndarray, query_rows: np.ndarray,
                    params: TrainParams, invariance_overrides: dict | None = None) -> dict:
    """Train on the index rows with the product's code; embed index and queries like it does."""
    device = torch.device("cpu")
    model_config = ModelConfig(params.architecture, params.image_size, params.embedding_dim)
    config = TrainingConfig(params.epochs, params.batch_size, params.learning_rate,
                            params.val_fraction, params.patience, params.seed)
    if invariance_overrides:
        config = dataclasses.replace(config, invariance=dataclasses.replace(
            config.invariance, **invariance_overrides))
    train_images = np.ascontiguousarray(images[index_rows])
    load_before = load_average()
    started = time.perf_counter()
    outcome = train_autoencoder(train_images, model_config, config, device,
                                amp_dtype=autocast_dtype(device, "auto"))
    train_s = time.perf_counter() - started
    seen = sum(1 for _ in outcome.history) * round(len(train_images) * (1 - params.val_fraction))
    started = time.perf_counter()
    index_codes = encode_images(outcome.model, train_images, device)
    embed_s = time.perf_counter() - started
    query_images = np.ascontiguousarray(images[query_rows])
    query_codes = encode_images(outcome.model, query_images, device)
    # The query path encodes one image at a time: time it the same way.
    single = []
    for i in range(min(50, len(query_images))):
        t0 = time.perf_counter()
        encode_images(outcome.model, query_images[i : i + 1], device)
        single.append(time.perf_counter() - t0)
    center = index_codes.mean(axis=0)
    return {
        "index": normalise(index_codes, center), "queries": normalise(query_codes, center),
        "train_s": train_s, "train_img_s": seen / train_s, "epochs_run": len(outcome.history),
        "best_epoch": outcome.best_epoch, "history": outcome.history,
        "embed_img_s": len(train_images) / embed_s,
        "single_ms_p50": 1000 * float(np.median(single)),
        "load": f"{load_before} -> {load_average()}",
    }


def bench_dataset(name: str, root: Path, args, client: redis.Redis, prefix: str) -> list[dict]:
    k = args.k
    rows: list[dict] = []
    decoded = {}

    def decode(size: int):
        if size not in decoded:
            t0 = time.perf_counter()
            decoded[size] = decode_dataset(root, size, MAX_PIXELS, MAX_BYTES, threads=2)
            print(f"[{name}] decoded {len(decoded[size].entries)} images at {size} px in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        return decoded[size]

    base = decode(64)
    resolver = LabelResolver(read_labels_csv(root / "labels.csv"), root)
    labels = [resolver.label(root, e.path) or "" for e in base.entries]
    index_rows, query_rows = holdout_split(labels, args.fraction, args.seed)
    index_labels = [labels[i] for i in index_rows]
    query_labels = [labels[i] for i in query_rows]
    print(f"[{name}] {len(index_rows)} indexed, {len(query_rows)} queries", flush=True)

    def row(method: str, metrics: dict, **extra) -> None:
        rows.append({"dataset": name, "method": method, "p": metrics["precision_at_k"],
                     "map": metrics["map_at_k"], "per_class": metrics["per_class"], **extra})
        print(f"[{name}] {method}: p@{k} {metrics['precision_at_k']:.3f} "
              f"mAP@{k} {metrics['map_at_k']:.3f} {extra}", flush=True)

    if "baselines" in args.models:
        hits = random_hits(len(index_rows), len(query_rows), k, args.seed)
        row("random (seeded draw)", score(hits, index_labels, query_labels, k),
            expected=round(random_precision(index_labels, query_labels), 3))
        tiny = tiny_image_features(base.images)
        row("tiny image 16x16, centred, cosine",
            score(nearest(tiny[index_rows], tiny[query_rows], k, "cosine"), index_labels,
                  query_labels, k))
        hist = colour_histogram_features(base.images)
        row("colour histogram 8x8x8, chi-square",
            score(nearest(hist[index_rows], hist[query_rows], k, "chi2"), index_labels,
                  query_labels, k))

    presets = []
    if "seed" in args.models:
        presets.append(("seed preset", {"dataset": name, "architecture": "seed",
                                        "image_size": args.seed_size, "epochs": args.seed_epochs}))
    if "default" in args.models:
        presets.append(("default model", {"dataset": name, **args.default_params}))
    for label, spec in presets:
        params = TrainParams.parse(spec)
        images = decode(params.image_size)
        if images.entries != base.entries:  # another size dropped a file: same rows needed
            raise RuntimeError(f"decoding at {params.image_size} px kept other files")
        overrides = args.invariance if params.architecture == "default" else None
        out = train_and_embed(images.images, index_rows, query_rows, params, overrides)
        exact = score(nearest(out["index"], out["queries"], k, "euclidean"), index_labels,
                      query_labels, k)
        desc = (f"{label} ({params.architecture}, {params.image_size} px, "
                f"{out['index'].shape[1]}-d, {out['epochs_run']} epochs, best {out['best_epoch']})")
        timing = {"train_s": round(out["train_s"], 1), "train_img_s": round(out["train_img_s"]),
                  "embed_img_s": round(out["embed_img_s"]),
                  "encode_1_ms_p50": round(out["single_ms_p50"], 2), "load": out["load"]}
        row(desc + " exact", exact, **timing, history=out["history"])
        if not args.skip_lsh:
            hits, shape, candidates = lsh_hits(client, prefix, out["index"], out["queries"], k,
                                               params.seed)
            row(desc + f" LSH [{shape}]", score(hits, index_labels, query_labels, k),
                candidates=round(candidates))
    return rows


def print_table(rows: list[dict], k: int) -> None:
    print(f"\n| dataset | method | p@{k} | mAP@{k} | per-class p@{k} | train s | train img/s "
          f"| embed img/s | encode 1 image ms (p50) | load average (start -> end) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        per_class = ", ".join(f"{c} {v:.2f}" for c, v in r["per_class"].items())
        if len(r["per_class"]) > 4:
            per_class = f"{min(r['per_class'].values()):.2f}..{max(r['per_class'].values()):.2f}"
        print(f"| {r['dataset']} | {r['method']} | {r['p']:.3f} | {r['map']:.3f} | {per_class} "
              f"| {r.get('train_s', '')} | {r.get('train_img_s', '')} "
              f"| {r.get('embed_img_s', '')} | {r.get('encode_1_ms_p50', '')} "
              f"| {r.get('load', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["animals", "monkeys"])
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("IMGSIM_BENCH_DATASETS",
                                                    REPO.parent / "shared" / "datasets")))
    parser.add_argument("--models", nargs="+", default=["baselines", "seed", "default"],
                        choices=["baselines", "seed", "default"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.2, help="held out per class")
    parser.add_argument("--seed", type=int, default=0, help="split and LSH seed")
    parser.add_argument("--seed-size", type=int, default=256, help="seed preset input side")
    parser.add_argument("--seed-epochs", type=int, default=2)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a POST /jobs/train field for the default model (JSON value)")
    parser.add_argument("--invariance", action="append", default=[], metavar="NAME=VALUE",
                        help="override a field of workers.training.InvarianceObjective")
    parser.add_argument("--skip-lsh", action="store_true")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.default_params = {n: json.loads(v) for n, v in (p.split("=", 1) for p in args.param)}
    args.invariance = {n: json.loads(v) for n, v in (p.split("=", 1) for p in args.invariance)}
    torch.manual_seed(0)
    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    prefix = f"imgsimquality{uuid.uuid4().hex[:8]}"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno"],
                           capture_output=True, text=True).stdout.strip()
    commit += " + uncommitted changes" if dirty else ""
    print(f"commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_average()}", flush=True)
    rows: list[dict] = []
    try:
        for name in args.datasets:
            rows += bench_dataset(name, args.data_root / name, args, client, prefix)
    finally:
        delete_namespace(client, prefix)
    print_table(rows, args.k)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
