"""The browser dashboard: ``GET /`` and its same-origin assets under ``/dashboard/``.

The page is static (plain HTML, CSS and one script shipped as package data under
``api/static``) and holds no data: everything it shows comes from the ``/v1`` API called with the
key the user pastes, so serving it needs no key and grants nothing. Assets are a fixed list, so no
path from the request ever reaches the filesystem.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import ApiError
from api.security import browser_security_headers

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(
        STATIC_DIR / name, media_type=media_type, headers=browser_security_headers()
    )


@router.get("/")
def dashboard_page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/dashboard/{asset}")
def dashboard_asset(asset: str) -> FileResponse:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise ApiError(404, "not_found", "no such dashboard asset")
    return _file(asset, media_type)
