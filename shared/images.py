"""Image decoding that survives hostile input: sniff by content, cap pixels, fix modes and EXIF."""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError, features

log = logging.getLogger(__name__)

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

# EXIF Orientation -> the transpose that shows the stored pixels upright, as in
# ImageOps.exif_transpose.
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# Leading bytes of the formats we accept: a file that starts like one of them but cannot be
# opened is a damaged image, not "some other kind of file".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# warnings.catch_warnings swaps process-global state; decoding runs in threads (dataset decode,
# gthread workers), so every use is serialised. Only header parsing runs under it, not decoding.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Collect Pillow's warnings about damaged headers instead of printing them.

    ``DecompressionBombWarning`` is raised as an exception so the caller can refuse the image;
    everything else (``Corrupt EXIF data``, ``Truncated File Read``, ...) is returned to the
    caller and logged at debug level: the outcome is decided by whether Pillow could read the
    image, never by a warning escaping to the caller's warning filters.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield caught
        finally:
            for item in caught:
                log.debug("pillow warning while reading an image: %s", item.message)


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


_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})


def _sniff_container(head: bytes) -> tuple[str, str] | None:
    """Name the HEIF/AVIF family from an ISO-BMFF ``ftyp`` box, which plain Pillow cannot open.

    Returns ``(family, name)``: the family decides whether a plugin can read it ("HEIF" or
    "AVIF"), the name is what the client is told ("heic", "heif" or "avif"). The compatible
    brands count as well as the major one: an AVIF file may carry the generic major brand mif1.
    """
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    (box_size,) = struct.unpack(">I", head[:4])
    end = min(len(head), max(box_size, 16))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF", "avif"
    if brands & _HEIC_BRANDS:
        return "HEIF", "heic"
    if brands & _HEIF_BRANDS:
        return "HEIF", "heif"
    return None


def _jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first SOFn marker of a JPEG, walking the segment list."""
    pos = 2
    limit = min(len(data), 1 << 20)
    while pos + 4 <= limit:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in {0x01, *range(0xD0, 0xD8)}:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE,
                      0xCF} and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Declared width and height read straight from the header (PNG, GIF, BMP, JPEG).

    Used only to name the size of an image Pillow refused to open as a decompression bomb.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in {b"GIF87a", b"GIF89a"} and len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM" and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_header_size(data)
    except struct.error:
        return None
    return None


def _riff_truncated(data: bytes) -> bool:
    """True for a WebP (RIFF) file shorter than the size its header declares."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    (declared,) = struct.unpack("<I", data[4:8])
    return len(data) < declared + 8


def _damaged_signature(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
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
        raise ImageDecodeError("empty_file", "empty file (0 bytes)")
    container = _sniff_container(data[:64])
    if container and container[0] not in OPTIONAL_READABLE:
        raise ImageDecodeError(
            "unsupported_format",
            f"unsupported format: {container[1]} (install pillow-heif to accept it)",
            415,
        )
    try:
        # A bomb warning means the header already exceeds Pillow's limit: reject, never decode.
        with _pillow_warnings():
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _header_size(data) or (None, None)
        raise _too_large(size[0], size[1], max_pixels) from None
    except UnidentifiedImageError:
        damaged = _damaged_signature(data)
        if damaged:
            raise ImageDecodeError(
                "truncated_image",
                f"image file is truncated or damaged: it starts like a {damaged} file "
                "but its header cannot be read",
            ) from None
        raise ImageDecodeError(
            "not_an_image", "cannot identify image: the bytes are not a known image format"
        ) from None
    except MemoryError:
        raise ImageDecodeError("image_too_large", "image header needs too much memory", 413) \
            from None
    except Exception as exc:  # Any plugin failure on hostile bytes is the input's fault.
        # Only a file that starts with a real signature is called truncated; "BM" + text also
        # makes Pillow's BMP reader run out of bytes, and that is no damaged image.
        if _riff_truncated(data) or (_damaged_signature(data) and "truncat" in str(exc).lower()):
            raise ImageDecodeError(
                "truncated_image", f"image file is truncated or damaged: {exc}"
            ) from None
        raise ImageDecodeError(
            "corrupt_image", f"corrupt image header: {exc or type(exc).__name__}"
        ) from None
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
        frames=_count_frames(image),
    )


def _count_frames(image: Image.Image) -> int:
    """Frame count, or 1 when later frames are damaged (only the first frame is ever used)."""
    try:
        with _pillow_warnings():
            # Counting walks every frame (GIF): a file cut after frame 1 raises IndexError,
            # struct.error, EOFError... here, yet its first frame decodes fine.
            return max(1, int(getattr(image, "n_frames", 1) or 1))
    except Exception:
        return 1
    finally:
        with contextlib.suppress(Exception):
            image.seek(0)


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
    elif mode == "F":
        # Float data: [0, 1] is the usual convention; anything else has no agreed range
        # (HDR, depth, [-1, 1]), so stretch it rather than read a 0..2 ramp as black.
        if lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
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
    if mode == "RGB" and "transparency" not in image.info:  # RGB + tRNS colour key: composite
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


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation (1..8), or 1 when absent, out of range or unreadable."""
    try:
        with _pillow_warnings():
            value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # Broken EXIF must never fail a request; the pixels are still good.
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_FIX else 1


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Show the pixels upright, as ``ImageOps.exif_transpose`` would, without its EXIF rewrite.

    Only the Orientation tag is read (under the warnings guard); the transpose itself cannot be
    spoiled by other broken tags, which ``exif_transpose`` re-serialises and can fail on.
    """
    method = _ORIENTATION_FIX.get(_exif_orientation(image))
    return image if method is None else image.transpose(method)


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode the first frame of an image into upright 8-bit RGB.

    Args:
        data: the file's bytes.
        max_pixels: pixel cap checked from the header before decoding.
        draft_size: when set, JPEGs are decoded at a reduced scale no smaller than this.

    Returns:
        An RGB Pillow image, EXIF orientation applied.

    Raises:
        ImageDecodeError: and nothing else, with a code naming the problem: empty_file,
            not_an_image, truncated_image, corrupt_image, unsupported_format (415),
            unsupported_mode (415), image_too_large (413).
    """
    image = _open(data, max_pixels)
    try:
        if draft_size and image.format in {"JPEG", "MPO"}:
            # DCT scaling: decode at 1/2..1/8 size when the photo is much larger than needed.
            image.draft("RGB", (draft_size, draft_size))
        image.seek(0)  # multi-frame files: the first frame, documented
        image.load()
    except MemoryError:
        raise ImageDecodeError("image_too_large", "image needs too much memory to decode", 413) \
            from None
    except (OSError, EOFError) as exc:
        text = str(exc)
        if isinstance(exc, EOFError) or any(
            hint in text for hint in ("truncated", "broken data stream", "unrecognized data")
        ):
            raise ImageDecodeError(
                "truncated_image", f"image file is truncated or damaged: {text or 'early end'}"
            ) from None
        raise ImageDecodeError("corrupt_image", f"cannot decode image: {text}") from None
    except Exception as exc:  # SyntaxError, ValueError, struct.error, ... from a damaged file
        raise ImageDecodeError(
            "corrupt_image", f"cannot decode image: {exc or type(exc).__name__}"
        ) from None
    image = _apply_exif_orientation(image)
    try:
        return to_rgb(image)
    except (ValueError, OSError) as exc:  # a mode Pillow cannot convert (e.g. 'La')
        raise ImageDecodeError(
            "unsupported_mode", f"unsupported image mode {image.mode}: {exc}", 415
        ) from None


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


def sample_jpeg(side: int = 32) -> bytes:
    """A small valid gray JPEG: decoding it once sets up Pillow's decoder (and, through a model,
    its kernels) before a real request pays for that (API and worker warm-ups).

    Args:
        side: width and height in pixels.

    Returns:
        The JPEG bytes.
    """
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


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
