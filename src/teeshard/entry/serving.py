"""Serving logic behind the OpenAI-compatible routes: prompts in, responses out.

Everything that can be refused (unknown model, bad lengths, full caches, no
balance) is refused before a stream starts, so it gets a proper HTTP status; a
failure during a stream arrives as an OpenAI error object in the stream itself.
Every finished response carries the receipt chain signed by every stage: a
``receipts`` field (in a stream: on the last event) and a digest header, and
beside it the ``teeshard`` extension (request id, completion token ids) that
``teeshard.attest.response.verify_response`` checks the answer against.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from teeshard.attest import (
    EXTENSION_FIELD,
    RECEIPT_DIGEST_HEADER,
    RECEIPTS_FIELD,
    SEGMENTS_FIELD,
    chain_digest,
    response_extension,
)
from teeshard.entry.errors import APIError
from teeshard.entry.generation import Generation, GenerationLoop, GenerationParams
from teeshard.entry.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Usage,
    _Request,
    now,
)
from teeshard.model.sampling import SamplingParams, session_seed

Event = dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """Who asked, and exactly what: the bearer key, the SHA-256 of the request body, and
    the client's ``Idempotency-Key`` (a retry with the same key is not charged twice)."""

    api_key: str | None = None
    body_digest: bytes | None = None
    idempotency_key: str | None = None
    gone: Callable[[], Awaitable[bool]] | None = None  # True once the client disconnected


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: GenerationParams
    generation: Generation


@dataclass(frozen=True)
class _Shape:
    """How one endpoint spells its responses."""

    id_prefix: str
    object: str
    chunk_object: str
    final_choice: Callable[[str, str | None], Event]
    stream_choice: Callable[[str | None, str | None], Event]  # (text or None, finish)
    opening_choice: Event | None = None  # chat streams open with the assistant role


CHAT = _Shape(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    final_choice=lambda text, finish: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
        "logprobs": None,
    },
    stream_choice=lambda text, finish: {
        "index": 0,
        "delta": {"content": text} if text is not None else {},
        "finish_reason": finish,
        "logprobs": None,
    },
    opening_choice={
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": None,
        "logprobs": None,
    },
)
COMPLETION = _Shape(
    "cmpl",
    "text_completion",
    "text_completion",
    final_choice=lambda text, finish: {
        "index": 0,
        "text": text,
        "finish_reason": finish,
        "logprobs": None,
    },
    stream_choice=lambda text, finish: {
        "index": 0,
        "text": text or "",
        "finish_reason": finish,
        "logprobs": None,
    },
)


class OpenAIServing:
    def __init__(self, generations: GenerationLoop, model_name: str) -> None:
        self.generations = generations
        self.model_name = model_name
        self.codec = generations.codec

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "teeshard"}
            ],
        }

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this node serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    async def _prepare(
        self,
        request: _Request,
        prompt_ids: list[int],
        max_tokens: int | None,
        caller: Caller,
        prompt_chars: int,
    ) -> Prepared:
        budget = self.generations.resolve_max_tokens(len(prompt_ids), max_tokens)
        sampling = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            # always a seed: the draws are then a function of it and the position, so a
            # session rebuilt on other nodes samples what the first one would have
            seed=session_seed(request.seed),
        )
        params = GenerationParams(
            budget, sampling, tuple(request.stop_list), prompt_chars, request.ignore_eos
        )
        generation = await self.generations.start(
            prompt_ids,
            params,
            caller.api_key,
            caller.body_digest,
            caller.idempotency_key,
            gone=caller.gone,
        )
        return Prepared(prompt_ids, params, generation)

    async def chat(
        self, request: ChatCompletionRequest, caller: Caller
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt_ids = self.codec.chat_prompt(messages)
        chars = sum(len(m["content"]) for m in messages)
        prepared = await self._prepare(
            request, prompt_ids, request.requested_max_tokens, caller, chars
        )
        return await self._respond(prepared, CHAT, request.stream, request.include_usage)

    async def completions(
        self, request: CompletionRequest, caller: Caller
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        token_ids = request.prompt_token_ids
        text = self.codec.decode(token_ids) if token_ids is not None else request.prompt_text
        prompt_ids = token_ids or self.codec.completion_prompt(text)
        prepared = await self._prepare(
            request, prompt_ids, request.requested_max_tokens, caller, len(text)
        )
        prefix = text if request.echo else ""
        return await self._respond(
            prepared, COMPLETION, request.stream, request.include_usage, prefix
        )

    async def generate(self, request: GenerateRequest, caller: Caller) -> JSONResponse:
        """The original demo's endpoint: ``{"prompt"}`` in, ``{"output"}`` out."""
        prompt_ids = self.codec.completion_prompt(request.prompt)
        budget = self.generations.resolve_max_tokens(len(prompt_ids), request.max_tokens)
        # a seed always, as in _prepare: a session rebuilt after a failover samples alike
        sampling = SamplingParams(temperature=request.temperature, seed=session_seed(None))
        params = GenerationParams(budget, sampling, prompt_chars=len(request.prompt))
        generation = await self.generations.start(
            prompt_ids,
            params,
            caller.api_key,
            caller.body_digest,
            caller.idempotency_key,
            gone=caller.gone,
        )
        text = await self._collect(Prepared(prompt_ids, params, generation))
        return _with_receipts({"output": text, "usage": _usage(generation)}, generation)

    async def _respond(
        self, prepared: Prepared, shape: _Shape, stream: bool, include_usage: bool, prefix: str = ""
    ) -> JSONResponse | StreamingResponse:
        response_id = f"{shape.id_prefix}-{prepared.generation.request_id}"
        if stream:
            return self._sse(
                prepared, self._chunks(prepared, shape, response_id, include_usage, prefix)
            )
        text = prefix + await self._collect(prepared)
        gen = prepared.generation
        body = {
            "id": response_id,
            "object": shape.object,
            "created": now(),
            "model": self.model_name,
            "choices": [shape.final_choice(text, gen.finish_reason)],
            "usage": _usage(gen),
        }
        return _with_receipts(body, gen)

    async def _chunks(
        self, prepared: Prepared, shape: _Shape, response_id: str, include_usage: bool, prefix: str
    ) -> AsyncIterator[Event]:
        created = now()

        def event(choices: list[Event]) -> Event:
            return {
                "id": response_id,
                "object": shape.chunk_object,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }

        if shape.opening_choice is not None:
            yield event([shape.opening_choice])
        if prefix:
            yield event([shape.stream_choice(prefix, None)])
        gen = prepared.generation
        async for delta in self.generations.stream(gen, prepared.prompt_ids, prepared.params):
            yield event([shape.stream_choice(delta, None)])
        # The stream has ended, so the session is closed and its receipts are signed.
        last = event([shape.stream_choice(None, gen.finish_reason)])
        if include_usage:
            yield last
            last = {**event([]), "usage": _usage(gen)}
        yield _receipt_fields(last, gen)

    def _sse(self, prepared: Prepared, events: AsyncIterator[Event]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for item in events:
                    yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"

        return _SessionStream(
            body(),
            on_close=lambda: self.generations.release(prepared.generation),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _collect(self, prepared: Prepared) -> str:
        stream = self.generations.stream(prepared.generation, prepared.prompt_ids, prepared.params)
        return "".join([delta async for delta in stream])


class _SessionStream(StreamingResponse):
    """A stream whose generation is released however the response ends.

    A client that goes away mid-stream surfaces as a failed send or a cancelled
    task, and the body's generator is then left suspended until garbage
    collection: its own cleanup cannot be relied on. This runs ``on_close`` in the
    request's task once the response is over (idempotent: a generation that
    finished was released already, and settled).
    """

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _receipt_fields(body: Event, generation: Generation) -> Event:
    """The receipts of the answer. ``receipts`` is the chain of the route that finished
    it; after a failover, ``receipt_segments`` holds every route's chain in order with
    the completion tokens it produced, and the digest covers them all."""
    if not generation.receipts:
        return body
    fields: Event = {
        RECEIPTS_FIELD: [r.to_json() for r in generation.receipts],
        "receipt_digest": _digest(generation).hex(),
        EXTENSION_FIELD: response_extension(generation.request_id, generation.token_ids),
        "served_by": list(generation.served_by),  # node ids of the stages, as the entry knows them
    }
    if generation.segments:
        fields[SEGMENTS_FIELD] = [s.to_json() for s in generation.segments]
    return {**body, **fields}


def _digest(generation: Generation) -> bytes:
    if generation.segments:
        return chain_digest([r for s in generation.segments for r in s.receipts])
    return chain_digest(generation.receipts)


def _with_receipts(body: Event, generation: Generation) -> JSONResponse:
    headers = {}
    if generation.receipts:
        headers[RECEIPT_DIGEST_HEADER] = _digest(generation).hex()
    return JSONResponse(_receipt_fields(body, generation), headers=headers)


def _usage(generation: Generation) -> dict[str, Any]:
    usage = Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
    ).model_dump()
    settlement, reservation = generation.settlement, generation.reservation
    if settlement is not None and reservation is not None and reservation.account:
        usage["cost"] = settlement.cost  # in the ledger's smallest unit
        if settlement.balance is not None:
            usage["balance"] = settlement.balance
    return usage
