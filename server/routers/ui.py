"""``GET /``: the web page. Plain HTML, CSS and JavaScript from ``server/static`` (no build step,
nothing loaded from elsewhere); the page calls the API with the key the user types in."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import NotFound

STATIC_DIR = Path(__file__).parents[1] / "static"

# The page's files and their media types: only these are served, so no path can escape the folder.
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}

# The page loads nothing from other origins (its icon is an empty data: URL). Images are drawn
# on canvases: the query from the file the user chose, gallery images fetched with the API key.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

# The page is not part of the API: it stays out of the OpenAPI document.
router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The search page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """A script or style sheet of the page."""
    if name not in ASSETS:
        raise NotFound(f"no page asset {name!r}")
    return FileResponse(
        STATIC_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"}
    )
