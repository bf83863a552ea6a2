"""shared.images against hostile inputs: every MANIFEST.tsv image row, plus whole kinds built here.

The shipped fixtures (``MANIFEST.tsv``) pin one example per problem; the runtime-built cases
cover each problem as a kind (every EXIF orientation, every 16-bit/float mode, every way of being
cut short, every way of carrying transparency) so a fix for one file cannot pass by accident.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from shared.images import (
    ACCEPTED_FORMATS,
    BACKGROUND_RGB,
    ImageDecodeError,
    decode_image,
    fit_square,
    load_for_model,
    probe_image,
    to_rgb,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("IMGSIM_TEST_FIXTURES", REPO.parent / "shared" / "fixtures" / "bad_inputs")
)
MAX_PIXELS = 40_000_000
SIZE = 64
HEIF_PLUGIN = importlib.util.find_spec("pillow_heif") is not None
WEBP = bool(features.check("webp"))


# --------------------------------------------------------------------------- manifest rows


def _manifest_rows() -> list[dict[str, str]]:
    path = FIXTURES / "MANIFEST.tsv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        # vec_*.npy rows are embeddings for the LSH index, tested with the index.
        return [row for row in rows if not row["file"].endswith(".npy")]


ROWS = _manifest_rows()

# Rows whose expected_behaviour does not start with "accepted"/"rejected" need a decision here;
# a new manifest row of that kind fails test_every_manifest_row_has_an_expectation.
DECIDED = {
    # "either rejected by the service's pixel cap or downscaled": 81 Mpx > the 40 Mpx cap.
    "large_1bit_9000x9000.png": "rejected",
    "tiny_1x1.jpg": "accepted",  # "same as tiny_1x1.png"
    "strip_1x4000.png": "accepted",  # fixed (H, W) resize, never shorter-side resize
    "dup_b_same_bytes.jpg": "accepted",  # dedupe happens at indexing, the decode accepts it
    "dup_c_same_pixels.png": "accepted",
}

# For rejected rows: the stable error code and status the service must answer with.
REJECTED = {
    "truncated_half.jpg": ("truncated_image", 400),
    "truncated_no_eoi.jpg": ("truncated_image", 400),
    "zero_bytes.jpg": ("empty_file", 400),
    "not_an_image.jpg": ("not_an_image", 400),
    "bomb_header_100000x100000.png": ("image_too_large", 413),
    "bomb_1bit_20000x20000.png": ("image_too_large", 413),
    "large_1bit_9000x9000.png": ("image_too_large", 413),
}


def _expectation(row: dict[str, str]) -> str:
    name, text = row["file"], row["expected_behaviour"]
    if name == "photo.heic":
        return "accepted" if HEIF_PLUGIN else "heic_unsupported"
    if name in DECIDED:
        return DECIDED[name]
    if text.startswith("accepted"):
        return "accepted"
    if text.startswith("rejected"):
        return "rejected"
    return "undecided"


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, max_pixels=MAX_PIXELS)).astype(np.int16)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _assert_rejected(data: bytes, code: str | None = None, status: int | None = None):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=MAX_PIXELS)
    err = info.value
    assert 400 <= err.http_status < 500, (err.code, err.http_status, err.message)
    assert err.code and err.message, err
    if code is not None:
        assert err.code == code, err.message
    if status is not None:
        assert err.http_status == status, err.message
    return err


def test_manifest_is_present_and_lists_every_image_file():
    assert ROWS, f"no MANIFEST.tsv rows under {FIXTURES}"
    listed = {row["file"] for row in ROWS}
    on_disk = {
        p.name
        for p in FIXTURES.iterdir()
        if p.is_file() and p.suffix not in {".tsv", ".npy"}
    }
    assert on_disk == listed, f"unlisted: {on_disk - listed}, missing: {listed - on_disk}"


@pytest.mark.parametrize("row", ROWS, ids=[row["file"] for row in ROWS])
def test_every_manifest_row_has_an_expectation(row):
    expectation = _expectation(row)
    assert expectation != "undecided", f"decide what {row['file']} should do: {row}"
    if expectation == "rejected":
        assert row["file"] in REJECTED, f"name the error code for {row['file']}"


ACCEPTED_ROWS = [row for row in ROWS if _expectation(row) == "accepted"]
REJECTED_ROWS = [row for row in ROWS if _expectation(row) == "rejected"]


@pytest.mark.parametrize("row", ACCEPTED_ROWS, ids=[row["file"] for row in ACCEPTED_ROWS])
def test_accepted_manifest_file_decodes_to_rgb_and_fits_the_model(row):
    data = _fixture(row["file"])
    info = probe_image(data, MAX_PIXELS)
    assert info.format in ACCEPTED_FORMATS or info.format in {"HEIF", "AVIF"}
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert image.size[0] >= 1 and image.size[1] >= 1
    assert np.asarray(image).shape == (image.size[1], image.size[0], 3)
    pixels = load_for_model(data, SIZE, MAX_PIXELS)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize("row", REJECTED_ROWS, ids=[row["file"] for row in REJECTED_ROWS])
def test_rejected_manifest_file_raises_decode_error(row):
    data = _fixture(row["file"])
    code, status = REJECTED[row["file"]]
    err = _assert_rejected(data, code, status)
    # load_for_model (the worker's path) refuses it the same way.
    with pytest.raises(ImageDecodeError) as again:
        load_for_model(data, SIZE, MAX_PIXELS)
    assert (again.value.code, again.value.http_status) == (err.code, err.http_status)


# --------------------------------------------------------------------------- fixture semantics


def test_heic_follows_plugin_availability():
    data = _fixture("photo.heic")
    if HEIF_PLUGIN:
        assert decode_image(data, MAX_PIXELS).mode == "RGB"
        return
    err = _assert_rejected(data, "unsupported_format", 415)
    assert "heic" in err.message.lower()
    with pytest.raises(ImageDecodeError) as probe:
        probe_image(data, MAX_PIXELS)
    assert probe.value.http_status == 415


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("bomb_header_100000x100000.png", "100000x100000"),
        ("bomb_1bit_20000x20000.png", "20000x20000"),
        ("large_1bit_9000x9000.png", "9000x9000"),
    ],
)
def test_oversized_images_are_refused_from_the_header(name, dims, monkeypatch):
    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels decoded for an image the header already refuses")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    data = _fixture(name)
    err = _assert_rejected(data, "image_too_large", 413)
    assert dims in err.message
    with pytest.raises(ImageDecodeError) as probe:
        probe_image(data, MAX_PIXELS)
    assert probe.value.http_status == 413


@pytest.mark.parametrize(
    "name", ["bomb_header_100000x100000.png", "bomb_1bit_20000x20000.png"]
)
def test_pillow_bomb_guard_stays_on_when_the_service_cap_is_raised(name):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_fixture(name), max_pixels=10**12)
    assert info.value.http_status == 413
    assert Image.MAX_IMAGE_PIXELS is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_service_cap_names_the_size_of_an_ordinary_image():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_fixture("control_rgb.jpg"), max_pixels=1000)
    assert info.value.http_status == 413
    assert "256x192" in info.value.message


def test_rgba_hidden_green_is_composited_onto_white():
    data = _fixture("rgba_hidden_color.png")
    # The fixture really does hide pure green under alpha 0: a naive convert shows it.
    with Image.open(io.BytesIO(data)) as raw:
        naive = np.asarray(raw.convert("RGB")).astype(np.int16)
    assert naive[:, -20:, 1].mean() > 200 and naive[:, -20:, 0].mean() < 50
    right = _rgb(data)[:, -20:]  # right half is fully transparent
    assert np.abs(right - 255).mean() < 8, right.mean(axis=(0, 1))


def test_gray16_ramp_survives_scaling():
    pixels = _rgb(_fixture("gray16_I16.png"))
    left, right = pixels[:, :20].mean(), pixels[:, -20:].mean()
    assert left < 40 and right > 215, (left, right)
    assert pixels.mean() < 200, "16-bit ramp came out (near) white"
    assert (pixels[..., 0] == pixels[..., 2]).all()


EXIF_FILES = sorted(
    row["file"] for row in ROWS if row["file"].startswith("exif_orientation_")
    and "invalid" not in row["file"]
)


def _assert_upright_like_reference(pixels: np.ndarray, reference: np.ndarray, tolerance=12.0):
    assert pixels.shape == reference.shape
    diff = np.abs(pixels - reference).mean()
    assert diff < tolerance, f"mean abs difference {diff:.1f} from the upright reference"
    top = pixels[:4, 24:].reshape(-1, 3).mean(axis=0)  # red band on top (right of blue patch)
    assert top[0] > 150 and top[1] < 90 and top[2] < 90, top


@pytest.mark.parametrize("name", EXIF_FILES)
def test_exif_orientation_fixture_matches_reference(name):
    reference = _rgb(_fixture("exif_reference_upright.png"))
    _assert_upright_like_reference(_rgb(_fixture(name)), reference)


def test_exif_fixtures_cover_rotation():
    assert "exif_orientation_6.jpg" in EXIF_FILES, EXIF_FILES


@pytest.mark.parametrize("name", ["exif_orientation_invalid_9.jpg", "exif_empty_app1.jpg"])
def test_broken_exif_is_ignored(name):
    image = decode_image(_fixture(name), MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (48, 64)


@pytest.mark.parametrize("name", ["animated.gif", "animated.png"])
def test_animation_uses_first_red_frame(name):
    data = _fixture(name)
    assert probe_image(data, MAX_PIXELS).frames == 4
    red, green, blue = _rgb(data).reshape(-1, 3).mean(axis=0)
    assert red > 180 and green < 80 and blue < 80, (red, green, blue)


def test_png_named_as_jpg_is_sniffed_by_content():
    data = _fixture("png_named_as.jpg")
    assert probe_image(data, MAX_PIXELS).format == "PNG"
    assert decode_image(data, MAX_PIXELS).mode == "RGB"


def test_cmyk_gives_three_channels():
    data = _fixture("cmyk.jpg")
    assert probe_image(data, MAX_PIXELS).mode == "CMYK"
    assert _rgb(data).shape[-1] == 3
    assert load_for_model(data, SIZE, MAX_PIXELS).shape == (SIZE, SIZE, 3)


def test_strip_is_bounded_to_the_model_square():
    data = _fixture("strip_1x4000.png")
    image = decode_image(data, MAX_PIXELS)
    assert image.size == (1, 4000)
    assert fit_square(image, SIZE).size == (SIZE, SIZE)
    assert load_for_model(data, SIZE, MAX_PIXELS).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("name", ["tiny_1x1.png", "tiny_1x1.jpg"])
def test_tiny_image_is_resized_up(name):
    data = _fixture(name)
    assert decode_image(data, MAX_PIXELS).size == (1, 1)
    pixels = load_for_model(data, SIZE, MAX_PIXELS)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert (pixels == pixels[0, 0]).all(), "one pixel upscaled must stay one flat colour"


def test_control_jpeg_and_png_decode_to_close_pixels():
    jpeg, png = _rgb(_fixture("control_rgb.jpg")), _rgb(_fixture("control_rgb.png"))
    assert jpeg.shape == png.shape == (192, 256, 3)
    assert np.abs(jpeg - png).mean() < 6
    model_jpeg = load_for_model(_fixture("control_rgb.jpg"), SIZE, MAX_PIXELS).astype(np.int16)
    model_png = load_for_model(_fixture("control_rgb.png"), SIZE, MAX_PIXELS).astype(np.int16)
    assert np.abs(model_jpeg - model_png).mean() < 6


def test_duplicate_pixels_decode_identically():
    a, c = _rgb(_fixture("dup_a.jpg")), _rgb(_fixture("dup_c_same_pixels.png"))
    assert np.abs(a - c).max() <= 1


# --------------------------------------------------------------------------- EXIF, every kind

UPRIGHT_W, UPRIGHT_H = 48, 64


def _upright() -> np.ndarray:
    """Reference: red band on top, blue patch top-left, white stripe left of centre."""
    pixels = np.empty((UPRIGHT_H, UPRIGHT_W, 3), dtype=np.uint8)
    pixels[:] = (40, 160, 60)
    pixels[:16] = (220, 30, 30)
    pixels[:12, :16] = (30, 30, 220)
    pixels[24:, 18:22] = (255, 255, 255)
    return pixels


# How each orientation stores the upright picture (EXIF 2.3, section 4.6.4 A).
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),  # displayed by rotating 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}
EXIF_FORMATS = ["JPEG", "PNG"] + (["WEBP"] if WEBP else [])


@pytest.mark.parametrize("fmt", EXIF_FORMATS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation, fmt):
    upright = _upright()
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    if orientation >= 5:
        assert stored.size == (UPRIGHT_H, UPRIGHT_W)
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"quality": 95} if fmt in {"JPEG", "WEBP"} else {}
    data = _encode(stored, fmt, exif=exif.tobytes(), **params)
    _assert_upright_like_reference(_rgb(data), upright.astype(np.int16))
    # The model input is upright too: same square as the upright image's.
    square = load_for_model(data, SIZE, MAX_PIXELS).astype(np.int16)
    expected = load_for_model(_encode(Image.fromarray(upright), "PNG"), SIZE, MAX_PIXELS)
    assert np.abs(square - expected.astype(np.int16)).mean() < 12


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_orientation_is_ignored(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(_upright()), "JPEG", exif=exif.tobytes(), quality=95)
    _assert_upright_like_reference(_rgb(data), _upright().astype(np.int16))


# --------------------------------------------------------------------------- 16-bit and float

RAMP_W, RAMP_H = 256, 16


def _ramp(lo: float, hi: float, dtype) -> np.ndarray:
    row = np.linspace(lo, hi, RAMP_W)
    return np.tile(row, (RAMP_H, 1)).astype(dtype)


def _image_from(array: np.ndarray, expected_mode: str) -> Image.Image:
    image = Image.fromarray(array)
    assert image.mode == expected_mode
    return image


WIDE_MODES: dict[str, Callable[[], bytes]] = {
    "I;16-png": lambda: _encode(_image_from(_ramp(0, 65535, np.uint16), "I;16"), "PNG"),
    "I;16-tiff": lambda: _encode(_image_from(_ramp(0, 65535, np.uint16), "I;16"), "TIFF"),
    "I;16B-tiff": lambda: _encode(_image_from(_ramp(0, 65535, ">u2"), "I;16B"), "TIFF"),
    "I32-tiff-0..65535": lambda: _encode(_image_from(_ramp(0, 65535, np.int32), "I"), "TIFF"),
    "I32-tiff-0..255": lambda: _encode(_image_from(_ramp(0, 255, np.int32), "I"), "TIFF"),
    "I32-tiff-large": lambda: _encode(_image_from(_ramp(0, 2e9, np.int32), "I"), "TIFF"),
    "I32-tiff-signed": lambda: _encode(_image_from(_ramp(-2e9, 2e9, np.int32), "I"), "TIFF"),
    "F-tiff-0..1": lambda: _encode(_image_from(_ramp(0, 1, np.float32), "F"), "TIFF"),
    "F-tiff-0..2": lambda: _encode(_image_from(_ramp(0, 2, np.float32), "F"), "TIFF"),
    "F-tiff-0..255": lambda: _encode(_image_from(_ramp(0, 255, np.float32), "F"), "TIFF"),
    "F-tiff-large": lambda: _encode(_image_from(_ramp(0, 1e6, np.float32), "F"), "TIFF"),
    "F-tiff-signed": lambda: _encode(_image_from(_ramp(-1, 1, np.float32), "F"), "TIFF"),
    "F-tiff-huge": lambda: _encode(_image_from(_ramp(-3e38, 3e38, np.float32), "F"), "TIFF"),
}


@pytest.mark.parametrize("kind", list(WIDE_MODES))
def test_wide_sample_ramp_is_neither_white_nor_black(kind):
    data = WIDE_MODES[kind]()
    pixels = _rgb(data)
    assert pixels.shape == (RAMP_H, RAMP_W, 3)
    left, right = pixels[:, :16].mean(), pixels[:, -16:].mean()
    assert left < 64 and right > 190, (left, right)
    assert 32 < pixels.mean() < 224, pixels.mean()
    assert np.all(np.diff(pixels[0, :, 0]) >= 0), "ramp must stay monotonic"
    assert load_for_model(data, SIZE, MAX_PIXELS).shape == (SIZE, SIZE, 3)


def test_float_with_nan_and_inf_does_not_poison_the_image():
    ramp = _ramp(0, 1, np.float32)
    ramp[:, :4] = np.nan
    ramp[:, 4:8] = np.inf
    pixels = np.asarray(to_rgb(Image.fromarray(ramp))).astype(np.int16)
    assert pixels[:, 8:24].mean() < 64 and pixels[:, -16:].mean() > 190


@pytest.mark.parametrize("value", [0, 65535])
def test_flat_16bit_image_keeps_its_level(value):
    flat = np.full((8, 8), value, dtype=np.uint16)
    pixels = _rgb(_encode(Image.fromarray(flat), "PNG"))
    assert (pixels == round(value / 257)).all()


# --------------------------------------------------------------------------- empty and truncated


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3)
    noise = rng.integers(0, 60, (96, 128, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _cut(fmt: str, fraction: float, **params) -> bytes:
    data = _encode(_photo(), fmt, **params)
    return data[: int(len(data) * fraction)]


def _png_cut_mid_idat() -> bytes:
    data = _encode(_photo(), "PNG")
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    return data[: start + 4 + length // 2]


def _gif_frames(count: int) -> list[Image.Image]:
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]
    return [Image.new("RGB", (48, 48), colours[i % 4]).convert("P") for i in range(count)]


TRUNCATIONS: dict[str, Callable[[], bytes]] = {
    "zero-bytes": lambda: b"",
    "one-byte": lambda: b"\xff",
    "jpeg-soi-only": lambda: b"\xff\xd8\xff",
    "jpeg-header-only": lambda: _encode(_photo(), "JPEG")[:200],
    "jpeg-cut-10%": lambda: _cut("JPEG", 0.10),
    "jpeg-cut-50%": lambda: _cut("JPEG", 0.50),
    "jpeg-cut-90%": lambda: _cut("JPEG", 0.90),
    "jpeg-progressive-cut-50%": lambda: _cut("JPEG", 0.50, progressive=True),
    "png-signature-only": lambda: _encode(_photo(), "PNG")[:8],
    "png-header-only": lambda: _encode(_photo(), "PNG")[:33],
    "png-cut-mid-idat": _png_cut_mid_idat,
    "png-cut-50%": lambda: _cut("PNG", 0.50),
    "gif-header-only": lambda: _encode(_photo().convert("P"), "GIF")[:13],
    "gif-cut-50%": lambda: _cut("GIF", 0.50),
    "gif-cut-90%": lambda: _cut("GIF", 0.90),
    "bmp-cut-50%": lambda: _cut("BMP", 0.50),
    "tiff-header-only": lambda: _encode(_photo(), "TIFF")[:8],
    "tiff-cut-50%": lambda: _cut("TIFF", 0.50),
    "tiff-deflate-cut-50%": lambda: _cut("TIFF", 0.50, compression="tiff_adobe_deflate"),
    "tiff-lzw-cut-90%": lambda: _cut("TIFF", 0.90, compression="tiff_lzw"),
    "html-as-image": lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    "text-starting-with-BM": lambda: b"BMW service report 2024\n" * 4,
    "random-bytes": lambda: np.random.default_rng(3).integers(0, 256, 4096, np.uint8).tobytes(),
}
if WEBP:
    TRUNCATIONS["webp-cut-50%"] = lambda: _cut("WEBP", 0.50)
    TRUNCATIONS["webp-riff-header-only"] = lambda: _encode(_photo(), "WEBP")[:12]


@pytest.mark.parametrize("kind", list(TRUNCATIONS))
def test_every_empty_or_truncated_input_is_a_decode_error(kind):
    data = TRUNCATIONS[kind]()
    err = _assert_rejected(data, status=400)
    assert err.code in {"empty_file", "not_an_image", "truncated_image", "corrupt_image"}
    with pytest.raises(ImageDecodeError):
        load_for_model(data, SIZE, MAX_PIXELS)


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("zero-bytes", "empty_file"),
        ("jpeg-cut-50%", "truncated_image"),
        ("png-cut-mid-idat", "truncated_image"),
        ("png-header-only", "truncated_image"),
        ("gif-cut-50%", "truncated_image"),
        ("tiff-deflate-cut-50%", "truncated_image"),
        ("jpeg-soi-only", "truncated_image"),
        ("html-as-image", "not_an_image"),
        ("text-starting-with-BM", "corrupt_image"),  # Pillow's BMP reader claims it
    ],
)
def test_truncation_codes_name_the_problem(kind, code):
    assert _assert_rejected(TRUNCATIONS[kind]()).code == code


def test_truncated_tail_of_later_gif_frames_keeps_first_frame():
    """Only the first frame is used, so a GIF cut inside frame 3 still has a whole frame 1."""
    frames = _gif_frames(4)
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    cut = data[: len(data) * 3 // 4]
    info = probe_image(cut, MAX_PIXELS)  # counting frames must not blow up
    assert info.frames >= 1
    red, green, blue = _rgb(cut).reshape(-1, 3).mean(axis=0)
    assert red > 180 and green < 80 and blue < 80


# --------------------------------------------------------------------------- bombs built here


def _patched_gif(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _patched_jpeg(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    ("build", "dims"),
    [
        (lambda: _patched_gif(65000, 65000), "65000x65000"),
        (lambda: _patched_jpeg(60000, 60000), "60000x60000"),
        (lambda: _patched_jpeg(9000, 9000), "9000x9000"),  # over our cap, under Pillow's
    ],
    ids=["gif-bomb", "jpeg-bomb", "jpeg-over-cap"],
)
def test_bomb_headers_in_other_formats_name_the_size(build, dims):
    err = _assert_rejected(build(), "image_too_large", 413)
    assert dims in err.message


# --------------------------------------------------------------------------- multi-frame


def test_multiframe_tiff_uses_first_frame():
    frames = [f.convert("RGB") for f in _gif_frames(3)]
    data = _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert probe_image(data, MAX_PIXELS).frames == 3
    red, green, blue = _rgb(data).reshape(-1, 3).mean(axis=0)
    assert red > 180 and green < 80 and blue < 80


@pytest.mark.skipif(not WEBP, reason="Pillow built without WebP")
def test_animated_webp_uses_first_frame():
    frames = [f.convert("RGB") for f in _gif_frames(3)]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert probe_image(data, MAX_PIXELS).frames == 3
    red, green, blue = _rgb(data).reshape(-1, 3).mean(axis=0)
    assert red > 180 and green < 80 and blue < 80


def test_animated_gif_built_here_uses_first_frame_and_probe_counts_frames():
    frames = _gif_frames(4)
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert probe_image(data, MAX_PIXELS).frames == 4
    assert _rgb(data).reshape(-1, 3).mean(axis=0)[0] > 180


# --------------------------------------------------------------------------- transparency

WHITE = np.array(BACKGROUND_RGB, dtype=np.int16)


def _la() -> Image.Image:
    gray = np.full((32, 32), 10, dtype=np.uint8)
    alpha = np.full((32, 32), 255, dtype=np.uint8)
    alpha[:, 16:] = 0  # right half transparent over black
    return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])


def _palette_with_transparent_green() -> Image.Image:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([220, 30, 30, 0, 255, 0] + [0, 0, 0] * 254)
    image.paste(1, (16, 0, 32, 32))  # right half: index 1 (green), made transparent below
    return image


def _check_right_half_white_left_half_kept(pixels: np.ndarray, left_colour) -> None:
    assert np.abs(pixels[:, 18:] - WHITE).max() <= 2, pixels[:, 18:].reshape(-1, 3).mean(axis=0)
    left = pixels[:, :14].reshape(-1, 3).mean(axis=0)
    assert np.abs(left - np.array(left_colour)).max() < 4, left


def _l_with_trns() -> Image.Image:
    gray = np.full((32, 32), 10, dtype=np.uint8)
    gray[:, 16:] = 0  # value 0 is declared transparent
    return Image.fromarray(gray)


TRANSPARENT: dict[str, tuple[Callable[[], bytes], tuple[int, int, int]]] = {
    "LA-png": (lambda: _encode(_la(), "PNG"), (10, 10, 10)),
    "LA-tiff": (lambda: _encode(_la(), "TIFF"), (10, 10, 10)),
    "P-trns-index-png": (
        lambda: _encode(_palette_with_transparent_green(), "PNG", transparency=1),
        (220, 30, 30),
    ),
    "P-trns-bytes-png": (
        lambda: _encode(
            _palette_with_transparent_green(), "PNG", transparency=b"\xff\x00" + b"\xff" * 254
        ),
        (220, 30, 30),
    ),
    "P-trns-gif": (
        lambda: _encode(_palette_with_transparent_green(), "GIF", transparency=1),
        (220, 30, 30),
    ),
    "RGB-trns-png": (
        lambda: _encode(
            _palette_with_transparent_green().convert("RGB"), "PNG", transparency=(0, 255, 0)
        ),
        (220, 30, 30),
    ),
    "L-trns-png": (lambda: _encode(_l_with_trns(), "PNG", transparency=0), (10, 10, 10)),
}


if WEBP:
    TRANSPARENT["LA-webp-lossless"] = (
        lambda: _encode(_la(), "WEBP", lossless=True, exact=True),
        (10, 10, 10),
    )


@pytest.mark.parametrize("kind", list(TRANSPARENT))
def test_transparency_is_composited_onto_white(kind):
    build, left_colour = TRANSPARENT[kind]
    _check_right_half_white_left_half_kept(_rgb(build()), left_colour)


def test_pa_image_is_composited_onto_white():
    rgba = Image.fromarray(
        np.dstack(
            [
                np.full((32, 32), 220, np.uint8),
                np.full((32, 32), 30, np.uint8),
                np.full((32, 32), 30, np.uint8),
                np.where(np.arange(32) < 16, 255, 0).astype(np.uint8)[None, :].repeat(32, 0),
            ]
        )
    )
    pa = rgba.convert("PA")
    assert pa.mode == "PA"
    pixels = np.asarray(to_rgb(pa)).astype(np.int16)
    _check_right_half_white_left_half_kept(pixels, (220, 30, 30))


def test_unconvertible_mode_is_a_decode_error_not_a_crash(monkeypatch):
    import shared.images as images

    def refuse(image):
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr(images, "to_rgb", refuse)
    err = _assert_rejected(_fixture("control_rgb.png"), "unsupported_mode", 415)
    assert "RGB" in err.message


# --------------------------------------------------------------------------- threads


def test_concurrent_decodes_leave_warning_filters_intact():
    """decode_dataset decodes in threads; catch_warnings is process-global and must not leak."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    noisy = TRUNCATIONS["tiff-deflate-cut-50%"]()  # Pillow warns "Corrupt EXIF data" on it
    good = _encode(_photo(), "PNG")
    before = list(warnings.filters)

    def one(index: int) -> str:
        try:
            decode_image(noisy if index % 2 else good, MAX_PIXELS)
        except ImageDecodeError as exc:
            return exc.code
        return "ok"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(200)))
    assert set(results) == {"ok", "truncated_image"}
    assert warnings.filters == before
