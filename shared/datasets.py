"""Training folders: resolve them inside the data root and scan them without surprises."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A training folder the service will not use; ``code`` names why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _resolve_inside(data_root: Path, raw: str, field: str, want_folder: bool) -> Path:
    """Resolve a user-given path, relative to the data root or absolute inside it, that exists
    and is a folder (``want_folder``) or a regular file."""
    if not isinstance(raw, str) or not raw.strip():
        raise DatasetError(f"invalid_{field}", f"'{field}' must be a non-empty path")
    if "\x00" in raw:
        raise DatasetError(f"invalid_{field}", f"'{field}' contains a NUL byte")
    noun, kind = ("folder", "folder") if want_folder else ("file", "regular file")
    # Messages quote what was sent, bounded: a 600 KB name is not repeated in the answer.
    quoted = display_name(raw, SHOWN_CHARS, quote=True)
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = data_root / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError on 3.11), name too long
        reason = getattr(exc, "strerror", None) or "symlink loop"
        raise DatasetError(
            f"invalid_{field}", f"{field} path cannot be resolved ({reason}): {quoted}"
        ) from None
    if resolved != data_root and data_root not in resolved.parents:
        raise DatasetError(
            f"{field}_outside_data_root",
            f"{field} must lie inside the data root {str(data_root)!r}",
        )
    try:
        mode = resolved.stat().st_mode
    except OSError:
        raise DatasetError(f"{field}_not_found", f"{field} {noun} not found: {quoted}") from None
    if not (stat.S_ISDIR(mode) if want_folder else stat.S_ISREG(mode)):
        raise DatasetError(f"{field}_not_a_{noun}", f"{field} is not a {kind}: {quoted}")
    return resolved


def resolve_dataset(data_root: Path, dataset: str) -> Path:
    """Resolve a user-given folder, relative to the data root or absolute inside it.

    Args:
        data_root: the configured root every training folder must lie in (already resolved).
        dataset: what the user sent.

    Returns:
        The resolved folder (symlinks resolved), inside ``data_root``.

    Raises:
        DatasetError: empty, outside the root (``..`` or a symlink escape), missing, not a folder,
            or unresolvable (symlink loop, name too long).
    """
    return _resolve_inside(data_root, dataset, "dataset", want_folder=True)


def resolve_labels_file(data_root: Path, labels: str) -> Path:
    """Resolve a user-given labels file (``path,class`` CSV) inside the data root.

    Args:
        data_root: the configured data root (already resolved).
        labels: what the user sent, relative to the data root or absolute inside it.

    Returns:
        The resolved regular file.

    Raises:
        DatasetError: empty, outside the root, missing or not a regular file.
    """
    return _resolve_inside(data_root, labels, "labels", want_folder=False)


def canonical_name(data_root: Path, resolved: Path) -> str:
    """The name a resolved folder or file is recorded under: relative to the data root.

    ``qa_train/../qa_train``, ``./qa_train/`` and the absolute path all name ``qa_train``, so job
    records, model versions and ``GET /models`` show one name for one folder, and a worker whose
    data root is mounted elsewhere still finds it.

    Args:
        data_root: the configured data root (already resolved).
        resolved: what ``resolve_dataset`` or ``resolve_labels_file`` returned (inside the root).

    Returns:
        The POSIX path relative to the data root; ``"."`` for the root itself.
    """
    return resolved.relative_to(data_root).as_posix()


# How much of a user-supplied value an error message repeats (a name, path, id, field...).
SHOWN_CHARS = 200


def display_name(name: str, limit: int | None = None, quote: bool = False) -> str:
    """A printable, JSON-safe form of a name whose bytes may not be valid UTF-8, optionally
    bounded for an error message.

    Args:
        name: a file name, path, field name, id... as received or read from the disk.
        limit: keep the first ``limit`` characters, then an ellipsis and the total length, so
            a message never repeats a huge input in full; None keeps it whole.
        quote: quote it as ``repr`` does (the form messages use); the length stays outside.

    Returns:
        The display form.
    """
    cut = name if limit is None or len(name) <= limit else name[:limit]
    if quote:
        out = repr(cut)  # escapes what is not printable, lone surrogates included
    else:
        try:
            out = os.fsencode(cut).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate from JSON ("\\ud800"), not from a disk
            out = cut.encode("utf-8", "backslashreplace").decode("utf-8")
    if cut is not name:
        out += f"\u2026 ({len(name):,} characters)"
    return out


@dataclass(frozen=True)
class Candidate:
    """A regular file that may be an image: absolute path and path relative to the dataset."""

    path: Path
    relpath: str


@dataclass(frozen=True)
class Skipped:
    """Something the scan did not take, and why."""

    relpath: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.relpath, "reason": self.reason}


def iter_dataset(root: Path) -> Iterator[Candidate | Skipped]:
    """Walk a folder recursively, depth first, in sorted order.

    Hidden files and folders, non-regular files, dangling links, links leading out of ``root``
    and undecodable names are yielded as ``Skipped``; directory symlinks are never followed,
    so loops end. Every regular file is a candidate: formats are decided by content later.

    Args:
        root: a resolved folder.

    Yields:
        ``Candidate`` or ``Skipped`` items.
    """
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield Skipped(prefix.rstrip("/") or ".", f"unreadable folder: {exc.strerror}")
            continue
        subfolders: list[tuple[Path, str]] = []
        # A folder is reported as empty only when it shows nothing but hidden entries (an empty
        # class folder, or one holding just .DS_Store); a folder whose visible entries were all
        # skipped is not reported again, each entry already carries its own reason.
        visible = False
        for entry in entries:
            shown = prefix + display_name(entry.name)
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                visible = True
                yield Skipped(shown, "undecodable file name")
                continue
            rel = prefix + entry.name
            if entry.name.startswith("."):
                yield Skipped(rel, "hidden")
                continue
            visible = True
            try:
                if entry.is_symlink():
                    yield _classify_link(root, Path(entry.path), rel)
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                yield Skipped(rel, f"unreadable: {exc.strerror}")
                continue
            if stat.S_ISDIR(mode):
                subfolders.append((Path(entry.path), rel + "/"))
            elif stat.S_ISREG(mode):
                yield Candidate(Path(entry.path), rel)
            else:
                yield Skipped(rel, "not a regular file")
        if not visible and prefix:
            yield Skipped(prefix.rstrip("/"), "empty folder")
        stack.extend(reversed(subfolders))


def _classify_link(root: Path, link: Path, rel: str) -> Candidate | Skipped:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return Skipped(rel, "broken link")
    if target.is_dir():
        return Skipped(rel, "directory symlink not followed")
    if root not in target.parents:
        return Skipped(rel, "link points outside the dataset")
    if not target.is_file():
        return Skipped(rel, "not a regular file")
    return Candidate(link, rel)
