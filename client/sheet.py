"""Contact sheets: the query image and its hits in a grid, each labelled with rank and score."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

BACKGROUND = (255, 255, 255)
INK = (29, 35, 48)
MUTED = (106, 114, 130)
ACCENT = (47, 111, 237)
PLACEHOLDER = (233, 236, 241)


@dataclass(frozen=True)
class Tile:
    """One cell of the sheet: image bytes (None when unavailable) and two caption lines."""

    data: bytes | None
    title: str
    subtitle: str


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    """Shorten ``text`` with a leading ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def _thumbnail(data: bytes | None, cell: int) -> Image.Image:
    """A square ``cell`` x ``cell`` crop of the image, or a grey placeholder."""
    if data:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (cell, cell))
                rgb = ImageOps.exif_transpose(image).convert("RGB")
                return ImageOps.fit(rgb, (cell, cell), Image.Resampling.LANCZOS)
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    return Image.new("RGB", (cell, cell), PLACEHOLDER)


def contact_sheet(query: Tile, hits: list[Tile], columns: int = 5, cell: int = 192) -> Image.Image:
    """Lay out the query (first, outlined) and its hits in rows of ``columns`` cells.

    Args:
        query: the query image and its caption.
        hits: the hits in rank order.
        columns: cells per row.
        cell: side of each image in pixels.

    Returns:
        An RGB image.
    """
    pad, caption = 12, 40
    tiles = [query, *hits]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    header = 36
    width = pad + columns * (cell + pad)
    height = header + pad + rows * (cell + caption + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), f"imgsim: query and top {len(hits)} hits", font=_font(18), fill=INK)
    title_font, sub_font = _font(13), _font(11)
    for i, tile in enumerate(tiles):
        x = pad + (i % columns) * (cell + pad)
        y = header + pad + (i // columns) * (cell + caption + pad)
        sheet.paste(_thumbnail(tile.data, cell), (x, y))
        if i == 0:
            draw.rectangle((x - 3, y - 3, x + cell + 2, y + cell + 2), outline=ACCENT, width=3)
        draw.text((x, y + cell + 5), _fit(tile.title, title_font, cell, draw), font=title_font,
                  fill=ACCENT if i == 0 else INK)
        draw.text((x, y + cell + 22), _fit(tile.subtitle, sub_font, cell, draw), font=sub_font,
                  fill=MUTED)
    return sheet


def save_sheet(image: Image.Image, path: Path) -> None:
    """Write the sheet; the format follows the file's suffix (PNG when unknown)."""
    suffix = path.suffix.lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(suffix, "PNG")
    image.save(path, format=fmt)
