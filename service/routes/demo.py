"""GET /: a demo page (static HTML, JS and CSS) that calls the API from the browser.

The page works offline: no CDN, no build step. It is open without an API key, like /docs; its
calls to the model endpoints send the key the user types in.
"""

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Everything from this origin; images also from blob: (the user's upload) and data: (decoded PNGs).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)

router = APIRouter(tags=["demo"], include_in_schema=False)
static = StaticFiles(directory=STATIC_DIR)


@router.get("/")
async def index() -> FileResponse:
    """The demo page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


# A route rather than `app.mount`, so main.py only includes routers; StaticFiles refuses paths
# outside STATIC_DIR and answers 404 for missing files.
@router.get("/static/{path:path}")
async def static_file(path: str, request: Request) -> Response:
    """A file of the demo page."""
    return await static.get_response(path, request.scope)
