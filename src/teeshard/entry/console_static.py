"""The console's built assets, served by the entry node under a strict Content-Security-Policy.

The assets are built from ``web/`` (TypeScript, Preact, esbuild) and committed in
``teeshard/entry/static/``, so installing the package needs no Node.
``console.build.json`` beside them records the SHA-256 of the sources they were
built from (:func:`sources_digest`, computed the same way by ``web/build.mjs``);
a test fails when the committed build is stale.

Nothing is loaded from anywhere but this node: the policy allows scripts, styles
and fetches from ``'self'`` only, no inline script or style, no frames, no
forms posted elsewhere.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from teeshard.entry.errors import APIError

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# name -> media type: the only files served (no path ever reaches the file system)
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.build.json": "application/json",
}
BUILD_INFO = "console.build.json"
# what the build digest covers, relative to web/
SOURCE_FILES = ("package.json", "package-lock.json", "build.mjs", "tsconfig.json")
SOURCE_DIRS = ("src",)


def _read(name: str) -> bytes:
    return resources.files("teeshard.entry").joinpath("static", name).read_bytes()


def build_static_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def console_page() -> Response:
        return Response(
            _read("index.html"),
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    @router.get("/console/{name}")
    async def console_asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise APIError(404, f"no console asset {name!r}", code="not_found")
        return Response(
            _read(name),
            media_type=media_type,
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    return router


def sources_digest(web_dir: Path) -> str:
    """SHA-256 over the console's sources: each file's path and SHA-256, in path order."""
    files = [web_dir / name for name in SOURCE_FILES if (web_dir / name).is_file()]
    for folder in SOURCE_DIRS:
        files += [p for p in (web_dir / folder).rglob("*") if p.is_file()]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(web_dir).as_posix()):
        rel = path.relative_to(web_dir).as_posix()
        digest.update(f"{rel}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()
