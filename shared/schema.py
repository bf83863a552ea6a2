"""Request schemas for jobs: validated once in the API, re-read by the worker from the message."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.datasets import SHOWN_CHARS, display_name


class ValidationError(ValueError):
    """A request field is missing or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Form fields and query parameters are text. Python's int() and float() also take surrounding
# spaces, underscores ("1_0") and non-ASCII digits (Arabic-Indic five), float() "inf" and "nan": a
# request carrying those is a typo or a probe, not what a client meant: only ASCII decimals pass.
_DECIMAL_INT = re.compile(r"-?[0-9]+")
_DECIMAL_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def decimal_int(text: Any) -> int | None:
    """An integer written in ASCII decimal digits, with an optional leading minus.

    Args:
        text: a form field or query parameter.

    Returns:
        The integer, or None for anything else (spaces, ``1_0``, non-ASCII digits, ``1.0``).
    """
    if not isinstance(text, str) or not _DECIMAL_INT.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def decimal_number(text: Any) -> float | None:
    """A number written in ASCII decimal (``5``, ``0.5``, ``.5``, ``1e-3``), optionally negative.

    Args:
        text: a query parameter.

    Returns:
        The float, or None for anything else (spaces, ``inf``, ``nan``, non-ASCII digits).
    """
    if not isinstance(text, str) or not _DECIMAL_NUMBER.fullmatch(text):
        return None
    return float(text)


def _int_field(data: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = data.get(name, default)
    if value is None and default is None:  # only optional-without-default fields take null
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got "
                                    f"{display_name(str(value), SHOWN_CHARS)}")
    return value


def _float_field(data: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(name, f"must be a number between {lo} and {hi}")
    if not lo <= float(value) <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _known_fields_and_dataset(cls: type, data: Any, what: str) -> str:
    """Check a JSON body is an object of ``cls``'s fields with a non-empty ``dataset``.

    Returns:
        The dataset string.
    """
    if not isinstance(data, dict):
        raise ValidationError("body", "must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        accepted = ", ".join(sorted(known))
        # The name is the client's: bounded, as every quoted input is.
        raise ValidationError(display_name(unknown[0], SHOWN_CHARS),
                              f"unknown field; accepted: {accepted}")
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValidationError("dataset", f"required: {what}")
    return dataset


# The default model sees two large and six small views of each image per epoch; 20 epochs
# keep a training on ~2,400 photos within about 4 minutes of a 2-core CPU (README,
# "Retrieval quality").
DEFAULT_EPOCHS = 20
# Epochs without a better validation loss before training stops (the best weights are kept).
# The contrastive part of the default model's validation loss moves by ~0.1 % between late
# epochs, so 3 stopped the demo's training at epoch 12 of 20 with the learning rate still high.
DEFAULT_PATIENCE = 5


@dataclass(frozen=True)
class TrainParams:
    """Training and index parameters of ``POST /jobs/train`` (all optional but ``dataset``)."""

    dataset: str
    architecture: str = "default"
    epochs: int = DEFAULT_EPOCHS
    image_size: int = 64
    batch_size: int = 64
    embedding_dim: int = 256
    learning_rate: float = 1e-3
    val_fraction: float = 0.1
    patience: int = DEFAULT_PATIENCE
    hash_bits: int | None = None
    num_tables: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, data: Any) -> TrainParams:
        """Validate a JSON body.

        Args:
            data: the decoded JSON object.

        Returns:
            TrainParams with defaults filled in.

        Raises:
            ValidationError: naming the first bad field.
        """
        dataset = _known_fields_and_dataset(cls, data, "a folder inside the data root")
        architecture = data.get("architecture", "default")
        if architecture not in ("default", "seed"):
            raise ValidationError("architecture", "must be 'default' or 'seed'")
        image_size = _int_field(data, "image_size", 64, 32, 512)
        step = 8 if architecture == "seed" else 16
        if image_size % step:
            raise ValidationError("image_size", f"must be a multiple of {step} for {architecture}")
        return cls(
            dataset=dataset,
            architecture=architecture,
            epochs=_int_field(data, "epochs", DEFAULT_EPOCHS, 1, 500),
            image_size=image_size,
            batch_size=_int_field(data, "batch_size", 64, 2, 1024),
            embedding_dim=_int_field(data, "embedding_dim", 256, 8, 2048),
            learning_rate=_float_field(data, "learning_rate", 1e-3, 1e-6, 1.0),
            val_fraction=_float_field(data, "val_fraction", 0.1, 0.0, 0.5),
            patience=_int_field(data, "patience", DEFAULT_PATIENCE, 1, 100),
            hash_bits=_int_field(data, "hash_bits", None, 2, 24),
            num_tables=_int_field(data, "num_tables", None, 1, 64),
            seed=_int_field(data, "seed", 0, 0, 2**31 - 1),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueryParams:
    """Options of ``POST /jobs/query`` besides the image."""

    k: int = 10

    @classmethod
    def parse(cls, form: dict[str, str]) -> QueryParams:
        k = decimal_int(form.get("k", "10"))
        if k is None:
            raise ValidationError("k", "must be an integer between 1 and 100")
        if not 1 <= k <= 100:
            raise ValidationError("k", f"must be between 1 and 100, got "
                                       f"{display_name(str(k), SHOWN_CHARS)}")
        return cls(k=k)


@dataclass(frozen=True)
class EvaluateParams:
    """``POST /jobs/evaluate``: labelled query images and the cut-off of the metrics."""

    dataset: str
    labels: str | None = None
    k: int = 10

    @classmethod
    def parse(cls, data: Any) -> EvaluateParams:
        """Validate a JSON body.

        Args:
            data: the decoded JSON object.

        Returns:
            EvaluateParams with defaults filled in.

        Raises:
            ValidationError: naming the first bad field.
        """
        dataset = _known_fields_and_dataset(
            cls, data, "a folder of query images inside the data root")
        labels = data.get("labels")
        if labels is not None and (not isinstance(labels, str) or not labels.strip()):
            raise ValidationError("labels", "must be the path of a path,class CSV file inside "
                                  "the data root")
        return cls(dataset=dataset, labels=labels, k=_int_field(data, "k", 10, 1, 100))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IndexParams:
    """``POST /jobs/index`` with JSON: a folder to add to the active version."""

    dataset: str

    @classmethod
    def parse(cls, data: Any) -> IndexParams:
        """Validate a JSON body.

        Args:
            data: the decoded JSON object.

        Returns:
            IndexParams.

        Raises:
            ValidationError: naming the first bad field.
        """
        return cls(dataset=_known_fields_and_dataset(cls, data, "a folder inside the data root"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
