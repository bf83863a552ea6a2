"""Access to the per-app services object from request handlers."""

from __future__ import annotations

from flask import current_app

from api import Services


def services() -> Services:
    """The Services built by create_app for this app."""
    return current_app.extensions["imgsim"]
