"""The FastAPI application: routes, JSON error answers, the `Gate` middleware, `create_app` and `serve`."""

import asyncio
import json
import logging
import secrets
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from adapterlab.engine import GenerationRequest, Prediction
from adapterlab.generation import Sampling
from adapterlab.errors import AdapterlabError
from adapterlab.server import openai
from adapterlab.server.disconnects import unless_client_leaves
from adapterlab.server.bodies import BatchBody, BatchRow, ClassifyBody, GenerateBody, RegisterBody
from adapterlab.server.errors import ApiError
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings
from adapterlab.server.worker import Server
from adapterlab.store import AdapterCard, adapter_folders, read_card

log = logging.getLogger("adapterlab.server")


# --- the application -----------------------------------------------------------------------------
router = APIRouter()


def _server(request: HttpRequest) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _authorized(request: HttpRequest, *tokens: str | None) -> None:
    """401 without a bearer token, 403 with one that matches none of `tokens`."""
    given = _bearer(request)
    if given is None:
        raise ApiError(401, "this endpoint needs 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
    if not any(token is not None and secrets.compare_digest(given.encode(), token.encode()) for token in tokens):
        raise ApiError(403, "the bearer token is not valid for this endpoint")


def _admin(request: HttpRequest, server: ServerDep) -> None:
    """Changing the store: the admin token; with none set, off unless allowed for local use."""
    settings = server.settings
    if settings.admin_token is not None:
        _authorized(request, settings.admin_token)
    elif not settings.allow_admin_without_token:
        raise ApiError(403, "admin endpoints are off: start the server with --admin-token (or ADAPTERLAB_ADMIN_TOKEN), "
                            "or with --allow-admin-without-token for local use")


def _client(request: HttpRequest, server: ServerDep) -> None:
    """Reading and answering: open, or with a client token that token (the admin token also does)."""
    if server.settings.client_token is not None:
        _authorized(request, server.settings.client_token, server.settings.admin_token)


ADMIN = [Depends(_admin)]
CLIENT = [Depends(_client)]


@router.get("/health")
async def health(server: ServerDep) -> dict:
    backbone = server.engine.backbone
    return {"status": "ok", "backbone": backbone.name, "kind": backbone.kind, "batching": server.settings.batching}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: ServerDep) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/adapters", dependencies=CLIENT)
async def adapters(server: ServerDep) -> dict:
    """The store's adapters (cards included, without the server's paths), and which are resident."""
    resident = await server.on_worker(server.engine.resident)
    cards = await asyncio.to_thread(store_cards, server.store)
    return {"backbone": server.engine.backbone.name, "resident": resident,
            "available": [{"adapter": name, "resident": name in resident, "card": public_card(card)}
                          for name, card in cards]}


def public_card(card: AdapterCard) -> dict:
    """A card as clients see it: the recipe's data paths and store folder are the server's own."""
    shown = card.model_dump(mode="json")
    recipe = shown.get("recipe", {})
    for section, keys in (("data", ("path", "test_path")), ("output", ("store",))):
        for key in keys:
            recipe.get(section, {}).pop(key, None)
    return shown


def store_cards(store: Path) -> list[tuple[str, AdapterCard]]:
    cards = []
    for folder in adapter_folders(store):
        try:
            cards.append((f"{folder.parent.name}/{folder.name}", read_card(folder)))
        except AdapterlabError:  # a broken folder is not available; `adapterlab adapters verify` names it
            continue
    return cards


REGISTER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RegisterBody.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "A .zip or .tar of one adapter folder."}}}}}}}


@router.post("/v1/adapters", status_code=201, openapi_extra=REGISTER_BODY, dependencies=ADMIN)
async def register(request: HttpRequest, server: ServerDep) -> dict:
    """Register an adapter, checked and loaded: a folder already in the store (JSON {"path":
    "TASK/NAME"}), or an uploaded archive (multipart field "file"), moved atomically to
    STORE/TASK/NAME after its card (replacing an adapter of that name)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=0) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, 'send the archive as the multipart field "file"')
            staging, target = await asyncio.to_thread(server.stage_upload, upload.file)
    else:
        body = RegisterBody.model_validate_json(await request.body())
        staging, target = None, await asyncio.to_thread(server.check_in_place, body.path)
    try:
        card = await server.on_worker(server.install, staging, target)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"adapter": f"{card.task}/{card.name}", "card": public_card(card)}


@router.delete("/v1/adapters/{name:path}", dependencies=ADMIN)
async def delete(name: str, server: ServerDep) -> dict:
    """Stop serving an adapter and delete it from the store; requests naming it get 404 after."""
    await server.on_worker(server.remove, server.adapter_folder(name))
    return {"deleted": name}


@router.post("/v1/classify", dependencies=CLIENT)
async def classify(body: ClassifyBody, server: ServerDep) -> dict:
    """Label inputs with one adapter, or zero-shot (`adapter` null, `labels` given)."""
    predictions = await server.classify(rows_of(body))
    return {"adapter": body.adapter, "predictions": [prediction_json(p, body.top_k) for p in predictions]}


def rows_of(body: ClassifyBody) -> list[BatchRow]:
    """A classify request's inputs as rows of its one adapter (or its zero-shot labels)."""
    return [BatchRow(adapter=body.adapter, labels=body.labels,
                     **({"text": item} if isinstance(item, str) else item.model_dump())) for item in body.inputs]


@router.post("/v1/classify/batch", dependencies=CLIENT)
async def classify_batch(body: BatchBody, server: ServerDep) -> dict:
    """Label rows that each name their own adapter (or are zero-shot)."""
    predictions = await server.classify(body.rows)
    return {"predictions": [{"adapter": row.adapter, **prediction_json(p, body.top_k)}
                            for row, p in zip(body.rows, predictions)]}


@router.post("/v1/generate", dependencies=CLIENT)
async def generate(body: GenerateBody, http: HttpRequest, server: ServerDep):
    """Greedy continuation of a prompt (LLM backbones), under an adapter or by the bare backbone."""
    text = await unless_client_leaves(http, continuation(server, body))
    if text is None:  # the client left: nobody reads an answer
        return Response(status_code=openai.CLIENT_CLOSED_REQUEST)
    return {"adapter": body.adapter, "text": text}


async def continuation(server: Server, body: GenerateBody) -> str:
    """The text `/v1/generate` answers with, checked as it is served."""
    if body.max_new_tokens > server.settings.max_new_tokens:
        raise ApiError(413, f"max_new_tokens {body.max_new_tokens}; the limit is {server.settings.max_new_tokens}")
    server.check_size(1, body.prompt)
    backbone = server.engine.backbone
    if backbone.kind != "decoder":
        raise ApiError(400, f"generation needs an LLM backbone; {backbone.name!r} is an encoder")
    folder = server.adapter_folder(body.adapter) if body.adapter else None
    if folder is not None:
        await asyncio.to_thread(server.checked_card, folder)  # 404, 422 or 409 before it queues
    request = GenerationRequest(folder and str(folder), body.prompt, sampling=Sampling(body.max_new_tokens))
    [final] = await server.generate([request])
    return final.text


def prediction_json(prediction: Prediction, top_k: int | None) -> dict:
    ranked = sorted(prediction.scores.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return {"label": prediction.label, "score": prediction.score,
            "scores": [{"label": label, "score": score} for label, score in ranked], "truncated": prediction.truncated}


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


def create_app(store: str | Path, backbone: str | None = None, settings: Settings | None = None) -> FastAPI:
    """The application; the backbone loads now, the worker and batcher start with the app."""
    server = Server(store, backbone, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        yield
        await server.stop()  # uvicorn lets requests in flight finish first; then the queue drains

    app = FastAPI(title="adapterlab", summary="Many adapters on one frozen backbone, over HTTP.", lifespan=lifespan)
    app.state.server = server
    app.include_router(router)
    app.include_router(openai.router, dependencies=CLIENT)
    answer_errors(app, server.settings, server.metrics)
    return app


def answer_errors(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Every error as JSON (`_error_answer`), and the `Gate` around every request."""
    for error_type in (ApiError, HTTPException, RequestValidationError, ValidationError):
        app.add_exception_handler(error_type, _error_answer)
    app.add_middleware(Gate, settings=settings, metrics=metrics)


def serve(store: str | Path, backbone: str | None, host: str, port: int, settings: Settings) -> None:
    uvicorn.run(create_app(store, backbone, settings), host=host, port=port, log_level="info")
