"""Text in and out of the model: prompts to token ids, token ids to streamed text.

Only the entry node ever holds plaintext; this module is imported nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teeshard.entry.errors import APIError

# Tokens of the prompt kept as context when decoding the first generated tokens,
# so that a SentencePiece word boundary ("▁word") decodes to " word" mid-text.
_DECODE_CONTEXT = 5


class TextCodec:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy import; only the entry node needs it

        model_dir = Path(model_dir)
        if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(
                f"no tokenizer (tokenizer.json or tokenizer.model) in {model_dir}: "
                "the entry node needs the model's tokenizer files"
            )
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The prompt's token ids; ``tools`` (OpenAI's shape) rendered by the template."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(
                400, "this model has no chat template; use /v1/completions", code="no_chat_template"
            )
        if tools and "tools" not in str(template):  # it would drop them without a word
            raise APIError(400, "this model's chat template does not render tools", param="tools")
        try:
            rendered = self.tokenizer.apply_chat_template(
                list(messages),
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                tools=tools or None,
            )
        except Exception as exc:  # template errors (e.g. role order) come from jinja
            raise APIError(
                400, f"chat template rejected the messages: {exc}", param="messages"
            ) from None
        # The template already places any BOS token, as transformers does when it tokenizes.
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def completion_prompt(self, prompt: str) -> list[int]:
        return self.encode(prompt, add_special_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def token_text(self, token: int) -> str:
        """One token's own text (for logprobs), special tokens spelled out."""
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return set() if eos is None else {int(eos)}


class IncrementalDecoder:
    """Turns generated token ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, codec: TextCodec, prompt_ids: Sequence[int]) -> None:
        self.codec = codec
        self.ids = list(prompt_ids[-_DECODE_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.codec.decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character or a token with no text yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts the output at the first stop sequence, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
