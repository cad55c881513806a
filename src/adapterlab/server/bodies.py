"""The request bodies of the HTTP API (pydantic models; unknown fields are refused)."""

from pydantic import BaseModel, ConfigDict, Field


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

