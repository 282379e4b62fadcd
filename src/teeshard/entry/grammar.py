"""Structured output: grammar-constrained decoding, held by the entry node.

The entry node already holds the tokenizer and sees every sampled token, so the
grammar and its matcher live here too. Before each step the entry computes the
tokens the grammar allows at the next position and sends that mask with the step
(``StepMsg.allowed``, one bit per token id); every hop passes it on unchanged, and
the last node applies it to its logits before sampling
(``teeshard.model.sampling.apply_allowed``). The sampled token id is still the only
thing that travels upstream, and the entry checks it against the mask it sent: a
last node that ignored the grammar is caught, not believed. A session rebuilt after a
failover needs nothing more: the matcher has not moved, and the rebuild's prefill
carries the mask for the position that was lost.

The library is llguidance (guidance-ai; it also serves vLLM's, SGLang's and
llama.cpp's structured outputs, and OpenAI's). Measured against xgrammar and
outlines-core on the test tokenizers (``benchmarks/grammar_libraries.py``, 512 and
952 tokens): a mask costs llguidance 4.3 us (median; 58 us p99), xgrammar 0.8 us,
outlines-core 0.2 us (its index is built at compile time); compiling a schema
0.3 ms, 0.8-2 ms, 1.4 ms. All are small beside a pipeline step (milliseconds), so
speed did not decide. llguidance has no Python dependencies (a 3 MB wheel), where
xgrammar pulls in triton (a 286 MB wheel) and apache-tvm-ffi, and outlines-core
compiles a schema to one regular expression: no context-free grammars and no lazy
grammars, which ``tool_choice: auto`` needs (free text until a ``<tool_call>`` tag,
then a constrained call). llguidance also bounds the work a hostile schema can cause
(its parser limits), and reports a schema it cannot compile with a message, which
becomes a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf

from teeshard.entry.errors import APIError
from teeshard.entry.structured import ResponseFormat
from teeshard.model.sampling import mask_bytes

__all__ = [
    "JSON_OPTIONS",
    "Constraint",
    "ConstraintViolation",
    "Grammar",
    "Grammars",
]

# Compact JSON with OpenAI's separators: no free whitespace, which a model (a random
# one above all) could otherwise repeat until max_tokens.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class ConstraintViolation(APIError):
    """The last node returned a token the grammar did not allow (502: a faulty node)."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, code="grammar_violation")


class Grammar:
    """A compiled, validated llguidance grammar for one tokenizer; starts matchers."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        text: str,
        vocab: int,
        special: tuple[int, ...] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self.text = text
        self.vocab = vocab
        self._special = special

    def start(self) -> Constraint:
        """A fresh matcher at the grammar's start (one per completion)."""
        matcher = llguidance.LLMatcher(self._tokenizer, self.text, log_level=0)
        if matcher.is_error():  # validated at compile time: not expected
            raise APIError(500, f"the grammar failed to start: {matcher.get_error()}")
        return Constraint(matcher, self.vocab, self._special)


class Constraint:
    """One completion's matcher: the mask for the next position, then the token sampled."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab: int, special: tuple[int, ...] = ()
    ) -> None:
        self._matcher = matcher
        self.vocab = vocab
        self._special = special  # ids llguidance treats as special tokens
        self._mask: bytes | None = None

    def allowed(self) -> bytes:
        """The next position's mask, ``ceil(vocab / 8)`` bytes, bit ``i`` for token ``i``.

        A special token whose text the grammar wants (the demo's ``<tool_call>`` is
        one added token) can show in llguidance's mask while its matcher then refuses
        to consume it (it matches special tokens only where the grammar names them as
        such): those bits are cleared, so the text is spelled with ordinary tokens."""
        if self._mask is None:
            words = self._matcher.compute_bitmask()  # little-endian u32 words: same bit order
            mask = bytearray(words[: mask_bytes(self.vocab)])
            for token in self._special:
                if mask[token >> 3] >> (token & 7) & 1 and not self._matcher.validate_tokens(
                    [token]
                ):
                    mask[token >> 3] &= ~(1 << (token & 7)) & 0xFF
            self._mask = bytes(mask)
        return self._mask

    def advance(self, token: int) -> None:
        """Take the sampled token; raise ``ConstraintViolation`` if the mask forbade it."""
        mask = self.allowed()
        if not (0 <= token < self.vocab and mask[token >> 3] >> (token & 7) & 1):
            raise ConstraintViolation(
                f"the last node sampled token {token}, which the grammar forbids"
            )
        if not self._matcher.consume_token(token):
            raise ConstraintViolation(
                f"the grammar refused token {token}: {self._matcher.get_error()}"
            )
        self._mask = None

    @property
    def finished(self) -> bool:
        """The grammar accepts and nothing can follow: the completion is whole."""
        return self._matcher.is_stopped()


class Grammars:
    """The entry's grammar compiler: the tokenizer wrapped once (about a millisecond at
    these vocabularies, a second for a large one), for the model's vocabulary size."""

    def __init__(self, hf_tokenizer: Any, vocab: int, eos_ids: Iterable[int]) -> None:
        # the end-of-sequence id the grammar allows once it accepts: the tokenizer's own,
        # else the model's first (llguidance before 1.7 takes one id only)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            eos = min(eos_ids, default=None)
        if vocab < len(hf_tokenizer):
            raise ValueError(
                f"the model's vocabulary ({vocab}) is smaller than its tokenizer's "
                f"({len(hf_tokenizer)})"
            )
        self.vocab = vocab
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab, eos_token=eos)
        # added tokens count as special for llguidance: see Constraint.allowed; a tool
        # grammar names the tags that are such tokens by name (entry/tools.py)
        special = {
            token: added.content
            for token, added in hf_tokenizer.added_tokens_decoder.items()
            if token < vocab and self.tokenizer.is_special_token(token)
        }
        self.special = tuple(sorted(special))
        self.special_names = frozenset(special.values())

    def compile(self, text: str, param: str) -> Grammar:
        """Validate an llguidance grammar; a 400 naming ``param`` if it cannot compile."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            text, self.tokenizer
        )
        if is_error:
            reason = messages[0] if messages else "invalid"
            raise APIError(400, f"{param} cannot be compiled to a grammar: {reason}", param=param)
        return Grammar(self.tokenizer, text, self.vocab, self.special)

    def json_schema(self, schema: dict[str, Any], param: str = "response_format") -> Grammar:
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema),
                overrides=JSON_OPTIONS,  # type: ignore[arg-type]
            )
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"{param}: the schema is not valid: {exc}", param=param) from None
        return self.compile(text, param)

    def lark(self, text: str, param: str) -> Grammar:
        return self.compile(llguidance.LLMatcher.grammar_from_lark(text), param)

    def response_format(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The grammar a request's ``response_format`` asks for; None for text."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return self.json_schema({"type": "object"})
        if fmt.json_schema is None:
            raise APIError(
                400,
                "response_format of type json_schema needs a json_schema object",
                param="response_format",
            )
        return self.json_schema(fmt.json_schema.schema_)
