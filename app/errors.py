"""API errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import get_settings


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and how to fix it.")
    type: str = Field(
        description="`invalid_request_error` for the caller's mistakes, `server_error` for ours."
    )
    param: str | None = Field(None, description="The request field the error is about, if any.")
    code: str | None = Field(None, description="A stable machine-readable code, such as `file_not_found`.")


class ErrorResponse(BaseModel):
    """The body of every error response (OpenAI's envelope)."""

    error: ErrorDetail


# Documented on every operation; "4XX" also replaces FastAPI's own 422 schema, which the envelope overrides.
ERROR_RESPONSES: dict[int | str, dict] = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused; `error` says why."},
}


class BodyTooLarge(StarletteHTTPException):
    """A request body over its size limit (FastAPI's body parser re-raises these while it streams in)."""

    def __init__(self, message: str, *, param: str | None, code: str) -> None:
        super().__init__(413, message)
        self.param, self.code = param, code

    @classmethod
    def upload(cls) -> "BodyTooLarge":
        limit_mb = get_settings().max_upload_mb
        message = f"Upload is larger than the {limit_mb} MB upload limit (TUNEFORGE_MAX_UPLOAD_MB)."
        return cls(message, param="file", code="file_too_large")

    @classmethod
    def json(cls) -> "BodyTooLarge":
        limit_kb = get_settings().max_json_body_kb
        message = (
            f"Request body is larger than the {limit_kb} KB limit for JSON bodies "
            "(TUNEFORGE_MAX_JSON_BODY_KB); training data goes in an uploaded file."
        )
        return cls(message, param=None, code="request_too_large")

    def response(self) -> JSONResponse:
        return JSONResponse(envelope(str(self.detail), "invalid_request_error", self.param, self.code), 413)


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
        if first.get("type") == "json_invalid":  # its location is a character position, not a field
            where = first["loc"][-1]
            message = f"The request body is not valid JSON: {first.get('msg')} at position {where}."
            return JSONResponse(envelope(message, "invalid_request_error", None, "invalid_json"), 400)
        param = _param_from_location(tuple(first.get("loc", ())))
        details = "; ".join(
            f"{_param_from_location(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        )
        return JSONResponse(
            envelope(f"Invalid request: {details}", "invalid_request_error", param, "invalid_value"), 400
        )

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        if "NUL" not in str(exc.orig):
            raise exc  # a bug, not a bad value: the catch-all below answers 500 and logs it
        message = "Text fields may not contain NUL (\\u0000) characters; remove them and retry."
        return JSONResponse(envelope(message, "invalid_request_error", None, "invalid_value"), 400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: the client still gets the envelope; the traceback goes to the log.
        message = f"Internal error ({exc.__class__.__name__}); the server log has the details."
        return JSONResponse(envelope(message, "server_error", None, "internal_error"), 500)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}.get(exc.status_code)
        return JSONResponse(
            envelope(str(exc.detail), "invalid_request_error", None, code),
            exc.status_code,
            headers=exc.headers,
        )
