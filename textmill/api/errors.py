"""OpenAI-shaped errors: every failure leaves as {"error": {message, type, param, code}}.

FastAPI's own 422 and Starlette's HTML/text errors are replaced here, so a client never
sees a status or a body that the OpenAI SDKs cannot parse, and never a traceback.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from textmill.api.protocol import ErrorResponse

log = logging.getLogger("textmill.api")

# The error statuses a route may answer with, for its OpenAPI `responses`.
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # A message may quote client input; lone surrogates in it could not be sent as UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param)


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    return APIError(500, message, type="server_error", code="server_error")


def validation_error_to_api(exc: RequestValidationError) -> APIError:
    """Name the offending top-level field as `param`, as OpenAI does."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request body.", None)
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: it is not valid JSON "
            f"({first.get('ctx', {}).get('error', 'syntax error')}).", None)
    if not loc:
        if first.get("type") == "missing":
            return bad_request("The request body is missing: send a JSON object.", None)
        return bad_request(f"The request body must be a JSON object: {first.get('msg')}.", None)
    param = str(loc[0])
    if first.get("type") == "missing":
        return bad_request(f"You must provide the '{param}' parameter.", param)
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in loc[1:]
                    if not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
    got = first.get("input")
    got_text = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return bad_request(f"Invalid value for '{param}{where}': {first.get('msg')} (got {got_text}).", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_api(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404:
            message = "Unknown path: this server offers /v1/completions, /v1/models and /health."
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request")
        return server_error().response()
