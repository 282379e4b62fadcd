"""Tool calls: the grammar for each tool_choice, and the parser that turns text (whole
or streamed in any pieces) into content and calls."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from teeshard.attest import tool_call_text
from teeshard.entry.grammar import Grammars
from teeshard.entry.structured import NamedToolChoice, Tool
from teeshard.entry.tools import ToolCallParser, tool_grammar
from teeshard.model.sampling import unpack_allowed

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    Tool.model_validate(
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    ),
    Tool.model_validate({"type": "function", "function": {"name": "get_time", "parameters": TIME}}),
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def grammars(hf: Any) -> Grammars:
    return Grammars(hf, len(hf), {hf.eos_token_id})


def generate(hf: Any, grammars: Grammars, lark: str, seed: int, prefix: str = "") -> str:
    constraint = grammars.lark(lark, "tools").start()
    ids = hf.encode(prefix, add_special_tokens=False) if prefix else []
    for token in ids:
        constraint.advance(token)
    rng = random.Random(seed)
    for _ in range(3000):
        allowed = unpack_allowed(constraint.allowed(), constraint.vocab)
        token = rng.choice(allowed.nonzero().flatten().tolist())
        constraint.advance(token)
        if token == hf.eos_token_id:
            break
        ids.append(token)
        if constraint.finished:
            break
    else:
        pytest.fail("the grammar never ended")
    return str(hf.decode(ids))


def parse(text: str, pieces: int = 1, seed: int = 0) -> ToolCallParser:
    """Feed ``text`` in ``pieces`` random cuts (1: whole); the deltas must rebuild it."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces - 1, len(text) - 1)))
    parser = ToolCallParser()
    deltas = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        deltas += parser.feed(text[a:b])
    deltas += parser.finish()
    content = "".join(d.content or "" for d in deltas if d.call is None)
    assert content == parser.text
    for call in parser.calls:
        mine = [d for d in deltas if d.call is call]
        assert mine[0].opening and sum(d.opening for d in mine) == 1
        assert "".join(d.arguments for d in mine) == call.arguments
    return parser


def canonical(parser: ToolCallParser) -> str:
    """The text the verifier rebuilds from content and calls."""
    return parser.text + "".join(tool_call_text(c.name, c.arguments) for c in parser.calls)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_name_a_tool_and_their_arguments_follow_its_schema(
    hf: Any, grammars: Grammars, parallel: bool
) -> None:
    rule = tool_grammar(TOOLS, "required", parallel)
    assert rule is not None
    for seed in range(15):
        text = generate(hf, grammars, rule[0], seed)
        parser = parse(text, pieces=7, seed=seed)
        assert parser.calls and parser.text == "" and canonical(parser) == text
        assert parallel or len(parser.calls) == 1
        for call in parser.calls:
            assert call.complete and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_a_named_choice_calls_that_function_once(hf: Any, grammars: Grammars) -> None:
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    rule = tool_grammar(TOOLS, choice, True)
    assert rule is not None and [t.function.name for t in rule[1]] == ["get_time"]
    for seed in range(10):
        text = generate(hf, grammars, rule[0], seed)
        parser = parse(text)
        assert [c.name for c in parser.calls] == ["get_time"] and canonical(parser) == text
        jsonschema.validate(json.loads(parser.calls[0].arguments), TIME)


def test_auto_leaves_text_free_until_the_tag_then_forces_a_valid_call(
    hf: Any, grammars: Grammars
) -> None:
    rule = tool_grammar(TOOLS, "auto", True)
    assert rule is not None
    constraint = grammars.lark(rule[0], "tools").start()
    for token in hf.encode("Any words at all, 42!", add_special_tokens=False):
        constraint.advance(token)  # free text is allowed
    for seed in range(10):
        text = generate(hf, grammars, rule[0], seed, prefix="Let me check. <tool_call>")
        parser = parse(text, pieces=5, seed=seed)
        assert parser.text == "Let me check. " and parser.calls and canonical(parser) == text
        for call in parser.calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_none_has_no_grammar() -> None:
    assert tool_grammar(TOOLS, "none", True) is None
    assert tool_grammar([], "auto", True) is None


def test_the_parser_splits_content_and_calls_fed_in_any_pieces() -> None:
    args = {"note": 'a "}</tool_call>" inside a string', "n": [1, {"x": 2}]}
    text = (
        "Sure. <tool_call>"
        + json.dumps({"name": "f", "arguments": args})
        + '</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    )
    for pieces in (1, 3, 11, len(text)):
        parser = parse(text, pieces, seed=pieces)
        assert parser.text == "Sure. \n"
        assert [c.name for c in parser.calls] == ["f", "g"]
        assert json.loads(parser.calls[0].arguments) == args and parser.calls[1].arguments == "{}"
        assert parser.calls[0].index == 0 and parser.calls[1].index == 1


def test_text_that_only_looks_like_a_call_stays_content() -> None:
    for text in ("a <tool_ca", "x <tool_call> not json at all " + "z" * 200, "1 < 2 <tool"):
        parser = parse(text, pieces=4)
        assert parser.calls == [] and parser.text == text


def test_an_unfinished_call_keeps_its_arguments_text() -> None:
    parser = parse('<tool_call>{"name": "f", "arguments": {"a": "unfinish', pieces=3)
    assert len(parser.calls) == 1 and not parser.calls[0].complete
    assert parser.calls[0].arguments == '{"a": "unfinish'


def test_a_tag_that_is_one_token_of_the_vocabulary_is_named_as_that_token() -> None:
    """The demo's tokenizer holds ``<tool_call>`` as one added token, which llguidance
    treats as special: a literal "<tool_call>" in the grammar showed that token in the
    mask and then refused it (a 502 on every required call). Named as the token, the
    call opens with it and its arguments still follow the schema."""
    import transformers

    from teeshard.model.demo import ensure_demo

    demo = transformers.AutoTokenizer.from_pretrained(str(ensure_demo()))
    grammars = Grammars(demo, len(demo), {demo.eos_token_id})
    open_id = demo.convert_tokens_to_ids("<tool_call>")
    assert open_id in grammars.special and "<tool_call>" in grammars.special_names
    rule = tool_grammar(TOOLS, "required", False, grammars.special_names)
    assert rule is not None
    constraint = grammars.lark(rule[0], "tools").start()
    assert unpack_allowed(constraint.allowed(), len(demo))[open_id]
    constraint.advance(open_id)  # refused before: "the grammar refused token ..."
    for seed in range(8):
        text = generate(demo, grammars, rule[0], seed)
        parser = parse(text, pieces=5, seed=seed)
        assert len(parser.calls) == 1 and canonical(parser) == text
        call = parser.calls[0]
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
