"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the fitting HTTP status.

Every failure the gateway reports, including FastAPI's own validation and routing errors and worker
failures relayed from a role, is rendered through `APIError` so clients see one shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client; `reason` labels diffdisagg_request_errors_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.reason = reason or code or _TYPES.get(status, "error")
        self.headers = headers
        self.counted = False  # already counted in diffdisagg_request_errors_total

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def install_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Map every error path of the app to the OpenAI body; `on_error(APIError)` counts it."""

    def _emit(err: APIError) -> JSONResponse:
        if on_error is not None and not err.counted:
            err.counted = True
            on_error(err)
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _emit(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return _emit(
            APIError(
                400,
                f"invalid request: {first.get('msg', 'malformed')}",
                param=".".join(loc) or None,
                code="invalid_request",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _emit(APIError(exc.status_code, str(exc.detail), code=code))
