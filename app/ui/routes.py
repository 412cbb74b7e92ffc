"""The console's page, script, style and charting library, served without a key: they hold no data.

Everything the console shows it fetches from the public API with the key the user typed in, which the page
keeps in `sessionStorage` and sends as a Bearer header; no cookie is ever set, so the API stays free of
cross-site request forgery. A strict Content-Security-Policy (scripts from this origin only, no inline
script, requests to this origin only) means that markup injected into these pages can neither run code
nor send a key elsewhere. (The key lives in the tab's session storage, which other pages of this origin
could read: /docs loads Swagger UI from a CDN, without this policy.) plotly.js comes from the installed
`plotly` package: nothing vendored, no CDN, no Node.
"""

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from app.errors import not_found
from app.jobs.schemas import TASK_METHODS, TASKS

router = APIRouter(prefix="/ui", include_in_schema=False)

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        # plotly.js positions and colours its SVG through style attributes and one <style> sheet of its own.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
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
}
# The page and its own files change with each release: the browser checks them every time. plotly.js is
# large (about 5 MB) and changes only when the package is upgraded.
FRESH, DAILY = {"Cache-Control": "no-cache"}, {"Cache-Control": "public, max-age=86400"}
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def installed_file(package: str, *parts: str) -> Path:
    """A data file of an installed package, as a path on disk (packages here are installed unzipped)."""
    resource = files(package).joinpath(*parts)
    if not isinstance(resource, Path) or not resource.is_file():
        raise RuntimeError(f"{package} does not hold {'/'.join(parts)} as a file; reinstall it unzipped")
    return resource


@cache
def _console_files() -> dict[str, Path]:
    folder = installed_file("app.ui", "static", "index.html").parent
    return {path.name: path for path in folder.iterdir() if path.suffix in MEDIA_TYPES}


@router.get("")
@router.get("/")
def console_page() -> FileResponse:
    path = installed_file("app.ui", "static", "index.html")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS | FRESH)


@router.get("/static/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    path = installed_file("plotly", "package_data", "plotly.min.js")
    return FileResponse(path, media_type=MEDIA_TYPES[".js"], headers=SECURITY_HEADERS | DAILY)


@router.get("/static/{name}")
def console_file(name: str) -> FileResponse:
    """One of the page's modules or its style sheet: a name looked up among the folder's files, never joined
    to a path, so no name can reach outside it."""
    path = _console_files().get(name)
    if path is None:
        raise not_found("console file", name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS | FRESH)


@router.get("/options.json")
def form_options() -> JSONResponse:
    """What the new-job form offers: the tasks and, for each, its methods (app/jobs/schemas.py decides)."""
    methods = {task: list(TASK_METHODS[task]) for task in TASKS}
    return JSONResponse({"tasks": list(TASKS), "methods": methods}, headers=SECURITY_HEADERS | FRESH)
