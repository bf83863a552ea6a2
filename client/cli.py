"""The ``imgsim`` command: train, index, query, evaluate, and manage jobs and models over HTTP.

Exit status: 0 success, 1 the job failed or was canceled, 2 usage, connection or API error
(one line on stderr saying why), 130 interrupted while waiting (the job keeps running).
Run it as ``imgsim`` once installed, or as ``python -m client.cli`` from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import requests
from tqdm import tqdm

from client import FINAL, NOT_IMGSIM, ApiError, ImgsimClient
from client.sheet import Tile, contact_sheet, save_sheet

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8000"
# How long a command waits for a job before giving up (the job goes on; `imgsim job ID`).
WAIT_LIMIT_S = {"train": 4 * 3600.0, "index": 4 * 3600.0, "evaluate": 3600.0, "query": 600.0}
SHEET_THUMB = 256


class UsageError(Exception):
    """A bad command line or argument; answered with exit status 2 and one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of the usage text."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common_options(with_defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command; only the top level sets defaults."""
    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--url", default=default(None),
                        help=f"API base URL (env IMGSIM_URL, default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=default(None),
                        help="bearer token when the server requires one (env IMGSIM_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print machine-readable JSON on stdout")
    parser.add_argument("--quiet", action="store_true", default=default(False),
                        help="no progress bar while waiting")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``imgsim`` argument parser with every command."""
    common = _common_options(with_defaults=False)
    parser = _Parser(prog="imgsim", parents=[_common_options(with_defaults=True)],
                     description="Command-line client of the imgsim image-similarity service.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_text,
                                   description=help_text)

    train = command("train", "train a model version on a folder (inside the server's data root)")
    train.add_argument("folder", help="folder relative to the server's data root")
    train.add_argument("--architecture", choices=["default", "seed"])
    train.add_argument("--epochs", type=int)
    train.add_argument("--image-size", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--embedding-dim", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--val-fraction", type=float)
    train.add_argument("--patience", type=int)
    train.add_argument("--hash-bits", type=int)
    train.add_argument("--num-tables", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--wait", action="store_true", help="wait for the job, with progress")

    index = command("index", "add a folder's images to the active model's index")
    index.add_argument("folder", help="folder relative to the server's data root")
    index.add_argument("--wait", action="store_true", help="wait for the job, with progress")

    query = command("query", "find the indexed images most similar to a local image")
    query.add_argument("image", type=Path, help="image file to search with")
    query.add_argument("-k", type=int, default=10, help="number of hits (1..100, default 10)")
    query.add_argument("--sheet", type=Path, metavar="OUT.png",
                       help="write a contact sheet: the query and its hits with scores")

    jobs = command("jobs", "list recent jobs, newest first")
    jobs.add_argument("--type", dest="job_type", help="only jobs of this type (train, query, ...)")
    jobs.add_argument("--status", help="only jobs in this status")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")

    job = command("job", "show one job: status, progress, result or error")
    job.add_argument("job_id")
    job.add_argument("--wait", action="store_true", help="wait for the job to end, with progress")

    cancel = command("cancel", "cancel a queued or running job")
    cancel.add_argument("job_id")

    command("models", "list model versions, the active one marked")

    activate = command("activate", "make a model version the active one (rollback)")
    activate.add_argument("version")

    evaluate = command("eval", "measure retrieval quality on a labelled folder")
    evaluate.add_argument("folder", help="folder relative to the server's data root")
    evaluate.add_argument("--labels", help="CSV of path,class inside the data root "
                                           "(default: class = sub-folder)")
    evaluate.add_argument("-k", type=int, default=10, help="cut-off of precision/mAP (default 10)")
    evaluate.add_argument("--wait", action="store_true", help="wait for the job, with progress")
    return parser


# ---- output ----------------------------------------------------------------------------------


class Output:
    """Writes either human-readable text or one JSON document per command."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err

    def result(self, data: Any, text: Callable[[], str]) -> None:
        if self.as_json:
            json.dump(data, self.out, indent=2, ensure_ascii=False)
            self.out.write("\n")
        else:
            self.out.write(text().rstrip("\n") + "\n")

    def note(self, message: str) -> None:
        self.err.write(message + "\n")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class ProgressBar:
    """A tqdm bar on stderr driven by job records: one bar per phase (scan, train, embed, ...)."""

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def __call__(self, job: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        progress = job.get("progress") or {}
        phase = progress.get("phase") or job.get("status")
        if phase == "done" or job.get("status") in FINAL:
            if self.bar is not None and self.bar.total and job.get("status") == "succeeded":
                self.bar.n = self.bar.total
            self.close()
            return
        total = progress.get("images_total")
        if phase != self.phase or self.bar is None:
            self.close()
            self.phase = phase
            # Phases without a count (queued, running query) show the time waited instead.
            bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                          "[{elapsed}<{remaining}{postfix}]" if total
                          else "{desc}: {elapsed}{postfix}")
            self.bar = tqdm(total=total, desc=f"{job.get('type', 'job')}:{phase}", unit="img",
                            file=self.stream, dynamic_ncols=True, leave=True,
                            bar_format=bar_format,
                            mininterval=0.2 if self.stream.isatty() else 5.0)
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = int(progress.get("images_done") or 0)
        postfix = []
        if phase == "train" and progress.get("epoch"):
            postfix.append(f"epoch {progress['epoch']}/{progress.get('epochs', '?')}")
        if phase == "train" and progress.get("loss") is not None:
            postfix.append(f"loss {progress['loss']:.4f}")
        self.bar.set_postfix_str(", ".join(postfix), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None


# ---- text renderings -------------------------------------------------------------------------


def _job_outcome(job: Mapping[str, Any]) -> int:
    return EXIT_JOB_FAILED if job.get("status") in {"failed", "canceled"} else EXIT_OK


def _error_line(job: Mapping[str, Any]) -> str:
    error = job.get("error") or {}
    reason = f"{error.get('code')}: {error.get('message')}" if error else job.get("status")
    return f"job {job.get('job_id')} {job.get('status')}: {reason}"


def _train_summary(result: Mapping[str, Any]) -> list[str]:
    history = result.get("history") or []
    best = result.get("best_epoch")
    best_loss = history[best - 1]["val_loss"] if best and len(history) >= best else None
    timings = result.get("timings") or {}
    lines = [
        f"model {result.get('version')} trained on {result.get('dataset')} "
        f"(previous: {result.get('previous_version') or 'none'})",
        f"  images indexed {result.get('images_indexed')}, skipped {result.get('skipped_count')}, "
        f"epochs {result.get('epochs_run')} (best {best}, val loss {_fmt(best_loss)}), "
        f"embedding {result.get('embedding_dim')}",
    ]
    if timings:
        lines.append("  timings: " + ", ".join(
            f"{name.removesuffix('_s')} {value}s" for name, value in timings.items()))
    return lines


def _index_summary(result: Mapping[str, Any]) -> list[str]:
    added, skipped, failed = (result.get(k) or [] for k in ("added", "skipped", "failed"))
    lines = [f"version {result.get('version')}: added {len(added)}, skipped {len(skipped)}, "
             f"failed {len(failed)}"]
    lines += [f"  failed {item.get('path')}: {item.get('reason')}" for item in failed[:20]]
    lines += [f"  skipped {item.get('path')}: {item.get('reason')}" for item in skipped[:20]]
    return lines


def _eval_summary(result: Mapping[str, Any]) -> list[str]:
    k = result.get("k")
    rows = []
    for name in ("lsh", "exact"):
        figures = result.get(name) or {}
        rows.append([name, _fmt(figures.get("precision_at_k")), _fmt(figures.get("map_at_k"))])
    for name, figures in (result.get("baselines") or {}).items():
        figures = figures or {}
        rows.append([f"baseline {name}", _fmt(figures.get("precision_at_k")),
                     _fmt(figures.get("map_at_k"))])
    head = (f"model {result.get('model_version')}: {result.get('queries')} queries, k={k}")
    return [head, _table(rows, ["method", f"precision@{k}", f"mAP@{k}"])]


def _hits_table(hits: Sequence[Mapping[str, Any]]) -> str:
    # An uploaded image is stored as <id>.<ext>: show its own file name when the server has it.
    rows = [[i, _fmt(h.get("score")), _fmt(h.get("distance")),
             f"{h['name']} (uploaded)" if h.get("name") else h.get("path"), h.get("image_id")]
            for i, h in enumerate(hits, 1)]
    return _table(rows, ["#", "score", "distance", "path", "image_id"])


def _job_text(job: Mapping[str, Any]) -> str:
    lines = [f"job {job.get('job_id')}  {job.get('type')}  {job.get('status')}"]
    times = [f"{name} {job.get(f'{name}_at')}" for name in ("created", "started", "finished")
             if job.get(f"{name}_at")]
    if times:
        lines.append("  " + ", ".join(times))
    progress = job.get("progress") or {}
    if progress and job.get("status") not in FINAL:
        lines.append("  progress: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in progress.items() if k != "history"))
    result = job.get("result")
    if result:
        kind = job.get("type")
        if kind == "train":
            lines += _train_summary(result)
        elif kind == "query" and "hits" in result:
            lines.append(_hits_table(result["hits"]))
        elif kind == "index":
            lines += _index_summary(result)
        elif kind == "evaluate":
            lines += _eval_summary(result)
        else:
            lines.append(json.dumps(result, indent=2))
    if job.get("error"):
        lines.append(f"  error {job['error'].get('code')}: {job['error'].get('message')}")
    return "\n".join(lines)


def _quality_text(quality: Mapping[str, Any] | None) -> str:
    if not quality:
        return "-"
    lsh = quality.get("lsh") or {}
    if lsh.get("precision_at_k") is not None:
        return f"P@{quality.get('k', '?')} {lsh['precision_at_k']:.3f}"
    return "evaluated"


# ---- commands --------------------------------------------------------------------------------


class Cli:
    """Runs one parsed command against the API."""

    def __init__(self, args: argparse.Namespace, client: ImgsimClient, output: Output) -> None:
        self.args = args
        self.client = client
        self.output = output

    def _wait(self, accepted: Mapping[str, Any], kind: str) -> dict:
        bar = ProgressBar(not self.args.quiet, self.output.err)
        job_id = accepted["job_id"]
        try:
            return self.client.wait(job_id, on_update=bar, timeout=WAIT_LIMIT_S.get(kind, 3600.0),
                                    poll=1.0 if kind != "query" else 10.0)
        except KeyboardInterrupt:
            bar.close()
            raise _Interrupted(job_id) from None
        finally:
            bar.close()

    def _started(self, accepted: Mapping[str, Any], kind: str) -> int:
        self.output.result(dict(accepted), lambda: (
            f"started {kind} job {accepted['job_id']} ({accepted['status']})\n"
            f"follow it with: imgsim job {accepted['job_id']} --wait"))
        return EXIT_OK

    def _finished(self, job: dict, summary: Callable[[Mapping[str, Any]], list[str]]) -> int:
        if job["status"] != "succeeded":
            self.output.result(job, lambda: _job_text(job))
            self.output.note(f"imgsim: {_error_line(job)}")
            return _job_outcome(job)
        self.output.result(job, lambda: "\n".join(summary(job.get("result") or {})))
        return EXIT_OK

    def train(self) -> int:
        names = ("architecture", "epochs", "image_size", "batch_size", "embedding_dim",
                 "learning_rate", "val_fraction", "patience", "hash_bits", "num_tables", "seed")
        params = {n: getattr(self.args, n) for n in names if getattr(self.args, n) is not None}
        accepted = self.client.train(self.args.folder, **params)
        if not self.args.wait:
            return self._started(accepted, "train")
        return self._finished(self._wait(accepted, "train"), _train_summary)

    def index(self) -> int:
        accepted = self.client.index(self.args.folder)
        if not self.args.wait:
            return self._started(accepted, "index")
        return self._finished(self._wait(accepted, "index"), _index_summary)

    def eval(self) -> int:
        accepted = self.client.evaluate(self.args.folder, labels=self.args.labels, k=self.args.k)
        if not self.args.wait:
            return self._started(accepted, "evaluate")
        return self._finished(self._wait(accepted, "evaluate"), _eval_summary)

    def query(self) -> int:
        image: Path = self.args.image
        if image.is_dir():
            raise UsageError(f"{image} is a folder: give one image file (to add a folder to "
                             "the index, use 'imgsim index FOLDER')")
        if not image.is_file():
            raise UsageError(f"no such image file: {image}")
        if not 1 <= self.args.k <= 100:
            raise UsageError("-k must be between 1 and 100")
        data = image.read_bytes()
        accepted = self.client.query(data, k=self.args.k, filename=image.name)
        job = self._wait(accepted, "query")
        if job["status"] != "succeeded":
            return self._finished(job, lambda _r: [])
        result = job["result"]
        if self.args.sheet:
            self._write_sheet(image.name, data, result["hits"], self.args.sheet)
        timings = result.get("timings_ms") or {}
        method = (result.get("search") or {}).get("method")

        def text() -> str:
            head = (f"{image.name}: {len(result['hits'])} hits from model "
                    f"{result.get('model_version')} ({method}, "
                    f"{sum(timings.values()):.0f} ms in the worker)")
            lines = [head, _hits_table(result["hits"])]
            if self.args.sheet:
                lines.append(f"contact sheet: {self.args.sheet}")
            return "\n".join(lines)

        self.output.result(job, text)
        return EXIT_OK

    def _write_sheet(self, name: str, data: bytes, hits: list[dict], path: Path) -> None:
        tiles = []
        for rank, hit in enumerate(hits, 1):
            try:
                thumb = self.client.image(hit["image_id"], size=SHEET_THUMB)
            except ApiError:
                thumb = None  # shown as a grey placeholder; the scores still tell
            tiles.append(Tile(thumb, f"#{rank}  score {hit['score']:.3f}", hit["path"]))
        sheet = contact_sheet(Tile(data, "query", name), tiles)
        try:
            save_sheet(sheet, path)
        except OSError as exc:
            raise UsageError(f"cannot write the contact sheet {path}: {exc.strerror}") from None

    def jobs(self) -> int:
        listing = self.client.jobs(job_type=self.args.job_type, status=self.args.status,
                                   limit=self.args.limit)

        def text() -> str:
            rows = []
            for job in listing.get("jobs", []):
                params = job.get("params") or {}
                detail = params.get("dataset") or (
                    f"k={params['k']}" if "k" in params else "")
                rows.append([job.get("created_at"), job.get("job_id"), job.get("type"),
                             job.get("status"), detail])
            if not rows:
                return "no jobs"
            return _table(rows, ["created", "job_id", "type", "status", "detail"])

        self.output.result(listing, text)
        return EXIT_OK

    def job(self) -> int:
        if self.args.wait:
            record = self._wait({"job_id": self.args.job_id}, "train")
        else:
            record = self.client.job(self.args.job_id)
        self.output.result(record, lambda: _job_text(record))
        return _job_outcome(record)

    def cancel(self) -> int:
        record = self.client.cancel(self.args.job_id)

        def text() -> str:
            if record.get("status") == "canceled":
                return f"job {record.get('job_id')} canceled"
            return (f"job {record.get('job_id')} is {record.get('status')}: it stops at the "
                    f"next batch (check with: imgsim job {record.get('job_id')})")

        self.output.result(record, text)
        return EXIT_OK

    def models(self) -> int:
        listing = self.client.models()

        def text() -> str:
            rows = [["*" if m.get("active") else "", m.get("version"), m.get("created_at"),
                     m.get("images"), m.get("embedding_dim"), m.get("architecture"),
                     m.get("dataset", "-"), _quality_text(m.get("quality"))]
                    for m in listing.get("models", [])]
            if not rows:
                return "no model versions yet: train one with 'imgsim train FOLDER --wait'"
            return _table(rows, ["", "version", "created", "images", "dim", "arch", "dataset",
                                 "quality"])

        self.output.result(listing, text)
        return EXIT_OK

    def activate(self) -> int:
        answer = self.client.activate(self.args.version)
        self.output.result(answer, lambda: (
            f"active model: {answer['active']} (was {answer.get('previous') or 'none'})"))
        return EXIT_OK


class _Interrupted(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def _connection_reason(exc: requests.RequestException) -> str:
    """The short cause of a connection failure ("Connection refused", "timed out", ...)."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the ``imgsim`` command.

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).
        env: environment for IMGSIM_URL / IMGSIM_API_KEY (``os.environ`` when None).
        out: where results go (stdout).
        err: where progress and errors go (stderr).

    Returns:
        The exit status: 0 ok, 1 job failed or canceled, 2 usage/connection/API error.
    """
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        err.write(f"imgsim: error: {exc}\n")
        return EXIT_USAGE
    url = args.url or env.get("IMGSIM_URL") or DEFAULT_URL
    if not re.match(r"^https?://[^/\s]+", url):
        err.write(f"imgsim: error: --url must be an http(s) URL, got {url!r}\n")
        return EXIT_USAGE
    client = ImgsimClient(url, api_key=args.api_key or env.get("IMGSIM_API_KEY") or None)
    cli = Cli(args, client, Output(args.json, out, err))
    handler = getattr(cli, args.command)
    try:
        return handler()
    except BrokenPipeError:
        # The reader went away (`imgsim jobs | head`): stop quietly like other commands do.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except UsageError as exc:
        err.write(f"imgsim: error: {exc}\n")
    except ApiError as exc:
        if exc.code == NOT_IMGSIM:
            err.write(f"imgsim: error: the server at {client.url} does not answer like an imgsim "
                      f"API ({exc.message}); check --url or IMGSIM_URL\n")
        elif exc.status in {404, 405} and exc.code in {"not_found", "method_not_allowed"}:
            # Flask's own answer, not the API's: no such route on this server.
            err.write(f"imgsim: error: the server at {client.url} has no endpoint for "
                      f"'{args.command}' (an older imgsim version?)\n")
        else:
            err.write(f"imgsim: error: the API answered {exc.status} {exc.code}: "
                      f"{_one_line(exc.message)}\n")
    except requests.ConnectionError as exc:
        err.write(f"imgsim: error: cannot reach the imgsim API at {client.url}: "
                  f"{_connection_reason(exc)}\n")
    except requests.RequestException as exc:
        err.write(f"imgsim: error: request to {client.url} failed: {_connection_reason(exc)}\n")
    except TimeoutError as exc:
        err.write(f"imgsim: error: {exc} (the job goes on; follow it with 'imgsim job ID')\n")
    except _Interrupted as exc:
        err.write(f"imgsim: interrupted; job {exc.job_id} keeps running "
                  f"(follow it with 'imgsim job {exc.job_id} --wait')\n")
        return EXIT_INTERRUPTED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
