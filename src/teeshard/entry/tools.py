"""Tool calls: rendered by the chat template, constrained by a grammar, parsed from text.

A model writes a call as ``<tool_call>{"name": "<function>", "arguments": {...}}
</tool_call>`` (the Hermes format many templates use; the demo and test chat templates
teach it). ``tool_choice`` decides the grammar (``teeshard.entry.grammar``):

* ``none``: no grammar, no parsing; the tools are still rendered (as vLLM does);
* ``auto``: free text, but a ``<tool_call>`` tag opens a constrained region (a lazy
  grammar): the name is one of the tools and the arguments follow its JSON schema;
* ``required``: one call or more (one with ``parallel_tool_calls`` false), nothing else;
* a named function: exactly one call of it.

``ToolCallParser`` turns the text into content and calls, incrementally, so that a
stream carries OpenAI's deltas: the call's index, id, type and name once its name is
known, then fragments of its arguments.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from teeshard.attest import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from teeshard.entry.errors import APIError
from teeshard.entry.grammar import JSON_OPTIONS, Grammar, Grammars
from teeshard.entry.protocol import ChatCompletionRequest
from teeshard.entry.structured import NamedToolChoice, ResponseFormat, Tool, ToolChoice

__all__ = [
    "CLOSE",
    "OPEN",
    "PLAIN",
    "ChatPlan",
    "ChatTools",
    "ParsedCall",
    "ToolCallParser",
    "ToolDelta",
    "chat_message",
    "finish_reason",
    "plan_chat",
    "tool_grammar",
]

# The one form calls are written in (``teeshard.attest.tool_call_text``: the verifier
# rebuilds the text of an answer's tool_calls from it).
OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
_END = "}" + CLOSE  # the wrapper's brace, then the closing tag
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]{1,64})"\s*,\s*"arguments"\s*:\s*')
_MAX_HEAD = 128  # characters after OPEN within which a call must name its function


def _tag(text: str, special: frozenset[str]) -> str:
    """A tag in the grammar: the tokenizer's special token of that name (a model whose
    vocabulary holds ``<tool_call>`` as one added token writes it so, and llguidance
    matches such a token only where the grammar names it), else the literal text."""
    return text if text in special else json.dumps(text)


def _call_rule(tools: list[Tool], special: frozenset[str] = frozenset()) -> str:
    """``call``: one well-formed call of one of ``tools``, arguments per its schema."""
    rules, names = [], []
    end = f'"}}" {_tag(CLOSE, special)}'  # the wrapper's brace, then the closing tag
    for i, tool in enumerate(tools):
        schema = {**tool.function.parameters, "x-guidance": JSON_OPTIONS}
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        rules.append(f"fn_{i}: {head} %json {json.dumps(schema)} {end}")
        names.append(f"fn_{i}")
    return "call: " + " | ".join(names) + "\n" + "\n".join(rules) + "\n"


def tool_grammar(
    tools: list[Tool],
    choice: ToolChoice,
    parallel: bool,
    special: frozenset[str] = frozenset(),
) -> tuple[str, list[Tool]] | None:
    """The Lark grammar for ``choice`` and the tools it may call; None for ``none``.

    ``special``: the tokenizer's special tokens, for tags that are one of them."""
    if choice == "none" or not tools:
        return None
    open_tag = _tag(OPEN, special)
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        return f"start: {open_tag} call\n" + _call_rule(chosen, special), chosen
    if choice == "required":
        start = "start: tc+\n" if parallel else "start: tc\n"
        return start + f"tc: {open_tag} call\n" + _call_rule(tools, special), tools
    # auto: text without the tag, or text up to the tag (the lazy rule ends on it), then
    # calls only: content first, calls after, so the answer's text is content + calls.
    # The tags stay literal text here: llguidance allows no special token in a terminal.
    open_tag, special = json.dumps(OPEN), frozenset()
    more = f" ({open_tag} call)*" if parallel else ""
    start = f"start: TAIL | tc_hd call{more}\n"
    free = (
        "TEXT: /(.|\\n)*/\n"
        f"tc_hd[lazy]: TEXT {open_tag}\n"
        f"TAIL: /(.|\\n)*/ & ~/(?s:.*){re.escape(OPEN)}(?s:.*)/\n"
    )
    return start + free + _call_rule(tools, special), tools


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # the JSON text, as OpenAI returns it
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolDelta:
    """One streamed piece: text content, or a call's opening or arguments fragment."""

    content: str | None = None
    call: ParsedCall | None = None  # the call it belongs to
    opening: bool = False  # the call's first delta (index, id, type, name)
    arguments: str = ""

    def choice(self, index: int) -> dict[str, Any]:
        """This piece as the stream's choice ``index`` delta."""
        return {"index": index, "delta": self.to_json(), "finish_reason": None, "logprobs": None}

    def to_json(self) -> dict[str, Any]:
        if self.call is None:
            return {"content": self.content}
        entry: dict[str, Any] = {"index": self.call.index}
        if self.opening:
            entry |= {
                "id": self.call.id,
                "type": "function",
                "function": {"name": self.call.name, "arguments": self.arguments},
            }
        else:
            entry["function"] = {"arguments": self.arguments}
        return {"tool_calls": [entry]}


@dataclass
class ToolCallParser:
    """Splits text into content and ``<tool_call>`` blocks as it arrives."""

    calls: list[ParsedCall] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    _buffer: str = ""
    _mode: str = "text"  # text, head (after OPEN), arguments

    def feed(self, text: str) -> list[ToolDelta]:
        self._buffer += text
        out: list[ToolDelta] = []
        while True:
            before = (self._mode, len(self._buffer))
            out += self._advance()
            if (self._mode, len(self._buffer)) == before:
                return out

    def finish(self) -> list[ToolDelta]:
        """The end of the text: what was held back (an unfinished call keeps its text)."""
        out = self.feed("")
        rest, self._buffer = self._buffer, ""
        if self._mode == "arguments" and rest:
            call = self.calls[-1]
            call.arguments += rest
            out.append(ToolDelta(call=call, arguments=rest))
        elif rest:
            text = OPEN + rest if self._mode == "head" else rest
            self.content.append(text)
            out.append(ToolDelta(content=text))
        return out

    @property
    def text(self) -> str:
        return "".join(self.content)

    def _advance(self) -> list[ToolDelta]:
        if self._mode == "text":
            cut = self._buffer.find(OPEN)
            if cut >= 0:
                text, self._buffer = self._buffer[:cut], self._buffer[cut + len(OPEN) :]
                self._mode = "head"
            else:  # hold back what could be the start of the tag
                hold = max(
                    (k for k in range(1, len(OPEN)) if self._buffer.endswith(OPEN[:k])), default=0
                )
                text = self._buffer[: len(self._buffer) - hold]
                self._buffer = self._buffer[len(text) :]
            if not text:
                return []
            self.content.append(text)
            return [ToolDelta(content=text)]
        if self._mode == "head":
            match = _HEAD.match(self._buffer)
            if match is not None and match.end() == len(self._buffer):
                match = None  # the whitespace before the arguments may go on
            if match is None:
                if len(self._buffer) > _MAX_HEAD:  # not a call after all: plain text
                    self._mode = "text"
                    self.content.append(OPEN)
                    return [ToolDelta(content=OPEN)]
                return []
            call = ParsedCall(len(self.calls), f"call_{secrets.token_hex(12)}", match.group(1))
            self.calls.append(call)
            self._buffer, self._mode = self._buffer[match.end() :], "arguments"
            return [ToolDelta(call=call, opening=True)]
        return self._arguments()

    def _arguments(self) -> list[ToolDelta]:
        call = self.calls[-1]
        start = 0
        while (end := self._buffer.find(_END, start)) >= 0:
            candidate = call.arguments + self._buffer[:end]
            if _is_json(candidate):  # not an _END inside a string of the arguments
                piece = self._buffer[:end]
                call.arguments, call.complete = candidate, True
                self._buffer, self._mode = self._buffer[end + len(_END) :], "text"
                return [ToolDelta(call=call, arguments=piece)] if piece else []
            start = end + 1
        emit = max(0, len(self._buffer) - len(_END))  # the wrapper's end is never emitted
        if emit == 0:
            return []
        piece, self._buffer = self._buffer[:emit], self._buffer[emit:]
        call.arguments += piece
        return [ToolDelta(call=call, arguments=piece)]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# -- a chat request's plan, and its answer ---------------------------------------------


@dataclass(frozen=True)
class ChatPlan:
    """What a chat request's ``response_format`` and ``tools`` ask of its generation."""

    grammar: Grammar | None = None  # None: unconstrained
    tools: list[dict[str, Any]] | None = None  # for the chat template; None: no tools
    parse_tools: bool = False  # read tool calls out of the text

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser() if self.parse_tools else None

    def final_fields(self, text: str, finish: str | None) -> dict[str, Any]:
        """A finished choice's message and finish reason, when tool calls are read."""
        parser = self.parser()
        if parser is None:
            return {}
        parser.feed(text)
        parser.finish()
        return {"message": chat_message(parser), "finish_reason": finish_reason(parser, finish)}


PLAIN = ChatPlan()  # no response_format, no tools


class ChatTools:
    """The entry's structured output: the grammar compiler, made on first use (it wraps
    the tokenizer once), and each chat request's plan."""

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: Iterable[int]) -> None:
        self._args = (tokenizer, vocab, set(eos_ids))
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            try:
                self._grammars = Grammars(*self._args)
            except ValueError as exc:  # a slow (not Rust) tokenizer, a vocabulary mismatch
                raise APIError(400, f"structured output is not available: {exc}") from None
        return self._grammars

    def plan(self, request: ChatCompletionRequest) -> ChatPlan:
        return plan_chat(
            self.grammars,
            request.response_format,
            request.tools,
            request.tool_choice,
            request.parallel_tool_calls,
        )


def plan_chat(
    grammars: Grammars,
    response_format: ResponseFormat | None,
    tools: list[Tool] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
) -> ChatPlan:
    """The grammar and template input of a chat request, or a 400 naming the field."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ChatPlan(grammar=grammars.response_format(response_format))
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: each function name once", param="tools")
    choice: ToolChoice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names {choice.function.name!r}, not one of the tools",
            param="tool_choice",
        )
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ChatPlan(grammar=grammars.response_format(response_format), tools=rendered)
    if response_format is not None and response_format.type != "text":
        raise APIError(
            400,
            "response_format with tools is supported only with tool_choice none",
            param="response_format",
        )
    rule = tool_grammar(tools, choice, parallel_tool_calls is not False, grammars.special_names)
    assert rule is not None
    return ChatPlan(grammars.lark(rule[0], "tools"), rendered, parse_tools=True)


def chat_message(parser: ToolCallParser) -> dict[str, Any]:
    """The assistant message of a finished answer read by ``parser``."""
    message: dict[str, Any] = {"role": "assistant", "content": parser.text}
    if parser.calls:
        message["content"] = parser.text or None
        message["tool_calls"] = [c.to_json() for c in parser.calls]
    return message


def finish_reason(parser: ToolCallParser | None, finish: str | None) -> str | None:
    """``tool_calls`` for an answer that ended (not cut) with calls, as OpenAI says it."""
    if parser is not None and parser.calls and finish == "stop":
        return "tool_calls"
    return finish
