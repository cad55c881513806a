"""The HTTP API's own routes (health, metrics, adapters, classification, generation) and its bearer-token
checks, written once against a `Backend` (the application's `state.backend`)."""

import asyncio
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request as HttpRequest
from fastapi.responses import PlainTextResponse, Response
from starlette.datastructures import UploadFile

from adapterlab.answers import prediction_json
from adapterlab.engine import GenerationRequest, Prediction
from adapterlab.errors import AdapterlabError
from adapterlab.generation import Sampling
from adapterlab.server.backend import Backend
from adapterlab.server.bodies import BatchBody, BatchRow, ClassifyBody, GenerateBody, RegisterBody
from adapterlab.server.disconnects import CLIENT_CLOSED_REQUEST, unless_client_leaves
from adapterlab.server.errors import ApiError
from adapterlab.store import AdapterCard, adapter_folders, read_card

router = APIRouter()


def _backend(request: HttpRequest) -> Backend:
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(_backend)]


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


def _admin(request: HttpRequest, backend: BackendDep) -> None:
    """Changing the store: the admin token; with none set, off unless allowed for local use."""
    settings = backend.settings
    if settings.admin_token is not None:
        _authorized(request, settings.admin_token)
    elif not settings.allow_admin_without_token:
        raise ApiError(403, "admin endpoints are off: start the server with --admin-token (or ADAPTERLAB_ADMIN_TOKEN), "
                            "or with --allow-admin-without-token for local use")


def _client(request: HttpRequest, backend: BackendDep) -> None:
    """Reading and answering: open, or with a client token that token (the admin token also does)."""
    if backend.settings.client_token is not None:
        _authorized(request, backend.settings.client_token, backend.settings.admin_token)


ADMIN = [Depends(_admin)]
CLIENT = [Depends(_client)]


@router.get("/health")
async def health(backend: BackendDep) -> dict:
    return {"status": "ok", **await backend.describe()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(backend: BackendDep) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(backend.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/adapters", dependencies=CLIENT)
async def adapters(backend: BackendDep) -> dict:
    """The store's adapters (cards included, without the server's paths), and which are resident."""
    cards = dict(await asyncio.to_thread(store_cards, backend.store))
    resident = [name for name in await backend.resident() if name in cards]  # Ray's figures can lag a deletion
    return {"backbone": await backend.backbone(), "resident": resident,
            "available": [{"adapter": name, "resident": name in resident, "card": public_card(card)}
                          for name, card in cards.items()]}


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
async def register(request: HttpRequest, backend: BackendDep) -> dict:
    """Register an adapter, checked and loaded: a folder already in the store (JSON {"path":
    "TASK/NAME"}), or an uploaded archive (multipart field "file"), moved atomically to
    STORE/TASK/NAME after its card (replacing an adapter of that name)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=0) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, 'send the archive as the multipart field "file"')
            card = await backend.register(None, upload.file)
    else:
        card = await backend.register(RegisterBody.model_validate_json(await request.body()).path, None)
    return {"adapter": f"{card.task}/{card.name}", "card": public_card(card)}


@router.delete("/v1/adapters/{name:path}", dependencies=ADMIN)
async def delete(name: str, backend: BackendDep) -> dict:
    """Stop serving an adapter and delete it from the store; requests naming it get 404 after."""
    await backend.remove(name)
    return {"deleted": name}


@router.post("/v1/classify", dependencies=CLIENT)
async def classify(body: ClassifyBody, backend: BackendDep) -> dict:
    """Label inputs with one adapter, or zero-shot (`adapter` null, `labels` given)."""
    predictions = await classified(backend, rows_of(body))
    return {"adapter": body.adapter, "predictions": [prediction_json(p, body.top_k) for p in predictions]}


def rows_of(body: ClassifyBody) -> list[BatchRow]:
    """A classify request's inputs as rows of its one adapter (or its zero-shot labels)."""
    return [BatchRow(adapter=body.adapter, labels=body.labels,
                     **({"text": item} if isinstance(item, str) else item.model_dump())) for item in body.inputs]


@router.post("/v1/classify/batch", dependencies=CLIENT)
async def classify_batch(body: BatchBody, backend: BackendDep) -> dict:
    """Label rows that each name their own adapter (or are zero-shot)."""
    predictions = await classified(backend, body.rows)
    return {"predictions": [{"adapter": row.adapter, **prediction_json(p, body.top_k)}
                            for row, p in zip(body.rows, predictions)]}


async def classified(backend: Backend, rows: list[BatchRow]) -> list[Prediction]:
    """The rows' predictions, their sizes checked first."""
    backend.settings.check_size(len(rows), *(text for row in rows
                                             for text in (row.text, row.text_pair, *(row.labels or ()))))
    return await backend.classify(rows)


@router.post("/v1/generate", dependencies=CLIENT)
async def generate(body: GenerateBody, http: HttpRequest, backend: BackendDep):
    """Greedy continuation of a prompt (LLM backbones), under an adapter or by the bare backbone."""
    settings = backend.settings
    if body.max_new_tokens > settings.max_new_tokens:
        raise ApiError(413, f"max_new_tokens {body.max_new_tokens}; the limit is {settings.max_new_tokens}")
    settings.check_size(1, body.prompt)
    if body.adapter:
        await backend.card(body.adapter)  # 400, 404 or 422 before it queues
    request = GenerationRequest(body.adapter, body.prompt, sampling=Sampling(body.max_new_tokens))
    finals = await unless_client_leaves(http, backend.generate([request]))
    if finals is None:  # the client left: nobody reads an answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return {"adapter": body.adapter, "text": finals[0].text}
