"""A client of the OpenAI-compatible routes that leaves: its generation on the local server, held at a token
count by the test, is cancelled within a step. The routes themselves, on every backend:
test_http_conformance."""

import threading

import httpx
import openai
import pytest

from adapterlab.server import Settings, create_app
from test_http_conformance import LEAVE_AT, leaving_client, wait_until
from test_server import running


@pytest.fixture(scope="module")
def served_app(tiny_llama, tmp_path_factory):
    """(base URL, app) of a server of the bare tiny LLM (an empty store)."""
    app = create_app(tmp_path_factory.mktemp("empty-store"), tiny_llama, Settings(dtype="float32"))
    with running(app) as (url, _):
        yield url, app


def test_a_client_that_leaves_stops_its_generation(served_app, monkeypatch):
    """A non-streamed completion whose client leaves after its first tokens is cancelled at once (its row
    leaves the decoder), not decoded to its 64 tokens for nobody. The decoder is held after the row's
    LEAVE_AT-th token until the server has seen the client go, so no part depends on the machine's speed."""
    url, app = served_app
    server = app.state.backend.server
    body = {"model": server.engine.backbone.name, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == 64  # left alone, the row runs to its end
    reached, resume = threading.Event(), threading.Event()
    step = server.decoder.step

    def step_then_hold() -> list:
        advanced = step()
        if not reached.is_set() and any(len(sequence.token_ids) >= LEAVE_AT for sequence in advanced):
            reached.set()
            resume.wait(60)
        return advanced

    monkeypatch.setattr(server.decoder, "step", step_then_hold)
    with leaving_client(url, "/v1/completions", body, {}):
        assert reached.wait(60), "the generation did not start"
        [sequence] = server.decoder.active
    wait_until(lambda: sequence not in server.listeners)  # the server saw the client go, by an event
    resume.set()
    wait_until(lambda: not server.decoder.busy)
    assert sequence.finish_reason == "cancelled" and len(sequence.token_ids) <= LEAVE_AT + 1


@pytest.fixture(scope="module")
def ask(served_app):
    """POST a body (the bare backbone as its model, greedy, 4 tokens unless it says) to an OpenAI route."""
    url, app = served_app
    backbone = app.state.backend.server.engine.backbone.name

    def post(path: str, **body) -> httpx.Response:
        return httpx.post(f"{url}/v1/{path}", json={"model": backbone, "max_tokens": 4, "temperature": 0, **body},
                          timeout=120)
    return post


CHAT = [{"role": "user", "content": "Tell me a story"}]
IGNORED = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
           "prompt_cache_key": "k", "prompt_cache_options": {"mode": "implicit"}, "prompt_cache_retention": "24h",
           "safety_identifier": "s", "reasoning_effort": "low", "prediction": {"type": "content", "content": "x"},
           "stream_options": {"include_obfuscation": False}}


def test_every_field_of_openai_schemas_is_accepted_at_its_neutral_value(ask):
    """A chat or completion with every field that does not change the answer, and the ones that do at a value
    the decoder honours (a zero penalty, no tools, text output), answers as the bare request does."""
    plain = ask("chat/completions", messages=CHAT).json()["choices"][0]["message"]["content"]
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False, "top_logprobs": 0,
               "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "functions": [],
               "function_call": "auto", "audio": None, "modalities": ["text"], "verbosity": "medium",
               "web_search_options": None, "moderation": None, "max_completion_tokens": 4, "n": None, "seed": 1,
               "stop": None, "top_p": 1, "stream": False, "adapterlab": {"template": None}}
    answer = ask("chat/completions", messages=CHAT, **IGNORED, **neutral)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == plain, answer.text
    text = ask("completions", prompt="Once upon a time").json()["choices"][0]["text"]
    completion = ask("completions", prompt="Once upon a time", best_of=1, echo=False, logprobs=None, suffix="",
                     user="u", frequency_penalty=0, presence_penalty=0.0, logit_bias=None, n=1)
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == text, completion.text


def test_content_parts_and_the_developer_role_read_as_text(ask):
    """Text parts are the message's text (joined by newlines); a developer message is a system one; an assistant
    turn may hold a refusal part or no content."""
    def content(messages: list[dict]) -> str:
        answer = ask("chat/completions", messages=messages)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]

    as_strings = [{"role": "system", "content": "Be kind.\nBe brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Sorry"}, *CHAT]
    as_parts = [{"role": "developer", "content": [{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "explicit"}}],
                 "name": "ann"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "Sorry"}]},
                {"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    assert content(as_parts) == content(as_strings)
    assert content([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "refusal": "Sorry"},
                    *CHAT]) == content(as_strings[1:])


@pytest.mark.parametrize("path, body, message", [
    ("chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty 0.5 is not supported"),
    ("completions", {"presence_penalty": -1}, "presence_penalty -1.0 is not supported"),
    ("chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs is not supported"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs is not supported"),
    ("completions", {"logprobs": 0}, "logprobs is not supported"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format json_object is not supported"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice is not supported"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions is not supported"),
    ("chat/completions", {"modalities": ["text", "audio"]}, "modalities audio is not supported"),
    ("chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported"),
    ("chat/completions", {"verbosity": "low"}, "verbosity low is not supported"),
    ("chat/completions", {"web_search_options": {}}, "web_search_options is not supported"),
    ("chat/completions", {"moderation": {"model": "m"}}, "moderation is not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0]: content[1]: image_url parts are not supported"),
    ("chat/completions", {"messages": [*CHAT, {"role": "tool", "content": "42", "tool_call_id": "c"}]},
     "messages[1]: the tool role is not supported"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, *CHAT]},
     "messages[0]: tool_calls is not supported"),
    ("completions", {"prompt": [1, 2, 3]}, "prompt as token ids is not supported"),
    ("completions", {"best_of": 2}, "best_of 2 is not supported"),
    ("completions", {"suffix": "the end"}, "suffix is not supported"),
])
def test_a_field_the_decoder_cannot_honour_is_refused_by_name(ask, path, body, message):
    body = {"messages": CHAT, **body} if path == "chat/completions" else {"prompt": "x", **body}
    answer = ask(path, **body)
    assert answer.status_code == 400 and answer.json()["error"]["message"].startswith(message), answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_malformed_messages_are_unprocessable(ask):
    for messages in ([{"role": "user"}], [{"role": "critic", "content": "x"}], [{"role": "user", "content": "x", "mood": 1}],
                     [{"role": "user", "content": [{"type": "text"}]}]):
        assert ask("chat/completions", messages=messages).status_code in (400, 422), messages


def test_a_completion_of_several_prompts_and_echo(ask, served_app):
    """A list of prompts answers each with its n choices (index prompt * n + choice), as each alone does; echo
    puts the prompt before its text, whole and streamed."""
    prompts = ["Once upon a time", "The weather"]
    alone = [ask("completions", prompt=prompt).json() for prompt in prompts]
    both = ask("completions", prompt=prompts, n=2).json()
    assert [choice["index"] for choice in both["choices"]] == [0, 1, 2, 3]
    assert [choice["text"] for choice in both["choices"]] == [a["choices"][0]["text"] for a in alone for _ in range(2)]
    assert both["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert both["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)
    echoed = ask("completions", prompt=prompts[0], echo=True).json()["choices"][0]["text"]
    assert echoed == prompts[0] + alone[0]["choices"][0]["text"]
    url, app = served_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    streamed = client.completions.create(model=app.state.backend.server.engine.backbone.name, prompt=prompts[0],
                                         echo=True, max_tokens=4, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == echoed
