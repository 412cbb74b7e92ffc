"""API errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error a user can act on; routes and services raise it, the handler renders the envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def not_found(what: str, object_id: str, *, param: str | None = None) -> ApiError:
    """The 404 for an object that does not exist or belongs to another project (never 403)."""
    return ApiError(
        404, f"No such {what}: '{object_id}'.", param=param, code=f"{what.replace(' ', '_')}_not_found"
    )


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param_from_location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, including FastAPI's own, in the OpenAI envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = envelope(exc.message, exc.type, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_from_location(tuple(first.get("loc", ())))
        details = "; ".join(
            f"{_param_from_location(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        )
        return JSONResponse(
            envelope(f"Invalid request: {details}", "invalid_request_error", param, "invalid_value"), 422
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: the client still gets the envelope; the traceback goes to the log.
        message = f"Internal error ({exc.__class__.__name__}); the server log has the details."
        return JSONResponse(envelope(message, "server_error", None, "internal_error"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}.get(exc.status_code)
        return JSONResponse(
            envelope(str(exc.detail), "invalid_request_error", None, code),
            exc.status_code,
            headers=exc.headers,
        )
