"""Serving logic behind the OpenAI-compatible routes: prompts in, responses out.

Everything that can be refused (unknown model, bad lengths or parameters, full
caches, no balance) is refused before a stream starts, so it gets a proper HTTP
status; a failure during a stream arrives as an OpenAI error object in the stream
itself. Every finished response carries the receipt chain signed by every stage: a
``receipts`` field (in a stream: on the last event) and a digest header, and
beside it the ``teeshard`` extension (request id, completion token ids) that
``teeshard.attest.response.verify_response`` checks the answer against.

Several choices (``n`` > 1, a list of prompts) are parallel sessions, one per
choice (the node's scheduler batches their steps; the prompt's prefill is not
shared: each session computes its own KV cache). Choice ``index`` is
``prompt index * n + j`` as OpenAI orders them; each is billed for its completion
and the first choice of each prompt for the prompt, so the charge is the usage
reported; each carries its own receipts (see ``teeshard.entry.choices``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from teeshard.attest import RECEIPT_DIGEST_HEADER
from teeshard.entry.choices import CHAT, COMPLETION, Shape, receipt_fields, response_digest
from teeshard.entry.errors import APIError
from teeshard.entry.generation import Generation, GenerationLoop, GenerationParams
from teeshard.entry.grammar import Grammar
from teeshard.entry.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    Usage,
    _Request,
    now,
)
from teeshard.entry.streams import SessionStream, merged, run_all
from teeshard.entry.tools import PLAIN, ChatPlan, ChatTools, ToolCallParser, finish_reason
from teeshard.model.sampling import SamplingParams, TokenLogprobs, choice_seed, session_seed

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
class PromptIn:
    """One prompt of a request: its token ids, its characters (for pricing), and the
    text ``echo`` puts before each of its completions."""

    ids: list[int]
    chars: int
    prefix: str = ""


@dataclass(frozen=True)
class Choice:
    index: int  # as OpenAI orders them: prompt index * n + j
    prompt_ids: list[int]
    params: GenerationParams
    generation: Generation
    prefix: str = ""


class OpenAIServing:
    def __init__(self, generations: GenerationLoop, model_name: str) -> None:
        self.generations = generations
        self.model_name = model_name
        self.codec = generations.codec
        self.vocab_size = generations.service.shard.spec.vocab_size
        self.tools = ChatTools(self.codec.tokenizer, self.vocab_size, generations.eos_ids)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "teeshard"}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this node serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    # -- tokenizer endpoints (vLLM's shapes) ---------------------------------------------

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        self._check_model(request.model)
        if request.messages is not None:
            tokens = self.codec.chat_prompt(
                [{"role": m.role, "content": m.text()} for m in request.messages],
                add_generation_prompt=request.add_generation_prompt,
            )
        else:
            tokens = self.codec.encode(request.prompt or "", request.add_special_tokens)
        context = self.generations.context
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(request.model)
        if any(t >= self.vocab_size for t in request.tokens):
            raise APIError(400, f"token ids must lie in [0, {self.vocab_size})", param="tokens")
        return {"prompt": self.codec.decode(request.tokens)}

    # -- completions ---------------------------------------------------------------------

    def _check(self, request: _Request, prompts: int) -> None:
        """What the request models cannot check alone: a 400 naming the field."""
        if prompts * request.n > MAX_CHOICES:
            raise APIError(
                400,
                f"n times the number of prompts is {prompts * request.n}; at most {MAX_CHOICES}",
                param="n",
            )
        too_big = [t for t, _ in request.logit_bias_pairs if t >= self.vocab_size]
        if too_big:
            raise APIError(
                400,
                f"logit_bias: token id {too_big[0]} is not in this model's vocabulary "
                f"of {self.vocab_size}",
                param="logit_bias",
            )

    async def _prepare(
        self,
        request: _Request,
        prompts: list[PromptIn],
        max_tokens: int | None,
        caller: Caller,
        grammar: Grammar | None = None,
    ) -> tuple[str, list[Choice]]:
        """Start every choice's session (each reserved and opened), or none."""
        self._check(request, len(prompts))
        base = uuid.uuid4().hex
        several = len(prompts) * request.n > 1
        # always a seed: the draws are then a function of it and the position, so a
        # session rebuilt on other nodes samples what the first one would have
        seed = session_seed(request.seed)
        choices: list[Choice] = []
        try:
            for p, prompt in enumerate(prompts):
                budget = self.generations.resolve_max_tokens(len(prompt.ids), max_tokens)
                if request.min_tokens > budget:
                    raise APIError(
                        400,
                        f"min_tokens {request.min_tokens} exceeds max_tokens {budget}",
                        param="min_tokens",
                    )
                for j in range(request.n):
                    index = p * request.n + j
                    # choice j of every prompt: the seed's j-th derivation (0: the seed)
                    sampling = self._sampling(request, choice_seed(seed, j))
                    params = GenerationParams(
                        budget,
                        sampling,
                        tuple(request.stop_list),
                        prompt.chars,
                        request.ignore_eos,
                        grammar=grammar,
                    )
                    key = caller.idempotency_key
                    if key is not None and index > 0:  # a retry maps each choice to its own
                        key = f"{key}#{index}"
                    generation = await self.generations.start(
                        prompt.ids,
                        params,
                        caller.api_key,
                        caller.body_digest,
                        key,
                        gone=caller.gone,
                        request_id=f"{base}-{index}" if several else base,
                        bill_prompt=j == 0,
                    )
                    choices.append(Choice(index, prompt.ids, params, generation, prompt.prefix))
        except BaseException:
            for started in choices:
                await self.generations.release(started.generation)
            raise
        return base, choices

    def _sampling(self, request: _Request, seed: int) -> SamplingParams:
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=max(request.top_k, 0),
            seed=seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=request.logit_bias_pairs,
            min_tokens=request.min_tokens,
            eos_token_ids=tuple(sorted(self.generations.eos_ids)) if request.min_tokens else (),
            logprobs=request.top_logprobs_count,
        )

    async def chat(
        self, request: ChatCompletionRequest, caller: Caller
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        # response_format and tools: a grammar, the tools for the template, calls to read
        plan = self.tools.plan(request) if request.constrained else PLAIN
        messages = [m.template() for m in request.messages]
        prompt = PromptIn(
            self.codec.chat_prompt(messages, tools=plan.tools),
            sum(len(m["content"]) for m in messages),
        )
        base, choices = await self._prepare(
            request, [prompt], request.requested_max_tokens, caller, plan.grammar
        )
        return await self._respond(base, choices, CHAT, request.stream, request.include_usage, plan)

    async def completions(
        self, request: CompletionRequest, caller: Caller
    ) -> JSONResponse | StreamingResponse:
        self._check_model(request.model)
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(
                400, "best_of other than n is not supported (best_of = n is)", param="best_of"
            )
        if request.echo and request.logprobs is not None:
            raise APIError(
                400,
                "logprobs with echo would need the prompt's logprobs, which teeshard does "
                "not compute",
                param="logprobs",
            )
        prompts = []
        for prompt in request.prompts:
            if isinstance(prompt, str):
                text, ids = prompt, self.codec.completion_prompt(prompt)
            else:
                text, ids = self.codec.decode(prompt), prompt
            prompts.append(PromptIn(ids, len(text), text if request.echo else ""))
        base, choices = await self._prepare(request, prompts, request.requested_max_tokens, caller)
        return await self._respond(base, choices, COMPLETION, request.stream, request.include_usage)

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
        text = await self._collect(Choice(0, prompt_ids, params, generation))
        body = {"output": text, "usage": _usage([generation]), **receipt_fields(generation)}
        return _json(body, [generation])

    # -- responses -----------------------------------------------------------------------

    async def _respond(
        self,
        base: str,
        choices: list[Choice],
        shape: Shape,
        stream: bool,
        include_usage: bool,
        plan: ChatPlan = PLAIN,
    ) -> JSONResponse | StreamingResponse:
        response_id = f"{shape.id_prefix}-{base}"
        if stream:
            return self._sse(
                choices, self._chunks(choices, shape, response_id, include_usage, plan)
            )
        if len(choices) == 1:
            texts = [await self._collect(choices[0])]
        else:  # together: the node schedulers batch their steps
            texts = await run_all([self._collect(c) for c in choices])
        several = len(choices) > 1
        gens = [c.generation for c in choices]
        body_choices = []
        for choice, text in zip(choices, texts, strict=True):
            gen = choice.generation
            logprobs = self._logprobs(shape, gen, gen.logprobs, len(choice.prefix))
            item = shape.final_choice(
                choice.index, choice.prefix + text, gen.finish_reason, logprobs
            )
            if plan.parse_tools:  # the message's content and tool calls, read from the text
                item |= plan.final_fields(text, gen.finish_reason)
            body_choices.append({**item, **receipt_fields(gen)} if several else item)
        body = {
            "id": response_id,
            "object": shape.object,
            "created": now(),
            "model": self.model_name,
            "choices": body_choices,
            "usage": _usage(gens),
        }
        return _json(body if several else {**body, **receipt_fields(gens[0])}, gens)

    def _logprobs(
        self, shape: Shape, gen: Generation, entries: list[TokenLogprobs], offset: int
    ) -> Event | None:
        if gen.sampling.logprobs is None:
            return None
        return shape.logprobs(entries, self.codec.token_text, offset)

    async def _choice_events(
        self, choice: Choice, shape: Shape, several: bool, plan: ChatPlan
    ) -> AsyncIterator[Event]:
        """One choice's stream: each delta with the logprobs of the tokens it took, then
        its finish (with its receipts when the response has several choices). With tool
        calls, the deltas are OpenAI's: content, then each call's opening (index, id,
        name) and its arguments in fragments."""
        opening = shape.opening_choice(choice.index)
        if opening is not None:
            yield opening
        if choice.prefix:
            yield shape.stream_choice(choice.index, choice.prefix, None)
        gen = choice.generation
        sent, offset = 0, len(choice.prefix)
        parser = ToolCallParser() if plan.parse_tools else None
        async for delta in self.generations.stream(gen, choice.prompt_ids, choice.params):
            if parser is not None:
                for piece in parser.feed(delta):
                    yield piece.choice(choice.index)
                continue
            entries, sent = gen.logprobs[sent:], len(gen.logprobs)
            yield shape.stream_choice(
                choice.index, delta, None, self._logprobs(shape, gen, entries, offset)
            )
            offset += sum(len(self.codec.token_text(e.token)) for e in entries)
        for piece in parser.finish() if parser is not None else ():
            yield piece.choice(choice.index)
        rest = gen.logprobs[sent:]
        finish = shape.stream_choice(
            choice.index,
            None,
            gen.finish_reason if parser is None else finish_reason(parser, gen.finish_reason),
            self._logprobs(shape, gen, rest, offset) if rest else None,
        )
        # The stream has ended, so the session is closed and its receipts are signed.
        yield {**finish, **receipt_fields(gen)} if several else finish

    async def _chunks(
        self,
        choices: list[Choice],
        shape: Shape,
        response_id: str,
        include_usage: bool,
        plan: ChatPlan,
    ) -> AsyncIterator[Event]:
        created = now()

        def event(items: list[Event]) -> Event:
            return {
                "id": response_id,
                "object": shape.chunk_object,
                "created": created,
                "model": self.model_name,
                "choices": items,
            }

        gens = [c.generation for c in choices]
        if len(choices) == 1:
            last: Event | None = None
            async for item in self._choice_events(choices[0], shape, False, plan):
                if last is not None:
                    yield last
                last = event([item])
            assert last is not None
            if include_usage:
                yield last
                last = {**event([]), "usage": _usage(gens)}
            yield {**last, **receipt_fields(gens[0])}
            return
        async for item in merged([self._choice_events(c, shape, True, plan) for c in choices]):
            yield event([item])
        if include_usage:
            yield {**event([]), "usage": _usage(gens)}

    def _sse(self, choices: list[Choice], events: AsyncIterator[Event]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for item in events:
                    yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"

        async def release() -> None:
            for choice in choices:
                await self.generations.release(choice.generation)

        return SessionStream(
            body(),
            on_close=release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _collect(self, choice: Choice) -> str:
        stream = self.generations.stream(choice.generation, choice.prompt_ids, choice.params)
        return "".join([delta async for delta in stream])


def _json(body: Event, generations: list[Generation]) -> JSONResponse:
    digest = response_digest(generations)
    headers = {RECEIPT_DIGEST_HEADER: digest.hex()} if digest is not None else {}
    return JSONResponse(body, headers=headers)


def _usage(generations: list[Generation]) -> dict[str, Any]:
    """Prompt tokens once per prompt, completion tokens summed over the choices; the
    cost is what the ledger charged for them all (the balance: with one choice)."""
    prompt = sum(
        g.prompt_tokens if g.billed_prompt_tokens is None else g.billed_prompt_tokens
        for g in generations
    )
    completion = sum(g.completion_tokens for g in generations)
    usage = Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    ).model_dump()
    settled = [
        g.settlement
        for g in generations
        if g.settlement is not None and g.reservation is not None and g.reservation.account
    ]
    if settled and len(settled) == len(generations):
        usage["cost"] = sum(s.cost for s in settled if s is not None)  # the ledger's smallest unit
        if len(settled) == 1 and settled[0] is not None and settled[0].balance is not None:
            usage["balance"] = settled[0].balance
    return usage
