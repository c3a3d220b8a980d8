"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to send to the client as OpenAI does."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_dict(cls, data: dict) -> "APIError":
        return cls(data.get("status", 500), data.get("message", "error"), data.get("param"), data.get("code"))


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic/FastAPI validation problem, phrased for an API client."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Drop pydantic's union-branch names (e.g. "str", "list[int]") from the parameter path.
    loc = [part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None, "invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        if param is None:
            return APIError(400, "request body is missing: send a JSON object", None, "missing_body")
        return APIError(400, f"missing required parameter: {param}", param, "missing_required_parameter")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    problems = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    if param:
        return APIError(400, f"invalid value for {param}: {message}{problems}", param, "invalid_value")
    return APIError(400, f"invalid request body: {message}{problems}", None, "invalid_value")


def install(app: FastAPI) -> None:
    """Replace FastAPI's 422/HTTP error shapes with OpenAI's."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error while handling {request.method} {request.url.path}: {type(exc).__name__}"
        return APIError(500, message, None, "internal_error").response()
