"""``GET /images/<image_id>``: serve an indexed image so clients can show results."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Blueprint, request, send_file

from api.errors import ApiError
from api.services import services
from api.thumbnails import parse_size, thumbnail_response
from shared.datasets import SHOWN_CHARS, display_name
from shared.images import ImageDecodeError, probe_image

bp = Blueprint("images", __name__, url_prefix="/images")

IMAGE_ID = re.compile(r"^[0-9a-f]{24}$")
MIMETYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
             "GIF": "image/gif", "TIFF": "image/tiff", "BMP": "image/bmp",
             "HEIF": "image/heif", "AVIF": "image/avif"}


@bp.get("/<image_id>")
def get_image(image_id: str):
    """The original file of an indexed image, with its content type.

    ``?size=N`` answers a JPEG no larger than N x N instead (16..1024, never enlarged).
    """
    svc = services()
    size = parse_size(request.args["size"]) if "size" in request.args else None
    location = svc.registry.image_location(image_id) if IMAGE_ID.match(image_id) else None
    if location is None:
        raise ApiError(404, "image_not_found", "no indexed image with id "
                       f"{display_name(image_id, SHOWN_CHARS, quote=True)}")
    root, relpath = location
    path = (Path(root) / relpath).resolve()
    # Indexed files live in the data root, or (uploads added by POST /jobs/index) in the
    # artifacts folder's uploads/.
    allowed = (svc.settings.data_root, svc.settings.artifacts_dir / "uploads")
    if not any(root in path.parents for root in allowed) or not path.is_file():
        raise ApiError(404, "image_missing", "the indexed image is no longer on disk")
    if size is not None:
        return thumbnail_response(path, size, svc.settings.max_upload_bytes,
                                  svc.settings.max_image_pixels)
    with open(path, "rb") as handle:
        head = handle.read()
    try:
        info = probe_image(head, svc.settings.max_image_pixels)
    except ImageDecodeError:
        raise ApiError(404, "image_missing", "the indexed file is no longer a readable image") \
            from None
    response = send_file(path, mimetype=MIMETYPES.get(info.format, "application/octet-stream"),
                         max_age=3600, conditional=True)
    return response
