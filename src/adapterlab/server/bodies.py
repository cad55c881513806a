"""The request bodies of the HTTP API and of its OpenAI-compatible routes (pydantic models; unknown fields are
refused)."""

from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class TextInput(Body):
    text: str
    text_pair: str | None = None


class ClassifyBody(Body):
    adapter: str | None = Field(None, description="TASK/NAME in the store; null: zero-shot with `labels`.")
    inputs: list[str | TextInput] = Field(min_length=1)
    labels: list[str] | None = Field(None, description="Zero-shot labels (with adapter null).")
    top_k: int | None = Field(None, ge=1, description="Only the k best scores per input.")


class BatchRow(Body):
    adapter: str | None = None
    text: str
    text_pair: str | None = None
    labels: list[str] | None = None


class BatchBody(Body):
    rows: list[BatchRow] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)


class GenerateBody(Body):
    adapter: str | None = Field(None, description="A LoRA or prefix adapter of the LLM; null: the bare backbone.")
    prompt: str
    max_new_tokens: int = Field(32, ge=1)


class RegisterBody(Body):
    path: str = Field(description="TASK/NAME of an adapter folder already copied into the store.")


# --- the OpenAI-compatible routes ----------------------------------------------------------------
# Every field of OpenAI's completion and chat schemas is known (a misspelt one is refused, as OpenAI does).
# Those that change the answer are honoured, or refused by `refusal` with a message naming the field; those
# that do not (billing, caching, storage, identity hints) are accepted and ignored.
NO_TOOLS = "these models do not call tools"
NO_LOGPROBS = "the decoder does not report token probabilities"


class OpenAIModel(Body):
    """A part of OpenAI's schemas."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """null is 'the default' in OpenAI's schemas."""
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class StreamOptions(OpenAIModel):
    include_usage: bool = False  # a last chunk with the usage
    include_obfuscation: bool = False  # ignored: no obfuscation is sent


class AdapterlabOptions(OpenAIModel):
    template: bool | None = Field(None, description="Fill the request's text into the generative adapter's "
                                  "template, as it was trained: by default for a chat (its last user message), "
                                  "not for a completion (the prompt read as is). false: the chat as sent.")


class OpenAIBody(OpenAIModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] = []
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] = {}
    user: str | None = None
    adapterlab: AdapterlabOptions = Field(AdapterlabOptions(), description="adapterlab's own options.")

    def refusal(self) -> str | None:
        """Why the server cannot answer as asked (naming the field), or None."""
        return next(self.problems(), None)

    def problems(self) -> Iterator[str]:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                yield (f"{name} {getattr(self, name)} is not supported: the decoder applies no repetition "
                       "penalty; send 0 or leave it out")
        if self.logit_bias:
            yield "logit_bias is not supported: the decoder does not bias tokens; leave it out"

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(OpenAIBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if not self.prompt:
            yield "prompt is empty"
        if any(not isinstance(prompt, str) for prompt in self.prompts()):
            yield "prompt as token ids is not supported: send text"
        if self.best_of not in (None, self.n):
            yield f"best_of {self.best_of} is not supported: the server does not rank choices; send n alone"
        if self.logprobs is not None:
            yield f"logprobs is not supported: {NO_LOGPROBS}"
        if self.suffix:
            yield "suffix is not supported: these models do not fill in the middle"

    def prompts(self) -> list:
        """The prompts (each answered with n choices)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ContentPart(Body):
    model_config = ConfigDict(extra="allow")  # image_url, input_audio, file, cache breakpoints: read by `problem`
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal

    def problem(self) -> str | None:
        if self.type not in ("text", "refusal"):
            return f"{self.type} parts are not supported: these models read text"
        if getattr(self, self.type) is None:
            return f"a {self.type} part needs its {self.type}"
        return None


class Message(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored, as by most chat templates
    refusal: str | None = None
    tool_calls: list[dict] = []
    tool_call_id: str | None = None
    function_call: dict | None = None
    audio: dict | None = None

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content")
        return self

    def problem(self) -> str | None:
        if self.role in ("tool", "function"):
            return f"the {self.role} role is not supported: {NO_TOOLS}"
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(self, name):
                return f"{name} is not supported: " + (NO_TOOLS if name != "audio" else "these models write text")
        parts = self.content if isinstance(self.content, list) else ()
        return next((f"content[{i}]: {part.problem()}" for i, part in enumerate(parts) if part.problem()), None)

    def text(self) -> str:
        """The content as one text: text parts joined by newlines (as vLLM does)."""
        if not isinstance(self.content, list):
            return self.content or self.refusal or ""
        return "\n".join(getattr(part, part.type) for part in self.content)

    def turn(self) -> dict:
        """The message as the chat template reads it: a developer message is a system one."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatBody(OpenAIBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    response_format: ResponseFormat = ResponseFormat(type="text")
    tools: list[dict] = []
    tool_choice: str | dict = "none"
    functions: list[dict] = []
    function_call: str | dict = "none"
    parallel_tool_calls: bool | None = None
    audio: dict | None = None
    modalities: list[Literal["text", "audio"]] = ["text"]
    verbosity: Literal["low", "medium", "high"] = "medium"
    web_search_options: dict | None = None
    moderation: dict | None = None
    reasoning_effort: str | None = None  # these models do not reason: every effort is the same answer
    prediction: dict | None = None  # a predicted output only speeds an answer up; ignored
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.logprobs or self.top_logprobs:
            yield f"{'logprobs' if self.logprobs else 'top_logprobs'} is not supported: {NO_LOGPROBS}"
        if self.response_format.type != "text":
            yield (f"response_format {self.response_format.type} is not supported: the decoder does not "
                   "constrain its output")
        for name, unused in (("tools", []), ("tool_choice", "none"), ("functions", []), ("function_call", "none")):
            if getattr(self, name) not in (unused, "auto"):
                yield f"{name} is not supported: {NO_TOOLS}"
        if self.audio is not None or "audio" in self.modalities:
            name = "audio" if self.audio is not None else "modalities audio"
            yield f"{name} is not supported: these models write text"
        if self.verbosity != "medium":
            yield f"verbosity {self.verbosity} is not supported: the decoder has one verbosity"
        for name, why in (("web_search_options", "this server does not search the web"),
                          ("moderation", "this server moderates nothing")):
            if getattr(self, name) is not None:
                yield f"{name} is not supported: {why}"
        yield from (f"messages[{i}]: {m.problem()}" for i, m in enumerate(self.messages) if m.problem())

    def last_user_text(self) -> str | None:
        """The text of the last user message (what an adapter's template or a classifier reads), if any."""
        return next((message.text() for message in reversed(self.messages) if message.role == "user"), None)
