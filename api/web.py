"""``GET /``: the web page (static HTML, CSS and JavaScript served by Flask, no build step)."""

from __future__ import annotations

from flask import Blueprint, current_app, send_from_directory

bp = Blueprint("web", __name__)


@bp.get("/")
def index():
    """The single-page front end; it talks to the same JSON API as every other client."""
    response = send_from_directory(current_app.static_folder, "index.html", max_age=0)
    return response
