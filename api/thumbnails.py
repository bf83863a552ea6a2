"""Bounded-size JPEG previews of indexed images, made on the fly and kept in a small cache."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

from flask import Response, request

from api.errors import ApiError
from shared.images import ImageDecodeError, decode_image, read_file_bytes
from shared.schema import decimal_int

MIN_SIZE = 16
MAX_SIZE = 1024
JPEG_QUALITY = 85
# Per gunicorn process: a 256 px JPEG is ~10-20 kB, so this holds a few hundred thumbnails.
CACHE_BYTES = 16 * 1024 * 1024


class ThumbnailCache:
    """LRU of encoded thumbnails bounded by total bytes, shared by a process's threads."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self._max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)


CACHE = ThumbnailCache(CACHE_BYTES)


def parse_size(raw: str) -> int:
    """Validate ``?size=``: an integer side in pixels between MIN_SIZE and MAX_SIZE."""
    size = decimal_int(raw)
    if size is None or not MIN_SIZE <= size <= MAX_SIZE:
        raise ApiError(400, "invalid_parameter",
                       f"size must be an integer between {MIN_SIZE} and {MAX_SIZE}", field="size")
    return size


def thumbnail_response(path: Path, size: int, max_bytes: int, max_pixels: int) -> Response:
    """A JPEG of the image at ``path`` fitting in ``size`` x ``size``, never enlarged.

    The ETag is derived from the file's identity (path, size, mtime) and the requested size,
    so a changed file gets a new tag; browsers revalidate with If-None-Match and get 304.

    Args:
        path: the indexed file (already checked to lie inside the data root).
        size: the longest side wanted.
        max_bytes: file size cap.
        max_pixels: pixel cap.

    Returns:
        200 with the JPEG, or 304 when the client's copy is current.
    """
    stat = path.stat()
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}"
    etag = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    headers = {"ETag": f'"{etag}"', "Cache-Control": "public, max-age=86400",
               "Vary": "Authorization"}
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    data = CACHE.get(etag)
    if data is None:
        try:
            image = decode_image(read_file_bytes(path, max_bytes), max_pixels, draft_size=size)
        except ImageDecodeError:
            raise ApiError(404, "image_missing",
                           "the indexed file is no longer a readable image") from None
        image.thumbnail((size, size))  # keeps the aspect ratio and never enlarges
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        data = out.getvalue()
        CACHE.put(etag, data)
    return Response(data, mimetype="image/jpeg", headers=headers)
