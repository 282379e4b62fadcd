"""The entry's grammar: masks for the model's vocabulary, a matcher that follows the
tokens, schemas that cannot compile refused as a 400 naming the field."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from teeshard.entry.errors import APIError
from teeshard.entry.grammar import Constraint, ConstraintViolation, Grammars
from teeshard.entry.structured import ResponseFormat
from teeshard.model.sampling import unpack_allowed

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
EXTRA = 5  # the model's vocabulary is padded past the tokenizer's, as many checkpoints are


@pytest.fixture(scope="module")
def grammars(hf: Any) -> Grammars:
    return Grammars(hf, len(hf) + EXTRA, {hf.eos_token_id})


def walk(hf: Any, constraint: Constraint, seed: int, steps: int = 200) -> tuple[str, bool]:
    """Draw uniformly among the allowed tokens; (text, ended by the grammar or EOS)."""
    rng, ids = random.Random(seed), []
    for _ in range(steps):
        allowed = unpack_allowed(constraint.allowed(), constraint.vocab)  # (vocab,) bool
        assert not allowed[len(hf) :].any()  # never a token the tokenizer lacks
        token = rng.choice(allowed.nonzero().flatten().tolist())
        constraint.advance(token)
        if token == hf.eos_token_id:
            return hf.decode(ids), True
        ids.append(token)
        if constraint.finished:
            return hf.decode(ids), True
    return hf.decode(ids), False


def test_every_walk_through_a_schema_grammar_is_valid_json_of_that_schema(
    hf: Any, grammars: Grammars
) -> None:
    grammar = grammars.json_schema(SCHEMA)
    for seed in range(30):
        text, ended = walk(hf, grammar.start(), seed)
        assert ended, text
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ", " in text and ": " in text and "\n" not in text  # compact, OpenAI's separators


def test_json_object_walks_that_end_are_objects(hf: Any, grammars: Grammars) -> None:
    grammar = grammars.response_format(ResponseFormat(type="json_object"))
    assert grammar is not None
    ended = 0
    for seed in range(20):
        text, done = walk(hf, grammar.start(), seed, steps=400)
        if done:
            ended += 1
            assert isinstance(json.loads(text), dict)
    assert ended >= 10


def test_the_mask_has_exactly_the_model_vocabulary_bits(hf: Any, grammars: Grammars) -> None:
    constraint = grammars.json_schema(SCHEMA).start()
    mask = constraint.allowed()
    assert len(mask) == (len(hf) + EXTRA + 7) // 8
    allowed = unpack_allowed(mask, len(hf) + EXTRA)
    firsts = [hf.decode([t]) for t in allowed.nonzero().flatten().tolist()]
    assert firsts and all(text.startswith("{") for text in firsts)  # an object opens


def test_attack_a_token_the_mask_forbade_is_refused(hf: Any, grammars: Grammars) -> None:
    """A last node that ignores the grammar is caught at the entry, not believed."""
    constraint = grammars.json_schema(SCHEMA).start()
    forbidden = hf.encode("hello", add_special_tokens=False)[0]
    with pytest.raises(ConstraintViolation) as caught:
        constraint.advance(forbidden)
    assert caught.value.status == 502
    with pytest.raises(ConstraintViolation):
        constraint.advance(len(hf) + EXTRA + 3)  # outside the vocabulary


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strin"},
        {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}},
        {"type": "object", "required": ["a"], "properties": {"a": False}},
    ],
)
def test_schemas_that_cannot_compile_are_a_400_naming_response_format(
    grammars: Grammars, schema: dict[str, Any]
) -> None:
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    with pytest.raises(APIError) as caught:
        grammars.response_format(fmt)
    assert caught.value.status == 400 and caught.value.param == "response_format"


def test_text_format_needs_no_grammar(grammars: Grammars) -> None:
    assert grammars.response_format(None) is None
    assert grammars.response_format(ResponseFormat(type="text")) is None
    with pytest.raises(APIError):
        grammars.response_format(ResponseFormat(type="json_schema"))
