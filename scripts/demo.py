"""The main job end to end: train on a folder of photos, then query with photos it never saw.

Called by ``scripts/demo.sh`` after setup. Copies the folder into the demo data root while
holding out one photo per class folder (so the query is a photo that is not in the index),
(re)starts a worker and gunicorn, trains with default settings, queries with each held-out
photo and prints the top hits with their image URLs and the time of every phase.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import stack  # noqa: E402

from client import ApiError, ImgsimClient  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def prepare(source: Path, data_root: Path, holdout_dir: Path) -> tuple[str, list[Path]]:
    """Copy ``source`` under ``data_root``, minus one held-out photo per class folder.

    Returns:
        (dataset name relative to the data root, held-out photos).
    """
    name = source.name
    target = data_root / name
    groups = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    groups = groups or [source]
    held: list[Path] = []
    for group in groups:
        photos = sorted(p for p in group.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(photos) > 1:
            held.append(photos[-1])
    held_names = {p.resolve() for p in held}
    marker = target / ".imgsim-demo-source"
    if not (marker.is_file() and marker.read_text() == str(source.resolve())):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True,
                        ignore=lambda folder, names: [
                            n for n in names if (Path(folder) / n).resolve() in held_names])
        marker.write_text(str(source.resolve()))
    holdout_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in held:
        copy = holdout_dir / f"{path.parent.name}__{path.name}"
        shutil.copy(path, copy)
        copies.append(copy)
    return name, copies


def _progress_line(job: dict) -> str:
    p = job.get("progress") or {}
    parts = [f"{job['status']:<9}", f"phase={p.get('phase', '-')}"]
    if p.get("epoch"):
        parts.append(f"epoch={p['epoch']}/{p.get('epochs')}")
    if p.get("loss") is not None:
        parts.append(f"loss={p['loss']:.4f}")
    if p.get("images_total"):
        done, total = p.get("images_done", 0), p["images_total"]
        if p.get("phase") == "train" and p.get("epochs"):
            # Training counts every photo once per epoch: say so, or 43,120 reads as photos.
            parts.append(f"{100 * done / total:.0f}% ({done:,}/{total:,} photos x epochs)")
        else:
            parts.append(f"images={done:,}/{total:,}")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of photos (class sub-folders optional)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    source = args.folder.resolve()
    if not source.is_dir():
        print(f"[demo] no such folder: {args.folder}", file=sys.stderr)
        return 2

    data_root = stack.VAR / "demo" / "data"
    t0 = time.perf_counter()
    dataset, queries = prepare(source, data_root, stack.VAR / "demo" / "holdout")
    print(f"[demo] dataset {dataset!r} under {data_root} ({len(queries)} photo(s) held out "
          f"as unseen queries) in {time.perf_counter() - t0:.1f}s")
    stack.start(data_root, args.port)
    base = f"http://127.0.0.1:{args.port}"
    client = ImgsimClient(base)

    started = time.perf_counter()
    job = client.train(dataset)
    print(f"[demo] training job {job['job_id']} accepted ({base}{job['status_url']}); "
          "on ~2,400 photos it takes about 3 minutes on an idle 2-core CPU, longer on a busy one")
    last = [""]

    def show(record: dict) -> None:
        # One line per phase and per epoch, not per poll.
        p = record.get("progress") or {}
        step = f"{record['status']}/{p.get('phase')}/{p.get('epoch')}"
        if step != last[0]:
            print(f"[train] {time.perf_counter() - started:6.1f}s {_progress_line(record)}",
                  flush=True)
            last[0] = step

    final = client.wait(job["job_id"], on_update=show, timeout=3 * 3600)
    wall = time.perf_counter() - started
    if final["status"] != "succeeded":
        print(f"[demo] training {final['status']}: {final.get('error')}", file=sys.stderr)
        return 1
    result = final["result"]
    print(f"[demo] trained version {result['version']} on {result['images_indexed']} images "
          f"({result['skipped_count']} skipped), {result['epochs_run']} epochs "
          f"(best {result['best_epoch']}), device {result['device']}")
    skipped = result.get("skipped") or []
    if skipped:
        shown = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
        print(f"[demo] skipped: {shown}" + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                           else ""))
    print("[demo] phase times (s): " + ", ".join(
        f"{k.removesuffix('_s')}={v}" for k, v in result["timings"].items())
        + f"; submit->queryable {wall:.1f}")

    for path in queries or []:
        t = time.perf_counter()
        try:
            job = client.query(path, k=args.k)
        except ApiError as exc:
            print(f"[demo] query {path.name} refused: {exc}", file=sys.stderr)
            return 1
        done = client.wait(job["job_id"], timeout=120, poll=5)
        ms = (time.perf_counter() - t) * 1000
        if done["status"] != "succeeded":
            print(f"[demo] query {path.name} {done['status']}: {done.get('error')}")
            return 1
        res = done["result"]
        print(f"\n[query] {path.name} (not in the index): {len(res['hits'])} hits via "
              f"{res['search']['method']} ({res['search']['candidates']} candidates of "
              f"{res['search']['indexed']}), {ms:.0f} ms submit->result")
        for rank, hit in enumerate(res["hits"], start=1):
            print(f"  {rank:2d}. {hit['path']:<40} distance={hit['distance']:.4f} "
                  f"score={hit['score']:.4f}  {base}/images/{hit['image_id']}")
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s. The stack keeps running at {base} "
          "(stop it with: .venv/bin/python scripts/stack.py stop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
