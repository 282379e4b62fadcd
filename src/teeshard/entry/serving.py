"""Serving logic behind the OpenAI-compatible routes: prompts in, responses out.

Everything that can be refused (unknown model, bad lengths, full caches) is
refused before a stream starts, so it gets a proper HTTP status; a failure
during a stream arrives as an OpenAI error object in the stream itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from teeshard.entry.errors import APIError
from teeshard.entry.generation import Generation, GenerationParams, Generator
from teeshard.entry.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Usage,
    _Request,
    now,
)
from teeshard.transport.messages import SamplingParams


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: GenerationParams
    generation: Generation


class OpenAIServing:
    def __init__(self, generator: Generator, model_name: str) -> None:
        self.generator = generator
        self.model_name = model_name
        self.codec = generator.codec

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
        self, request: _Request, prompt_ids: list[int], max_tokens: int | None, api_key: str | None
    ) -> Prepared:
        budget = self.generator.resolve_max_tokens(len(prompt_ids), max_tokens)
        sampling = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
        )
        params = GenerationParams(
            max_tokens=budget, sampling=sampling, stop=tuple(request.stop_list)
        )
        generation = await self.generator.start(prompt_ids, params, api_key)
        return Prepared(prompt_ids, params, generation)

    # -- /v1/chat/completions ---------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, api_key: str | None = None
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt_ids = self.codec.chat_prompt(messages)
        prepared = await self._prepare(request, prompt_ids, request.requested_max_tokens, api_key)
        response_id = f"chatcmpl-{prepared.generation.request_id}"
        if request.stream:
            return self._sse(
                prepared, self._chat_chunks(prepared, response_id, request.include_usage)
            )
        text = await self._collect(prepared)
        gen = prepared.generation
        return JSONResponse(
            {
                "id": response_id,
                "object": "chat.completion",
                "created": now(),
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": gen.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(gen),
            }
        )

    async def _chat_chunks(
        self, prepared: Prepared, response_id: str, include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        created = now()

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }

        yield chunk({"role": "assistant", "content": ""}, None)
        async for delta in self.generator.stream(
            prepared.generation, prepared.prompt_ids, prepared.params
        ):
            yield chunk({"content": delta}, None)
        yield chunk({}, prepared.generation.finish_reason)
        if include_usage:
            yield {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(prepared.generation),
            }

    # -- /v1/completions --------------------------------------------------------------

    async def completions(
        self, request: CompletionRequest, api_key: str | None = None
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        prompt_ids = self.codec.completion_prompt(request.prompt_text)
        prepared = await self._prepare(request, prompt_ids, request.requested_max_tokens, api_key)
        response_id = f"cmpl-{prepared.generation.request_id}"
        prefix = request.prompt_text if request.echo else ""
        if request.stream:
            return self._sse(
                prepared,
                self._completion_chunks(prepared, response_id, prefix, request.include_usage),
            )
        text = prefix + await self._collect(prepared)
        gen = prepared.generation
        return JSONResponse(
            {
                "id": response_id,
                "object": "text_completion",
                "created": now(),
                "model": self.model_name,
                "choices": [
                    {"index": 0, "text": text, "finish_reason": gen.finish_reason, "logprobs": None}
                ],
                "usage": _usage(gen),
            }
        )

    async def _completion_chunks(
        self, prepared: Prepared, response_id: str, prefix: str, include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        created = now()

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        if prefix:
            yield chunk(prefix, None)
        async for delta in self.generator.stream(
            prepared.generation, prepared.prompt_ids, prepared.params
        ):
            yield chunk(delta, None)
        yield chunk("", prepared.generation.finish_reason)
        if include_usage:
            yield {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(prepared.generation),
            }

    # -- /generate (the original demo's endpoint) -------------------------------------

    async def generate(
        self, request: GenerateRequest, api_key: str | None = None
    ) -> dict[str, Any]:
        prompt_ids = self.codec.completion_prompt(request.prompt)
        budget = self.generator.resolve_max_tokens(len(prompt_ids), request.max_tokens)
        params = GenerationParams(
            max_tokens=budget, sampling=SamplingParams(temperature=request.temperature)
        )
        generation = await self.generator.start(prompt_ids, params, api_key)
        text = await self._collect(Prepared(prompt_ids, params, generation))
        return {"output": text, "usage": _usage(generation)}

    def _sse(self, prepared: Prepared, events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            finally:
                await self.generator.release(prepared.generation)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            # runs when the client left before the body started: the session must not linger
            background=BackgroundTask(self.generator.release, prepared.generation),
        )

    async def _collect(self, prepared: Prepared) -> str:
        parts = [
            d
            async for d in self.generator.stream(
                prepared.generation, prepared.prompt_ids, prepared.params
            )
        ]
        return "".join(parts)


def _usage(generation: Generation) -> dict[str, Any]:
    usage = Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
    ).model_dump()
    settlement = generation.settlement
    if (
        settlement is not None
        and generation.reservation is not None
        and generation.reservation.account
    ):
        usage["cost"] = settlement.cost  # in the ledger's smallest unit
        if settlement.balance is not None:
            usage["balance"] = settlement.balance
    return usage
