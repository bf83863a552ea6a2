"""Class labels of images for evaluation: a ``path,class`` CSV, else the first folder of a path."""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath

# A labels file is read whole; this bounds what a request can make the service read.
MAX_LABELS_BYTES = 64 * 1024 * 1024


class LabelsError(ValueError):
    """The labels file is missing, too large or not a ``path,class`` CSV."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def read_labels_csv(path: Path, max_bytes: int = MAX_LABELS_BYTES) -> dict[str, str]:
    """Parse a labels file whose paths are relative to the folder holding it.

    The header row must name the columns ``path`` and ``class`` (others are ignored), like the
    ``labels.csv`` beside a dataset.

    Args:
        path: the CSV file (already resolved inside the data root).
        max_bytes: refuse larger files.

    Returns:
        Normalised relative POSIX path -> class name.

    Raises:
        LabelsError: unreadable, too large, no ``path``/``class`` header, or a bad row.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise LabelsError("labels_too_large",
                              f"labels file is {size:,} bytes; the limit is {max_bytes:,}")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelsError("invalid_labels", "labels file is not UTF-8 text") from None
    except OSError as exc:
        raise LabelsError("labels_unreadable",
                          f"cannot read the labels file: {exc.strerror or exc}") from None
    reader = csv.reader(io.StringIO(text))
    header = [name.strip().lower() for name in next(reader, [])]
    if "path" not in header or "class" not in header:
        raise LabelsError("invalid_labels",
                          "labels file must start with a header naming 'path' and 'class'")
    path_col, class_col = header.index("path"), header.index("class")
    labels: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(path_col, class_col):
            raise LabelsError("invalid_labels", f"labels file line {line}: too few columns")
        rel = normalise_relpath(row[path_col])
        label = row[class_col].strip()
        if rel is None or not label:
            raise LabelsError("invalid_labels",
                              f"labels file line {line}: needs a path inside the labels file's "
                              "folder (relative, no '..') and a class")
        labels[rel] = label
    if not labels:
        raise LabelsError("invalid_labels", "labels file lists no image")
    return labels


def normalise_relpath(raw: str) -> str | None:
    """``a/./b.jpg`` -> ``a/b.jpg``; None for absolute paths, ``..`` or empty ones."""
    text = raw.strip().replace("\\", "/")
    if not text or text.startswith("/"):
        return None
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def folder_label(relpath: str) -> str | None:
    """The first folder of a path inside its dataset (``cat/x.jpg`` -> ``cat``); None at top."""
    parts = PurePosixPath(relpath).parts
    return parts[0] if len(parts) > 1 else None


class LabelResolver:
    """Labels images by absolute location: the CSV where it lists them, else their folder."""

    def __init__(self, csv_labels: dict[str, str] | None = None,
                 csv_folder: Path | None = None) -> None:
        self._labels = csv_labels or {}
        self._folder = csv_folder

    def label(self, root: Path | str, relpath: str) -> str | None:
        """Class of the image ``relpath`` inside the dataset ``root``; None when unlabelled.

        Args:
            root: the dataset folder the image was scanned from.
            relpath: its path relative to ``root``.

        Returns:
            The class name, or None (a file at the top of its dataset, not listed in the CSV).
        """
        if self._labels and self._folder is not None:
            try:
                rel = (Path(root) / relpath).relative_to(self._folder).as_posix()
            except ValueError:
                rel = None
            if rel is not None and rel in self._labels:
                return self._labels[rel]
        return folder_label(relpath)
