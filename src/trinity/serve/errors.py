"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, or on Anthropic's routes
(/v1/messages) in Anthropic's, {"type": "error", "error": {"type", "message"}}; never a traceback.

The shape is chosen by the request's path where the response is made, so one APIError serves both APIs and
errors raised before a route runs (validation, auth, unknown paths, the body limit) have the caller's shape too."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("trinity.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

# Anthropic's error types by status (docs.anthropic.com/en/api/errors); any other status is an api_error
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}


def anthropic_path(path: str | None) -> bool:
    """Whether a request path belongs to the Anthropic-shaped API."""
    return path is not None and (path == "/v1/messages" or path.startswith("/v1/messages/"))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}

    def response(self, path: str | None = None) -> JSONResponse:
        """`path`: the request's, which picks the shape (OpenAI's when not given)."""
        body = self.anthropic_body() if anthropic_path(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------- /openapi.json
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR_SCHEMAS = {
    "Error": {"type": "object", "title": "Error", "required": ["error"], "description": "OpenAI's error shape",
              "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                       "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                      "param": _NULLABLE_STRING, "code": _NULLABLE_STRING}}}},
    "AnthropicError": {"type": "object", "title": "AnthropicError", "required": ["type", "error"],
                       "description": "Anthropic's error shape (the /v1/messages routes)",
                       "properties": {"type": {"type": "string", "enum": ["error"]},
                                      "error": {"type": "object", "required": ["type", "message"],
                                                "properties": {"type": {"type": "string"},
                                                               "message": {"type": "string"}}}}},
}
_STATUS_TEXT = {400: "Invalid request (a bad field, invalid JSON, a schema the server refuses)",
                401: "Missing or invalid API key (when the server has one)",
                404: "Unknown model or stored response", 413: "The request body is over --max-request-bytes",
                500: "Internal error", 503: "Loading, shutting down, the queue is full, or busy compiling a grammar"}


def _error_statuses(path: str, method: str, has_body: bool) -> tuple[int, ...]:
    """The error statuses an operation answers (besides 500, which any can)."""
    if path == "/health":
        return (503,)
    if path == "/metrics":
        return ()
    if not has_body:  # GET /v1/models, GET / DELETE /v1/responses/{id}
        return (401, 404) if "{" in path else (401,)
    return (400, 401, 404, 413, 503)


def document_errors(schema: dict) -> dict:
    """Make /openapi.json say what the server answers: FastAPI documents a 422 (HTTPValidationError) that never
    comes (validation errors are 400s in OpenAI's shape), and none of the errors that do."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(ERROR_SCHEMAS)
    for path, operations in schema.get("paths", {}).items():
        ref = {"$ref": "#/components/schemas/" + ("AnthropicError" if anthropic_path(path) else "Error")}
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in (*_error_statuses(path, method, "requestBody" in operation), 500):
                responses[str(status)] = {"description": _STATUS_TEXT[status],
                                          "content": {"application/json": {"schema": ref}}}
    return schema


def structured_output_error(e) -> APIError:
    """A `structured.StructuredOutputError` as the API's error: its status (400, or 503 when the grammar compile
    workers were busy, with Retry-After), param and code."""
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return APIError(e.status, e.message, param=e.param, code=e.code, headers=headers)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    # pydantic names union branches in the location ("str", "list[TextPart]", ...): drop them
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool",
                                                                                  "function-after", "dict")]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if kind in ("model_attributes_type", "dict_type") and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if kind == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request needs a JSON body", code="invalid_body")
    param = _param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if kind.startswith("finite_number"):
        message = "must be a finite number (NaN and infinity are not allowed)"
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# A JSON escape that can only stand for a UTF-16 surrogate; a valid pair is merged by the JSON parser, so only a lone
# one survives into a str, where encoding it to UTF-8 fails deep in the tokenizer. A cheap byte scan decides whether
# the body needs parsing for it at all (most bodies never escape a surrogate).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _find_surrogate(value, path: list[str]) -> str | None:
    """The dotted path of the first string (key or value) in parsed JSON that holds a lone surrogate."""
    if isinstance(value, str):
        return ".".join(path) if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                return ".".join([*path, key])
            found = _find_surrogate(item, [*path, key])
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_surrogate(item, [*path, str(i)])
            if found is not None:
                return found
    return None


def lone_surrogate_error(body: bytes) -> APIError | None:
    """400 naming the field when a JSON body holds a lone UTF-16 surrogate (e.g. "a\\ud800b"): such a string is not
    Unicode text, cannot be tokenized, and is refused once here for every route and field rather than per field.
    Bodies that are not valid JSON are left to the route's own validation."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    field = _find_surrogate(parsed, [])
    if field is None:
        return None
    return APIError(400, f"{field or 'body'}: the string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                         "escape), which is not valid Unicode text", param=field or None, code="invalid_value")


class _CatchAll:
    """Answers an unexpected exception with a 500 in the caller's shape and keeps the connection open.

    Starlette's own handler for `Exception` sends the response and then re-raises, so uvicorn closes the
    connection and a keep-alive client's next request on it fails (ECONNRESET). Here the exception is logged and
    handled; it propagates only when the response had already started (a stream), where nothing can be sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - answered below; the log has the trace
            if started:
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            response = APIError(500, f"internal error ({type(exc).__name__})").response(scope.get("path"))
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    # the innermost of the user middlewares (added first), so CORS and the body limit wrap its 500s too
    app.add_middleware(_CatchAll)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response(
            request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__})").response(request.url.path)
