"""The FastAPI application over a backend (`api_app`): the routes, JSON error answers and the `Gate`
middleware; `create_app` and `serve` for the local backend."""

import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from adapterlab.server import openai, routes
from adapterlab.server.backend import Backend
from adapterlab.server.errors import ApiError
from adapterlab.server.local import LocalBackend
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings

log = logging.getLogger("adapterlab.server")


# --- errors, metrics and body limits -------------------------------------------------------------
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _invalid(errors: list[dict]) -> JSONResponse:
    if errors and errors[0]["type"] == "json_invalid":
        return _error(422, f"the body is not valid JSON ({errors[0]['ctx']['error']})")
    where = lambda error: ".".join(str(part) for part in error["loc"])  # noqa: E731
    return _error(422, "; ".join(f"{where(error)}: {error['msg']}" for error in errors[:5]))


async def _error_answer(request: HttpRequest, error: Exception) -> JSONResponse:
    """Every expected error as {"error": message}, on the OpenAI routes in OpenAI's shape (`Gate`
    answers the unexpected ones)."""
    if isinstance(error, ApiError):
        answer = _error(error.status, str(error), error.headers)
    elif isinstance(error, HTTPException):
        answer = _error(error.status_code, str(error.detail))
    else:
        answer = _invalid(error.errors())
    if _route_path(request.scope) in openai.PATHS:
        message = json.loads(answer.body)["error"]
        return JSONResponse(openai.error_body(answer.status_code, message), status_code=answer.status_code,
                            headers={k: v for k, v in answer.headers.items() if k.lower() == "retry-after"})
    return answer


def _route_path(scope: dict) -> str:
    """The request's path below the application's own prefix (a Ray Serve `route_prefix`)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


class Gate:
    """Pure ASGI middleware: times and counts every request by route and status, stops reading a
    body past its limit (413: no request can exhaust memory), and answers an unexpected error with
    a generic 500, its traceback logged here only (answered, not raised: the connection stays up)."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, received = time.perf_counter(), None, 0
        upload = scope["method"] == "POST" and _route_path(scope) == "/v1/adapters"
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body over {limit:,} bytes")
            return message

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, noting_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status is not None:  # the answer had started: nothing more can be sent
                raise
            await _error(500, "internal server error (logged on the server)")(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            self.metrics.record(route.path if route else "unmatched", status or 500, time.perf_counter() - started)


def api_app(backend: Backend, lifespan: Callable | None = None, **described) -> FastAPI:
    """The application over any backend: every route (the API's own and the OpenAI-compatible ones), every
    error as JSON, and the `Gate` around every request. `described`: FastAPI's title and summary."""
    app = FastAPI(lifespan=lifespan, **described)
    app.state.backend = backend
    app.include_router(routes.router)
    app.include_router(openai.router, dependencies=routes.CLIENT)
    for error_type in (ApiError, HTTPException, RequestValidationError, ValidationError):
        app.add_exception_handler(error_type, _error_answer)
    app.add_middleware(Gate, settings=backend.settings, metrics=backend.metrics)
    return app


def create_app(store: str | Path, backbone: str | None = None, settings: Settings | None = None) -> FastAPI:
    """The application of `adapterlab serve`; the backbone loads now, the worker and batcher start with the app."""
    backend = LocalBackend.open(store, backbone, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.server.start()
        yield
        await backend.server.stop()  # uvicorn lets requests in flight finish first; then the queue drains

    return api_app(backend, lifespan, title="adapterlab", summary="Many adapters on one frozen backbone, over HTTP.")


def serve(store: str | Path, backbone: str | None, host: str, port: int, settings: Settings) -> None:
    uvicorn.run(create_app(store, backbone, settings), host=host, port=port, log_level="info")
