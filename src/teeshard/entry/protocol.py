"""OpenAI-compatible request and response models.

Requests ignore fields teeshard does not implement (as OpenAI clients send many
optional ones) but refuse values it cannot honour, such as ``n > 1``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from teeshard.model.sampling import MAX_SEED, MAX_TOP_K, check_temperature

MAX_STOP_SEQUENCES = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # extension; 0 disables
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever is sampled

    _temperature = field_validator("temperature")(check_temperature)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(_Request):
    # text, a list of one text, or (as OpenAI allows) the prompt's token ids
    prompt: str | list[str] | Annotated[list[int], Field(min_length=1)]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @property
    def prompt_token_ids(self) -> list[int] | None:
        """The prompt as token ids, when it was sent so."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            return [int(t) for t in self.prompt]
        return None

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        first = self.prompt[0]
        return first if isinstance(first, str) else ""

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default


class GenerateRequest(BaseModel):
    """The original demo's endpoint: ``{"prompt": ...}`` in, ``{"output": ...}`` out."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    prompt: str
    max_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)

    _temperature = field_validator("temperature")(check_temperature)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
