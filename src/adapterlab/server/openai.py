"""OpenAI-compatible routes, the way vLLM and LoRAX serve many LoRA adapters: `model` names an adapter
(TASK/NAME) or the backbone. /v1/models, /v1/completions and /v1/chat/completions, with `stream`
(server-sent events), `n`, `stop`, `max_tokens`, `temperature`, `top_p`, `seed` and `usage`; errors in
OpenAI's shape. Generative adapters and the backbone write text through the engine's decoder; a
classification adapter answers with its label as the text, so one client reaches every task."""

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncGenerator, AsyncIterator, Literal

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adapterlab.engine import GenerationRequest
from adapterlab.generation import Sampling
from adapterlab.server.backend import Backend, Update
from adapterlab.server.bodies import BatchRow
from adapterlab.server.disconnects import CLIENT_CLOSED_REQUEST, unless_client_leaves
from adapterlab.server.errors import ApiError
from adapterlab.server.routes import BackendDep
from adapterlab.store import AdapterCard, adapter_folders

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # OpenAI refuses unknown parameters too
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None


class CompletionBody(_Body):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


router = APIRouter()


@router.get("/v1/models")
async def models(backend: BackendDep) -> dict:
    """The backbone and every adapter of the store, as OpenAI models."""
    backbone = await backend.backbone()
    entries = [{"id": backbone, "object": "model", "created": 0, "owned_by": "adapterlab", "root": backbone,
                "parent": None}]
    for folder in await asyncio.to_thread(adapter_folders, backend.store):
        entries.append({"id": f"{folder.parent.name}/{folder.name}", "object": "model", "created": 0,
                        "owned_by": "adapterlab", "root": backbone, "parent": backbone})
    return {"object": "list", "data": entries}


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: HttpRequest, backend: BackendDep):
    return respond(await unless_client_leaves(request, answer(backend, body)))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: HttpRequest, backend: BackendDep):
    return respond(await unless_client_leaves(request, answer(backend, body)))


def respond(result: dict | AsyncIterator[str] | None) -> Response | dict:
    """`answer`'s result as the HTTP answer: JSON, server-sent events, or 499 for a client that left."""
    if result is None:  # nobody reads an answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream")


async def answer(backend: Backend, body: "CompletionBody | ChatBody") -> dict | AsyncIterator[str]:
    """A completion (`CompletionBody`) or chat completion (`ChatBody`): the JSON answer, or with
    `stream` its server-sent events (the rows queued already)."""
    prompt = body.prompt if isinstance(body, CompletionBody) else None
    messages = None if prompt is not None else [message.model_dump() for message in body.messages]
    kind = "text_completion" if prompt is not None else "chat.completion"
    settings = backend.settings
    settings.check_size(body.n, prompt, *(m["content"] for m in messages or ()))
    adapter, card = await model_adapter(backend, body.model)
    meta = {"id": f"{'chatcmpl' if messages else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": body.model}
    usage = bool((body.stream_options or {}).get("include_usage"))
    if card is not None and card.kind == "classify":
        text = prompt if prompt is not None else messages[-1]["content"]
        finals = await _label_as_text(backend, adapter, body.n, text)
        return _events(_replayed(finals), body.n, kind, meta, usage, 0) if body.stream else _whole(kind, meta, finals)
    limit = body.max_completion_tokens if isinstance(body, ChatBody) and body.max_completion_tokens else body.max_tokens
    max_tokens = limit or (16 if prompt is not None else settings.max_new_tokens)
    if max_tokens > settings.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens}: this server writes at most {settings.max_new_tokens}")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    requests = [GenerationRequest(adapter, prompt, messages, Sampling(
        max_tokens, body.temperature, body.top_p, None if body.seed is None else body.seed + i, stops))
        for i in range(body.n)]
    if body.stream:
        holdback = max(map(len, stops), default=1) - 1  # a stop string's start is not sent before it is decided
        return _events(await backend.stream(requests), body.n, kind, meta, usage, holdback)
    return _whole(kind, meta, await backend.generate(requests))


async def model_adapter(backend: Backend, model: str) -> tuple[str | None, AdapterCard | None]:
    """(None, None) for the backbone, else (the adapter, its card); 404 in OpenAI's words when there is none.
    The one place that decides what `model` names."""
    backbone = await backend.backbone()
    if model == backbone:
        return None, None
    missing = ApiError(404, f"The model '{model}' does not exist: name the backbone ({backbone!r}) or an adapter "
                            "TASK/NAME (GET /v1/models)")
    if model.count("/") != 1:
        raise missing
    try:
        return model, await backend.card(model)
    except ApiError as error:
        if error.status == 404:
            raise missing from None
        raise


async def _label_as_text(backend: Backend, adapter: str, n: int, text: str) -> list[Update]:
    """A classification adapter's answer: its label, as every choice's whole text."""
    [prediction] = await backend.classify([BatchRow(adapter=adapter, text=text)])
    prompt_tokens, label_tokens = await backend.count_tokens([text, prediction.label])
    return [Update(i, prediction.label, "stop", prompt_tokens, label_tokens) for i in range(n)]


async def _replayed(finals: list[Update]) -> AsyncGenerator[Update, None]:
    for final in finals:
        yield final


async def _events(updates: AsyncGenerator[Update, None], n: int, kind: str, meta: dict, usage: bool,
                  holdback: int) -> AsyncIterator[str]:
    """Server-sent events: each choice's new text as it comes (the last `holdback` characters kept
    until they cannot be a stop string's start), its finish reason, then [DONE]. Leaving early (the
    client went away) closes `updates`, which cancels their rows."""
    chunk = f"{kind}.chunk" if kind == "chat.completion" else kind
    sent, finals = [0] * n, [None] * n
    async with aclosing(updates):
        if kind == "chat.completion":
            for index in range(n):
                yield _event({**meta, "object": chunk, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        async for update in updates:
            text = update.text
            end = len(text) if update.finish_reason else max(sent[update.index], len(text) - holdback)
            new = text[sent[update.index]:end]
            sent[update.index] += len(new)
            if new or update.finish_reason:
                yield _event({**meta, "object": chunk, "choices": [_delta(kind, update.index, new, update.finish_reason)]})
            if update.finish_reason:
                finals[update.index] = update
    if usage:
        yield _event({**meta, "object": chunk, "choices": [], "usage": _usage(finals)})
    yield "data: [DONE]\n\n"


def _whole(kind: str, meta: dict, finals: list[Update]) -> dict:
    return {**meta, "object": kind, "choices": [_choice(kind, final) for final in finals], "usage": _usage(finals)}


def _choice(kind: str, update: Update) -> dict:
    if kind == "chat.completion":
        return {"index": update.index, "message": {"role": "assistant", "content": update.text},
                "finish_reason": update.finish_reason, "logprobs": None}
    return {"index": update.index, "text": update.text, "finish_reason": update.finish_reason, "logprobs": None}


def _delta(kind: str, index: int, text: str, finish_reason: str | None) -> dict:
    if kind == "chat.completion":
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def _usage(finals: list[Update]) -> dict:
    prompt = sum(update.prompt_tokens for update in finals[:1])  # the choices share one prompt
    completion = sum(update.completion_tokens for update in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error_body(status: int, message: str) -> dict:
    """OpenAI's error shape."""
    kinds = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error"}
    codes = {404: "model_not_found", 503: "server_busy"}
    code = "context_length_exceeded" if "context of" in message else codes.get(status)
    return {"error": {"message": message, "type": kinds.get(status, "invalid_request_error"), "param": None,
                      "code": code}}
