"""Real OpenAI clients against the local server of the conformance suite's store (tiny chat Llama, generative
LoRA and prefix adapters): the official `openai` client and LangChain's `ChatOpenAI` and `OpenAI`, plain and
streamed, with the fields they send by default (zero penalties, developer messages, content-part arrays).
A chat reaches a generative adapter through its template: the answer is the engine's `text` answer."""

import shutil

import openai
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

from adapterlab.server import Settings, create_app
from test_http_conformance import CLIENT, MR, SETTINGS, greedy
from test_server import running

API_KEY = CLIENT["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def url(chat_adapters, tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("clients") / "store"
    shutil.copytree(chat_adapters / "store", store)
    with running(create_app(store, tiny_llama, Settings(**SETTINGS))) as (served, _):
        yield f"{served}/v1"


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)


def test_the_openai_client_with_the_fields_it_sends(client, chat_engine):
    """A developer message, text parts and every field that leaves the answer alone: the adapter's answer."""
    wanted = greedy(chat_engine, "e2e/lora", 8, text=MR)
    messages = [{"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": [{"type": "text", "text": MR}]}]
    fields = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "user": "someone", "metadata": {"run": "1"},
              "store": False, "parallel_tool_calls": False, "service_tier": "auto", "seed": 7, "n": 1, "top_p": 1.0}
    answer = client.chat.completions.create(model="e2e/lora", messages=messages, max_completion_tokens=8,
                                            temperature=0, **fields)
    assert answer.choices[0].message.content == wanted and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="e2e/lora", messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}, **fields)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == wanted
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens
    with pytest.raises(openai.BadRequestError, match="image_url parts are not supported"):
        client.chat.completions.create(model="e2e/lora", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_langchain_chat_openai_plain_and_streamed(url, chat_engine):
    wanted = greedy(chat_engine, "e2e/prefix", 8, text=MR)
    chat = ChatOpenAI(model="e2e/prefix", base_url=url, api_key=API_KEY, temperature=0, max_tokens=8,
                      frequency_penalty=0.0, presence_penalty=0.0, max_retries=0, stream_usage=True)
    messages = [SystemMessage("Answer in English."), HumanMessage(MR)]
    answer = chat.invoke(messages)
    assert answer.content == wanted and answer.usage_metadata["output_tokens"] > 0
    streamed = None
    for chunk in chat.stream([SystemMessage("Answer in English."), HumanMessage([{"type": "text", "text": MR}])]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == wanted and streamed.usage_metadata == answer.usage_metadata
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        chat.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {}}}]).invoke(messages)


def test_langchain_completions_read_the_prompt_as_is(url, chat_engine):
    """LangChain's `OpenAI` sends zero penalties, logprobs null and n; the prompt is read as is (as vLLM does)."""
    llm = OpenAI(model="e2e/lora", base_url=url, api_key=API_KEY, temperature=0, max_tokens=6, max_retries=0)
    prompt = f"Describe: {MR}"
    assert llm.invoke(prompt) == greedy(chat_engine, "e2e/lora", 6, prompt=prompt)
    assert "".join(llm.stream(prompt)) == greedy(chat_engine, "e2e/lora", 6, prompt=prompt)
