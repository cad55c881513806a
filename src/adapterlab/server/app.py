"""The FastAPI application over a backend (`api_app`): the routes, JSON error answers and the `Gate`
middleware; `create_app` and `serve` for the local backend."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from adapterlab.server import openai, routes
from adapterlab.server.backend import Backend
from adapterlab.server.drain import Traffic, serve_draining
from adapterlab.server.errors import ApiError
from adapterlab.server.local import LocalBackend
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings

log = logging.getLogger("adapterlab.server")
KEPT_HEADERS = ("retry-after", "connection")


# --- errors, metrics and body limits -------------------------------------------------------------
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _answer(scope: dict, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer, in OpenAI's shape on the OpenAI routes (where only `KEPT_HEADERS` are sent)."""
    if _route_path(scope) in openai.PATHS:
        return JSONResponse(openai.error_body(status, message), status_code=status,
                            headers={k: v for k, v in (headers or {}).items() if k.lower() in KEPT_HEADERS})
    return _error(status, message, headers)


def _invalid(errors: list[dict]) -> tuple[int, str]:
    if errors and errors[0]["type"] == "json_invalid":
        return 422, f"the body is not valid JSON ({errors[0]['ctx']['error']})"
    where = lambda error: ".".join(str(part) for part in error["loc"])  # noqa: E731
    return 422, "; ".join(f"{where(error)}: {error['msg']}" for error in errors[:5])


async def _error_answer(request: HttpRequest, error: Exception) -> JSONResponse:
    """Every expected error as {"error": message}, on the OpenAI routes in OpenAI's shape (`Gate`
    answers the unexpected ones)."""
    if isinstance(error, ApiError):
        return _answer(request.scope, error.status, str(error), error.headers)
    if isinstance(error, HTTPException):
        return _answer(request.scope, error.status_code, _unparsed(error) or str(error.detail))
    return _answer(request.scope, *_invalid(error.errors()))


def _unparsed(error: HTTPException) -> str | None:
    """What FastAPI's "There was an error parsing the body" was (it hides the JSON reader's error)."""
    if isinstance(error.__cause__, RecursionError):
        return "the body is not valid JSON: nested too deeply"
    if isinstance(error.__cause__, ValueError):  # bytes that are not UTF-8, among others
        return f"the body is not valid JSON ({' '.join(str(error.__cause__).split())[:200]})"
    return None


def _route_path(scope: dict) -> str:
    """The request's path below the application's own prefix (a Ray Serve `route_prefix`)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


class Gate:
    """Pure ASGI middleware: times and counts every request by route and status, and counts the requests
    in flight (`Traffic`); refuses new ones while the server drains (503); stops reading a body past its
    limit (413: no request can exhaust memory) or its deadline (408: nor hold a connection by trickling
    it); and answers an unexpected error with a generic 500, its traceback logged here only (answered,
    not raised: the connection stays up)."""

    def __init__(self, app, settings: Settings, metrics: Metrics, traffic: Traffic):
        self.app, self.settings, self.metrics, self.traffic = app, settings, metrics, traffic

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None
        upload = scope["method"] == "POST" and _route_path(scope) == "/v1/adapters"
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        refusal = self._refusal(scope, limit)
        try:
            if refusal is not None:
                return await refusal(scope, receive, noting_send)
            self.traffic.in_flight += 1
            try:
                await self._call(scope, _BodyReader(receive, limit, self.settings.body_seconds), noting_send,
                                 lambda: status)
            finally:
                self.traffic.in_flight -= 1
        finally:
            route = scope.get("route")
            self.metrics.record(route.path if route else "unmatched", status or 500, time.perf_counter() - started)

    def _refusal(self, scope: dict, limit: int) -> JSONResponse | None:
        """An answer before the application sees the request: while draining, or for a body that
        declares itself too long (413 without reading it)."""
        if self.traffic.draining:
            return _answer(scope, 503, "the server is shutting down; retry shortly (another replica, or this "
                                       "one once restarted)", {"Retry-After": "1", "Connection": "close"})
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return _answer(scope, 413, f"request body over {limit:,} bytes", {"Connection": "close"})
        return None

    async def _call(self, scope, receive, send, status: Callable[[], int | None]) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.traffic.draining:
                raise
            # Cancelled by uvicorn at the drain's deadline: a 503 if no answer had started; else the connection
            # closes mid-answer (a stream without its [DONE]), which uvicorn notes in one line.
            log.warning("%s %s cancelled: the drain's deadline passed", scope["method"], scope["path"])
            if status() is None:
                await self._refusal(scope, 0)(scope, receive, send)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status() is not None:  # the answer had started: nothing more can be sent
                raise
            await _answer(scope, 500, "internal server error (logged on the server)")(scope, receive, send)


class _BodyReader:
    """The `receive` of one request, raising 413 once its body passes `limit` bytes and 408 once it has
    taken longer than `seconds` to arrive; the messages after the body (a disconnect) pass untimed."""

    def __init__(self, receive, limit: int, seconds: float):
        self.receive, self.limit, self.received, self.done = receive, limit, 0, False
        self.seconds, self.deadline = seconds, time.monotonic() + seconds

    async def __call__(self) -> dict:
        if self.done:
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s") from None
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            raise HTTPException(413, f"request body over {self.limit:,} bytes")
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message


# --- the OpenAPI schema's error answers ----------------------------------------------------------
ERROR_STATUSES = {
    400: "A malformed request: an adapter name that is not TASK/NAME, a damaged upload.",
    401: "No bearer token (where the server's tokens guard the route).",
    403: "A bearer token not valid here (or the admin endpoints are off).",
    404: "No such adapter in the store.", 408: "The body took longer than the server allows to arrive.",
    409: "An adapter of another backbone.", 413: "Past a limit: body bytes, inputs, characters, tokens, files.",
    415: "Pickled weights: safetensors only.", 422: "A body that does not fit the request's schema.",
    500: "A bug (logged on the server).", 503: "Busy (a full queue), or shutting down: retry after Retry-After."}
INPUT_ERRORS = {400, 404, 408, 409, 413, 415, 422}  # routes that read a body or a name from the path
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
}


def _with_error_answers(app: FastAPI) -> Callable[[], dict]:
    """`app.openapi`, with each operation's error answers in the shape they have (FastAPI documents only a
    422 of its own shape), and the event streams of the OpenAI routes. Read from the schema alone: which
    routes a token guards is the deployment's choice, so 401 and 403 are documented everywhere."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components.update(SCHEMAS)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                _document_errors(path, operation)
        return schema

    return openapi


def _document_errors(path: str, operation: dict) -> None:
    reads_input = "requestBody" in operation or any(p["in"] == "path" for p in operation.get("parameters", ()))
    statuses = {401, 403, 500, 503} | (INPUT_ERRORS if reads_input else set())
    shape = "OpenAIError" if path in openai.PATHS else "Error"
    responses = operation["responses"]
    for status in sorted(statuses):
        responses[str(status)] = {"description": ERROR_STATUSES[status], "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}}
    if path in openai.PATHS and "requestBody" in operation:
        responses["200"]["content"]["text/event-stream"] = {
            "schema": {"type": "string", "description": "With stream: server-sent events, the last `data: [DONE]`."}}


def api_app(backend: Backend, lifespan: Callable | None = None, **described) -> FastAPI:
    """The application over any backend: every route (the API's own and the OpenAI-compatible ones), every
    error as JSON, and the `Gate` around every request. `described`: FastAPI's title and summary."""
    app = FastAPI(lifespan=lifespan, **described)
    app.state.backend = backend
    app.include_router(routes.router)
    app.include_router(openai.router, dependencies=routes.CLIENT)
    for error_type in (ApiError, HTTPException, RequestValidationError, ValidationError):
        app.add_exception_handler(error_type, _error_answer)
    app.state.traffic = Traffic()
    app.add_middleware(Gate, settings=backend.settings, metrics=backend.metrics, traffic=app.state.traffic)
    app.openapi = _with_error_answers(app)
    return app


def create_app(store: str | Path, backbone: str | None = None, settings: Settings | None = None) -> FastAPI:
    """The application of `adapterlab serve`; the backbone loads now, the worker and batcher start with the app."""
    backend = LocalBackend.open(store, backbone, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.server.start()
        yield
        await backend.server.stop()  # after the drain (drain.py): the queue's last requests are answered

    return api_app(backend, lifespan, title="adapterlab", summary="Many adapters on one frozen backbone, over HTTP.")


def serve(store: str | Path, backbone: str | None, host: str, port: int, settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain (`drain.DrainingServer`) and return."""
    app = create_app(store, backbone, settings)
    serve_draining(app, app.state.traffic, settings.drain_seconds, host=host, port=port, log_level="info")
