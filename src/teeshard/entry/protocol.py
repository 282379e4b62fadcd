"""OpenAI-compatible request and response models.

No field is ever silently ignored. Every field of OpenAI's chat and completions
request schemas is either implemented or declared here as refused: a request that
sets it (to anything but null or a value that asks for nothing, such as
``store: false``) gets a 400 whose ``param`` names it. A field that is neither
OpenAI's nor one of teeshard's documented extensions (``EXTENSIONS``) is refused
the same way (``extra="forbid"``). ``null`` means "not given" for every top-level
field, as in OpenAI's API.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from teeshard.entry.structured import MAX_TOOLS, ResponseFormat, Tool, ToolCall, ToolChoice
from teeshard.model.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_TOP_K,
    check_temperature,
)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n times the prompts of one request: each is a session on every node
# teeshard's own request fields beyond OpenAI's (as vLLM has them)
EXTENSIONS = ("top_k", "ignore_eos", "repetition_penalty", "min_tokens")


def _refuse(value: object) -> object:
    if value is not None:
        raise PydanticCustomError(
            "unsupported_field", "teeshard does not support this field; leave it out"
        )
    return value


# A field of OpenAI's schema that teeshard does not implement: refused unless null.
Unsupported = Annotated[Any, AfterValidator(_refuse)]


def _only(*allowed: object) -> AfterValidator:
    """Refused unless null or one of the values that ask for nothing teeshard lacks."""

    def check(value: object) -> object:
        if value is not None and value not in allowed:
            raise PydanticCustomError(
                "unsupported_value",
                "teeshard supports only {allowed} here",
                {"allowed": ", ".join(repr(a) for a in allowed)},
            )
        return value

    return AfterValidator(check)


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(StrictRequest):
    include_usage: bool = False
    include_obfuscation: Annotated[bool | None, _only(False)] = None


class _Request(StrictRequest):
    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # token id (as text, OpenAI's spelling) -> bias added to its logit
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None  # an end-user id for the operator; no effect, never logged
    # -- extensions (vLLM's) --
    top_k: int = Field(default=0, ge=-1, le=MAX_TOP_K)  # 0 or -1 disable
    ignore_eos: bool = False  # generate max_tokens whatever is sampled
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)  # 1 disables
    min_tokens: int = Field(default=0, ge=0)  # end-of-sequence held back before this many

    _temperature = field_validator("temperature")(check_temperature)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases lie in [-100, 100], got {value} for token {key}")
        return bias

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's logprobs list; None: no logprobs."""
        raise NotImplementedError


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: Unsupported = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant
    tool_call_id: str | None = None  # a tool message: the call it answers
    function_call: Unsupported = None
    refusal: Unsupported = None
    audio: Unsupported = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages make tool calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, carry the tool_call_id they answer")
        return self

    def template(self) -> dict[str, Any]:
        """The message as chat templates take it (transformers' convention): a call's
        arguments as a mapping when they are a JSON object, a tool result's call id."""
        item: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            item["tool_calls"] = [c.template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            item["tool_call_id"] = self.tool_call_id
        return item


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    store: Annotated[bool | None, _only(False)] = None
    service_tier: Annotated[str | None, _only("auto", "default")] = None
    modalities: Annotated[list[str] | None, _only(["text"])] = None
    # OpenAI fields teeshard does not implement: a 400 naming the field
    audio: Unsupported = None
    function_call: Unsupported = None
    functions: Unsupported = None
    metadata: Unsupported = None
    moderation: Unsupported = None
    prediction: Unsupported = None
    prompt_cache_key: Unsupported = None
    prompt_cache_options: Unsupported = None
    prompt_cache_retention: Unsupported = None
    reasoning_effort: Unsupported = None
    safety_identifier: str | None = None  # like user: an id for the operator, no effect
    verbosity: Unsupported = None
    web_search_options: Unsupported = None
    # structured output and tool calls (teeshard.entry.grammar, teeshard.entry.tools)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def constrained(self) -> bool:
        """Structured output or tools asked for: the request needs a plan (entry.tools)."""
        return self.response_format is not None or bool(self.tools) or self.tool_choice is not None

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Request):
    # text, a list of texts, the token ids of one prompt, or a list of token-id prompts
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: Unsupported = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        out: list[str | list[int]] = []
        for item in prompt:
            if isinstance(item, int):  # one prompt as token ids
                return [[int(t) for t in prompt if isinstance(t, int)]]
            out.append(item if isinstance(item, str) else [int(t) for t in item])
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class GenerateRequest(BaseModel):
    """The original demo's endpoint: ``{"prompt": ...}`` in, ``{"output": ...}`` out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str
    max_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)

    _temperature = field_validator("temperature")(check_temperature)


class TokenizeRequest(StrictRequest):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("one_input", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictRequest):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


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
