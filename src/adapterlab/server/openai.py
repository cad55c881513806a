"""OpenAI-compatible routes, the way vLLM and LoRAX serve many LoRA adapters: `model` names an adapter
(TASK/NAME) or the backbone. /v1/models, /v1/completions and /v1/chat/completions, with `stream`
(server-sent events, the usage last with stream_options.include_usage), `n`, `stop`, `max_tokens`,
`temperature`, `top_p`, `seed`, `echo` and `usage`; errors in OpenAI's shape; the other fields of OpenAI's
schemas are ignored or refused (`bodies.OpenAIBody`). Generative adapters and the backbone write text through
the engine's decoder; a chat to a generative adapter reaches it through the template it was trained with; a
classification adapter answers with its label as the text, so one client reaches every task."""

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import Response, StreamingResponse

from adapterlab.engine import GenerationRequest
from adapterlab.generation import Sampling
from adapterlab.server.backend import Backend, Update
from adapterlab.server.bodies import BatchRow, ChatBody, CompletionBody
from adapterlab.server.disconnects import CLIENT_CLOSED_REQUEST, unless_client_leaves
from adapterlab.server.errors import ApiError
from adapterlab.server.routes import BackendDep
from adapterlab.store import AdapterCard, adapter_folders

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


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


async def answer(backend: Backend, body: CompletionBody | ChatBody) -> dict | AsyncIterator[str]:
    """A completion (`CompletionBody`) or chat completion (`ChatBody`): the JSON answer, or with
    `stream` its server-sent events (the rows queued already)."""
    problem = body.refusal()
    if problem is not None:
        raise ApiError(400, problem)
    chat = isinstance(body, ChatBody)
    sent = [message.text() for message in body.messages] if chat else body.prompts()
    choices = body.n * (1 if chat else len(sent))
    backend.settings.check_size(choices, *sent)
    adapter, card = await model_adapter(backend, body.model)
    kind = "chat.completion" if chat else "text_completion"
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": body.model}
    echoed = [sent[i // body.n] if not chat and body.echo else "" for i in range(choices)]
    if card is not None and card.kind == "classify":
        finals = await _labels_as_text(backend, adapter, body.n, _texts(body))
        if not body.stream:
            return _whole(kind, meta, finals, echoed, body.n)
        updates, holdback = _replayed(finals), 0
    else:
        requests = _generation_requests(backend.settings.max_new_tokens, body, adapter, card)
        if not body.stream:
            return _whole(kind, meta, await backend.generate(requests), echoed, body.n)
        # a stop string's start is not sent before it is decided
        updates, holdback = await backend.stream(requests), max(map(len, body.stops()), default=1) - 1
    return _events(updates, kind, meta, echoed, body.n, body.stream_options.include_usage, holdback)


def _generation_requests(most: int, body: CompletionBody | ChatBody, adapter: str | None,
                         card: AdapterCard | None) -> list[GenerationRequest]:
    """n requests per prompt, seeded seed, seed + 1, ... (alike for every prompt); at most `most` tokens each."""
    chat = isinstance(body, ChatBody)
    field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    max_tokens = getattr(body, field) or (most if chat else 16)
    if max_tokens > most:
        raise ApiError(400, f"{field} {max_tokens}: this server writes at most {most}")
    return [GenerationRequest(adapter, sampling=Sampling(max_tokens, body.temperature, body.top_p,
                                                         None if body.seed is None else body.seed + i, body.stops()),
                              **given)
            for given in _inputs(body, card) for i in range(body.n)]


def _inputs(body: CompletionBody | ChatBody, card: AdapterCard | None) -> list[dict]:
    """Each prompt as a `GenerationRequest`'s input: a text for the generative adapter's template (a chat's last
    user message unless `adapterlab.template` is false; a completion's prompt when it is true), else the
    prompt read as is, or the chat through the tokenizer's chat template."""
    chat = isinstance(body, ChatBody)
    template = body.adapterlab.template
    if template is None:
        template = chat and card is not None
    if template:
        if card is None:
            raise ApiError(400, "adapterlab.template: the backbone has no template; name a generative adapter")
        return [{"text": text} for text in _texts(body)]
    if chat:
        return [{"messages": [message.turn() for message in body.messages]}]
    return [{"prompt": prompt} for prompt in body.prompts()]


def _texts(body: CompletionBody | ChatBody) -> list[str]:
    """What an adapter reads: a completion's prompts, or a chat's last user message."""
    if isinstance(body, CompletionBody):
        return body.prompts()
    text = body.last_user_text()
    if text is None:
        raise ApiError(400, "messages hold no user message: an adapter reads the last one")
    return [text]


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


async def _labels_as_text(backend: Backend, adapter: str, n: int, texts: list[str]) -> list[Update]:
    """A classification adapter's answers: each text's label, as the whole text of its n choices."""
    predictions = await backend.classify([BatchRow(adapter=adapter, text=text) for text in texts])
    labels = [prediction.label for prediction in predictions]
    counts = await backend.count_tokens(texts + labels)
    return [Update(i * n + j, label, "stop", counts[i], counts[len(texts) + i])
            for i, label in enumerate(labels) for j in range(n)]


async def _replayed(finals: list[Update]) -> AsyncGenerator[Update, None]:
    for final in finals:
        yield final


async def _events(updates: AsyncGenerator[Update, None], kind: str, meta: dict, echoed: list[str], n: int,
                  usage: bool, holdback: int) -> AsyncIterator[str]:
    """Server-sent events: a chat's role first, then each choice's new text as it comes (after its echoed
    prompt; the last `holdback` characters kept until they cannot be a stop string's start), its finish
    reason, the usage (when asked), then [DONE]. Leaving early (the client went away) closes `updates`,
    which cancels their rows."""
    chunk = {**meta, "object": f"{kind}.chunk" if kind == "chat.completion" else kind,
             **({"usage": None} if usage else {})}
    sent, finals = [0] * len(echoed), [None] * len(echoed)
    async with aclosing(updates):
        if kind == "chat.completion":
            for index in range(len(echoed)):
                yield _event({**chunk, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        async for update in updates:
            text = echoed[update.index] + update.text
            end = len(text) if update.finish_reason else max(sent[update.index], len(text) - holdback)
            new = text[sent[update.index]:end]
            sent[update.index] += len(new)
            if new or update.finish_reason:
                yield _event({**chunk, "choices": [_delta(kind, update.index, new, update.finish_reason)]})
            if update.finish_reason:
                finals[update.index] = update
    if usage:
        yield _event({**chunk, "choices": [], "usage": _usage(finals, n)})
    yield "data: [DONE]\n\n"


def _whole(kind: str, meta: dict, finals: list[Update], echoed: list[str], n: int) -> dict:
    return {**meta, "object": kind, "usage": _usage(finals, n),
            "choices": [_choice(kind, replace(final, text=echoed[final.index] + final.text)) for final in finals]}


def _choice(kind: str, update: Update) -> dict:
    if kind == "chat.completion":
        return {"index": update.index, "message": {"role": "assistant", "content": update.text},
                "finish_reason": update.finish_reason, "logprobs": None}
    return {"index": update.index, "text": update.text, "finish_reason": update.finish_reason, "logprobs": None}


def _delta(kind: str, index: int, text: str, finish_reason: str | None) -> dict:
    if kind == "chat.completion":
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def _usage(finals: list[Update], n: int) -> dict:
    prompt = sum(update.prompt_tokens for update in finals if update.index % n == 0)  # a prompt's n choices share it
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
