"""Image decoding that survives hostile input: sniff by content, cap pixels, fix modes and EXIF."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

# Formats accepted by content. MPO is what many cameras write for JPEG.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP"})
# Optional formats that need a plugin (pillow-heif) registered in this process.
PLUGIN_FORMATS = frozenset({"HEIF", "AVIF"})
# Composite transparent pixels onto this fixed background so hidden colour never shows.
BACKGROUND_RGB = (255, 255, 255)

# Pillow's own bomb guard stays on; we never set Image.MAX_IMAGE_PIXELS to None.
assert Image.MAX_IMAGE_PIXELS is not None
# Truncated files must fail, not be silently half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _register_optional_plugins() -> frozenset[str]:
    """Register pillow-heif when installed; return the optional formats now readable."""
    readable: set[str] = set()
    try:  # pillow-heif is optional; without it HEIC/AVIF are answered with 415.
        import pillow_heif  # type: ignore[import-not-found]

        pillow_heif.register_heif_opener()
        readable.add("HEIF")
        if hasattr(pillow_heif, "register_avif_opener"):
            pillow_heif.register_avif_opener()
            readable.add("AVIF")
    except ImportError:
        pass
    if features.check("avif"):
        readable.add("AVIF")
    return frozenset(readable)


OPTIONAL_READABLE = _register_optional_plugins()
WEBP_SUPPORTED = bool(features.check("webp"))


class ImageDecodeError(ValueError):
    """An input that is not a usable image. ``code`` is stable; ``http_status`` is the answer."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image, read without decoding pixels."""

    format: str
    width: int
    height: int
    mode: str
    frames: int


def _sniff_container(head: bytes) -> str | None:
    """Name the HEIF/AVIF family from an ISO-BMFF ``ftyp`` box, which plain Pillow cannot open."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in {b"avif", b"avis"}:
            return "AVIF"
        if brand in {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}:
            return "HEIF"
    return None


def _png_header_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _too_large(width: int | None, height: int | None, max_pixels: int) -> ImageDecodeError:
    size = f"{width}x{height}" if width and height else "dimensions beyond Pillow's bomb limit"
    return ImageDecodeError(
        "image_too_large",
        f"image too large: {size} exceeds the limit of {max_pixels:,} pixels",
        413,
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check format and size; raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty_file", "empty file: the upload has no bytes")
    container = _sniff_container(data[:32])
    if container and container not in OPTIONAL_READABLE:
        raise ImageDecodeError(
            "unsupported_format",
            f"unsupported format: {container.lower()} (install pillow-heif to accept it)",
            415,
        )
    try:
        with warnings.catch_warnings():
            # A bomb warning means the header already exceeds Pillow's limit: reject, never decode.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _png_header_size(data[:32]) or (None, None)
        raise _too_large(size[0], size[1], max_pixels) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not_an_image", "cannot identify image: the bytes are not a known image format"
        ) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageDecodeError("corrupt_image", f"corrupt image header: {exc}") from None
    fmt = (image.format or "").upper()
    if fmt not in ACCEPTED_FORMATS and fmt not in OPTIONAL_READABLE:
        raise ImageDecodeError(
            "unsupported_format", f"unsupported format: {fmt.lower() or 'unknown'}", 415
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_large(width, height, max_pixels)
    return image


def probe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Read format and size from the header only.

    Args:
        data: the file's bytes.
        max_pixels: pixel cap; larger images are refused before any decode.

    Returns:
        ImageInfo for the first frame.

    Raises:
        ImageDecodeError: empty, not an image, unsupported format or too large.
    """
    image = _open(data, max_pixels)
    return ImageInfo(
        format=(image.format or "").upper(),
        width=image.size[0],
        height=image.size[1],
        mode=image.mode,
        frames=int(getattr(image, "n_frames", 1) or 1),
    )


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit and float samples to 0..255 without clipping the range to white."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    values = np.where(finite, values, 0.0)
    lo, hi = float(values.min()), float(values.max())
    if mode.startswith("I;16") or array.dtype == np.uint16:
        scaled = values / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0
    else:  # Unknown range (signed or float data): stretch what is there.
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha is composited onto ``BACKGROUND_RGB``; 16-bit and float samples are scaled, not clipped.

    Args:
        image: a loaded Pillow image in any mode.

    Returns:
        A new RGB image of the same size.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I", "F"} or mode.startswith("I;16"):
        gray = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        mode in {"P", "L", "RGB", "1"} and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # Broken EXIF must never fail a request; the pixels are still good.
        return image


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode the first frame of an image into upright 8-bit RGB.

    Args:
        data: the file's bytes.
        max_pixels: pixel cap checked from the header before decoding.
        draft_size: when set, JPEGs are decoded at a reduced scale no smaller than this.

    Returns:
        An RGB Pillow image, EXIF orientation applied.

    Raises:
        ImageDecodeError: with a code naming the problem (empty_file, not_an_image, truncated, ...).
    """
    image = _open(data, max_pixels)
    try:
        if draft_size and image.format in {"JPEG", "MPO"}:
            # DCT scaling: decode at 1/2..1/8 size when the photo is much larger than needed.
            image.draft("RGB", (draft_size, draft_size))
        image.seek(0)  # multi-frame files: the first frame, documented
        image.load()
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "unrecognized data" in text:
            raise ImageDecodeError(
                "truncated_image", f"image file is truncated or damaged: {text}"
            ) from None
        raise ImageDecodeError("corrupt_image", f"cannot decode image: {text}") from None
    except (SyntaxError, ValueError, EOFError, struct.error, IndexError, MemoryError) as exc:
        raise ImageDecodeError("corrupt_image", f"cannot decode image: {exc}") from None
    image = _apply_exif_orientation(image)
    return to_rgb(image)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` in one resampling pass.

    Cropping (not squashing) keeps shapes undistorted; a 1x4000 strip becomes a bounded square.

    Args:
        image: an RGB image.
        size: output side in pixels.

    Returns:
        An RGB image of exactly ``size`` x ``size``.
    """
    width, height = image.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)


def load_for_model(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Decode and fit an image for the encoder.

    Args:
        data: the file's bytes.
        size: model input side.
        max_pixels: pixel cap.

    Returns:
        uint8 array of shape (size, size, 3).
    """
    rgb = decode_image(data, max_pixels, draft_size=size)
    return np.asarray(fit_square(rgb, size), dtype=np.uint8)


def read_file_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a file for decoding, refusing ones beyond ``max_bytes``.

    Args:
        path: a regular file.
        max_bytes: size cap.

    Returns:
        The bytes.

    Raises:
        ImageDecodeError: too large, or unreadable.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError("unreadable_file", f"cannot read file: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ImageDecodeError("file_too_large", f"file larger than {max_bytes:,} bytes", 413)
    return data
