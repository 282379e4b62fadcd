"""Structured output and tool calls through the official ``openai`` client, split over
two nodes: a random-weight model whose every constrained answer must parse and
validate, streaming and not; the mask on the wire; receipts that still verify."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from teeshard.attest import (
    Bundle,
    Policy,
    fetch_chain,
    hash_entry_files,
    parse_response,
    verify_bundle,
    verify_response,
)
from teeshard.entry.text import TextCodec
from teeshard.ledger.sql import SqlLedger
from teeshard.model.sampling import pack_allowed
from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster
from tests.pipeline_socket import PipelineSocket, hidden

SEEDS = range(12)
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "admin"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 5}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Tell me."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    # room for a prompt that lists tools, and for answers up to the grammar's end
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-long"), max_positions=1024)


@pytest.fixture(scope="module")
def cluster(model: TinyModel) -> Iterator[LocalCluster]:
    with LocalCluster(model.path, 2) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="unused", max_retries=0)


def schema_format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


# -- response_format -------------------------------------------------------------------


def test_every_json_schema_answer_parses_and_validates(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, seed=seed, max_tokens=200, temperature=1.0,
            response_format=schema_format(PERSON),
        )  # type: ignore[call-overload]  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_a_streamed_json_schema_answer_is_the_same_answer(client: openai.OpenAI) -> None:
    for seed in range(4):
        kwargs: Any = dict(
            model="tiny", messages=ASK, seed=seed, max_tokens=200, temperature=1.0,
            response_format=schema_format(PERSON),
        )  # fmt: skip
        whole = client.chat.completions.create(**kwargs).choices[0]
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert text == whole.message.content and finish == "stop"
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answers_that_end_are_objects_and_the_rest_hit_length(
    client: openai.OpenAI,
) -> None:
    ended = 0
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, seed=seed, max_tokens=60, temperature=1.0,
            response_format={"type": "json_object"},
        )  # fmt: skip
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:
            assert choice.finish_reason == "length"
            assert reply.usage is not None and reply.usage.completion_tokens == 60
            assert (choice.message.content or "").startswith("{")
    assert ended >= len(SEEDS) // 3


def test_max_tokens_cuts_a_constrained_answer_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, seed=1, max_tokens=3, response_format=schema_format(PERSON)
    )  # type: ignore[call-overload]
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": schema_format({"type": "strin"})}, "response_format"),
        ({"response_format": schema_format({"$ref": "#/nowhere"})}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_what_cannot_be_constrained_is_a_400_naming_the_field(
    client: openai.OpenAI, cluster: LocalCluster, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **extra)
    body: Any = caught.value.body
    assert param in (body.get("param") or "") + body.get("message", ""), body
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices


# -- tool calls -------------------------------------------------------------------------


def test_a_required_call_names_a_tool_and_its_arguments_validate(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, seed=seed, max_tokens=200, tools=TOOLS,
            tool_choice="required", parallel_tool_calls=False,
        )  # type: ignore[call-overload]  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and choice.message.content is None
        call: Any = calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_call_streams_as_openai_streams_it(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(6):
        kwargs: Any = dict(
            model="tiny", messages=ASK, seed=seed, max_tokens=200, tools=TOOLS, tool_choice=named
        )
        whole = client.chat.completions.create(**kwargs).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
        [call] = whole.message.tool_calls
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        jsonschema.validate(arguments, WEATHER)
        deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kwargs)
                  if c.choices]  # fmt: skip
        pieces = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
        assert pieces[0].index == 0 and pieces[0].id and pieces[0].function
        assert pieces[0].function.name == "get_weather" and pieces[0].type == "function"
        assert all(p.index == 0 and p.id is None for p in pieces[1:])
        streamed = "".join((p.function.arguments or "") for p in pieces if p.function)
        assert json.loads(streamed) == arguments and deltas[-1].finish_reason == "tool_calls"


def test_a_tool_result_fed_back_is_rendered_in_the_next_turn(
    client: openai.OpenAI, model: TinyModel
) -> None:
    from transformers import AutoTokenizer

    first = client.chat.completions.create(
        model="tiny", messages=ASK, seed=3, max_tokens=200, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False,
    )  # type: ignore[call-overload]  # fmt: skip
    call: Any = (first.choices[0].message.tool_calls or [])[0]
    turn: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # as a client sends it back
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=turn, max_tokens=5, temperature=0, tools=TOOLS
    )  # type: ignore[call-overload]
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    expected = tokenizer.apply_chat_template(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}],
        tools=TOOLS, add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert '<|tool|>\n{"forecast": "sunny"}' in expected and call.function.arguments in expected
    assert second.usage is not None
    assert second.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    with pytest.raises(openai.BadRequestError):  # a tool message must say which call it answers
        client.chat.completions.create(
            model="tiny", max_tokens=2, messages=[*ASK, {"role": "tool", "content": "x"}]
        )  # type: ignore[call-overload]


def test_auto_and_none_answer_in_text_or_well_formed_calls(client: openai.OpenAI) -> None:
    for seed in range(4):
        for choice_name in ("auto", "none"):
            reply = client.chat.completions.create(
                model="tiny", messages=ASK, seed=seed, max_tokens=40, tools=TOOLS,
                tool_choice=choice_name,
            )  # type: ignore[call-overload]  # fmt: skip
            choice = reply.choices[0]
            for call in choice.message.tool_calls or []:
                assert choice_name == "auto"
                fn: Any = call
                jsonschema.validate(json.loads(fn.function.arguments), SCHEMAS[fn.function.name])
            if not choice.message.tool_calls:
                assert choice.finish_reason in ("stop", "length")
                assert isinstance(choice.message.content, str)


# -- receipts ---------------------------------------------------------------------------


def chain_bundles(cluster: LocalCluster) -> list[Bundle]:
    nonce = secrets.token_bytes(32)
    body = cluster.entry.get(f"/v1/attestation/chain?nonce={nonce.hex()}").json()
    bundles = [Bundle.from_json(b) for b in body["bundles"]]
    assert cluster.entry.config.policy_path is not None
    verify_bundle(bundles[0], Policy.load(cluster.entry.config.policy_path), nonce=nonce)
    return bundles


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": schema_format(PERSON)},
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
    ],
)
def test_constrained_answers_still_verify(
    cluster: LocalCluster, model: TinyModel, stream: bool, extra: dict[str, Any]
) -> None:
    body = {
        "model": "tiny",
        "messages": ASK,
        "max_tokens": 200,
        "seed": 5,
        "stream": stream,
        **extra,
    }
    raw = json.dumps(body).encode()
    answer = httpx.post(cluster.entry.http_url + "/v1/chat/completions", content=raw,
                        headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    claims = parse_response(answer.text)
    assert claims.finish_reason in ("stop", "tool_calls") and claims.text
    codec = TextCodec(model.path)
    report = verify_response(claims, chain_bundles(cluster), entry_files=hash_entry_files(model.path),
                             decode=codec.decode, eos_token_ids=codec.eos_ids() | {1},
                             request_body=raw)  # fmt: skip
    assert report.text_checked and report.body_checked


def test_attack_a_tool_call_the_tokens_do_not_say_fails_verification(
    cluster: LocalCluster, model: TinyModel
) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 200, "seed": 5, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    raw = json.dumps(body).encode()
    answer = httpx.post(cluster.entry.http_url + "/v1/chat/completions", content=raw,
                        headers={"content-type": "application/json"}, timeout=60).json()  # fmt: skip
    call = answer["choices"][0]["message"]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps({"city": "Lima" if "Paris" in call["arguments"] else "Paris",
                                    "days": 7})  # fmt: skip
    codec = TextCodec(model.path)
    with pytest.raises(Exception, match="not what its token ids decode to"):
        verify_response(parse_response(json.dumps(answer)), chain_bundles(cluster),
                        entry_files=hash_entry_files(model.path), decode=codec.decode,
                        eos_token_ids={1}, request_body=raw)  # fmt: skip


# -- the mask on the wire ---------------------------------------------------------------


async def test_the_last_node_samples_only_what_the_mask_allows(cluster: LocalCluster) -> None:
    vocab = cluster.entry_stage().service.shard.spec.vocab_size
    async with PipelineSocket.to(cluster) as last:
        opened = await last.open(16)
        for token in (7, 300, vocab - 1):
            reply = await last.step(
                opened["session"], hidden=hidden(1), allowed=pack_allowed([token], vocab)
            )
            assert reply["type"] == "result" and reply["token"] == token, reply


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        (lambda v: bytes((v + 7) // 8 - 1), "bytes for a vocabulary"),
        (lambda v: bytes((v + 7) // 8), "allows no token"),
        (lambda v: b"\xff" * ((v + 7) // 8 + 1), "bytes for a vocabulary"),
    ],
)
async def test_attack_a_malformed_mask_is_refused_and_the_session_survives(
    cluster: LocalCluster, mask: Any, fragment: str
) -> None:
    vocab = cluster.entry_stage().service.shard.spec.vocab_size
    async with PipelineSocket.to(cluster) as last:
        opened = await last.open(16)
        reply = await last.step(opened["session"], hidden=hidden(1), allowed=mask(vocab))
        assert reply["type"] == "error" and reply["status"] == 400, reply
        assert fragment in reply["message"]
        ok = await last.step(opened["session"], hidden=hidden(1))
        assert ok["type"] == "result"


# -- failover -----------------------------------------------------------------------------

WORDS: dict[str, Any] = {  # long enough for a kill to land mid-answer, and it must end
    "type": "object",
    "properties": {
        "words": {
            "type": "array",
            "items": {"enum": ["alpha", "beta", "gamma"]},
            "minItems": 30,
            "maxItems": 30,
        },
    },
    "required": ["words"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def ledger_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"


@pytest.fixture(scope="module")
def ledger(ledger_url: str) -> Iterator[SqlLedger]:
    owner = SqlLedger.open(ledger_url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("alice")
    owner.deposit("alice", 10_000_000)
    owner.add_api_key("alice", "tsk_alice")
    yield owner
    owner.close()


@pytest.fixture(scope="module")
def replicated(model: TinyModel, ledger: SqlLedger, ledger_url: str) -> Iterator[LocalCluster]:
    """The entry (charging alice) and two replicas of the last range, each a subprocess."""
    options = {"ledger_url": ledger_url, "ledger_actor": "entry-1"}
    with LocalCluster(
        model.path, 2, subprocesses=True, replicas=2, ban_s=300, entry_options=options
    ) as running:
        yield running


def stream_chat(cluster: LocalCluster, body: dict[str, Any], kill_after: int = 0) -> str:
    """The SSE transcript of a chat stream; after ``kill_after`` events the last node of
    the session's route is killed."""
    lines: list[str] = []
    events = 0
    with httpx.stream("POST", cluster.entry.http_url + "/v1/chat/completions",
                      content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json",
                               "authorization": "Bearer tsk_alice"}) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            if not line.startswith("data: {"):
                continue
            events += 1
            if events == kill_after:
                [route] = cluster.network_state()["routes"]
                cluster.by_url(route[-1]).kill()
    return "\n".join(lines)


def test_a_constrained_stream_survives_failover_unchanged(
    replicated: LocalCluster, model: TinyModel, ledger: SqlLedger
) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 900, "seed": 11, "stream": True,
            "temperature": 1.0, "response_format": schema_format(WORDS),
            "stream_options": {"include_usage": True}}  # fmt: skip
    balance = ledger.balance("alice").available
    bundles = [
        Bundle.from_json(fetch_chain(n.http_url, secrets.token_bytes(32))[0])
        for n in replicated.nodes
    ]  # fmt: skip, taken while all live
    first = stream_chat(replicated, body)
    reference = parse_response(first)
    after = stream_chat(replicated, body, kill_after=8)
    survived = parse_response(after)
    assert replicated.network_state()["counters"]["failovers"] == 1
    assert survived.text == reference.text and survived.finish_reason == "stop"
    assert survived.completion_token_ids == reference.completion_token_ids
    jsonschema.validate(json.loads(survived.text), WORDS)
    codec = TextCodec(model.path)
    report = verify_response(survived, bundles, entry_files=hash_entry_files(model.path),
                             decode=codec.decode, eos_token_ids={1},
                             request_body=json.dumps(body).encode())  # fmt: skip
    assert report.segments == 2
    # billed as any answer: each settled once, at the price of its usage, nothing held
    costs = [usage(first)["cost"], usage(after)["cost"]]
    assert costs[0] == costs[1] > 0
    assert usage(after)["completion_tokens"] == len(survived.completion_token_ids)
    assert ledger.balance("alice").available == balance - sum(costs)
    assert ledger.balance("alice").reserved == 0 and ledger.check().ok


def usage(transcript: str) -> dict[str, Any]:
    events = [
        json.loads(line[6:]) for line in transcript.splitlines() if line.startswith("data: {")
    ]
    return dict(next(e["usage"] for e in events if e.get("usage")))


def test_batched_sessions_each_keep_their_own_grammar(client: openai.OpenAI) -> None:
    """n = 3 choices batched together, each with its own matcher and mask, beside an
    unconstrained request whose tokens the masks must not touch."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(
            client.chat.completions.create, model="tiny", messages=ASK, max_tokens=40,
            temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, n=3, seed=4, max_tokens=200, temperature=1.0,
            response_format=schema_format(PERSON),
        )  # type: ignore[call-overload]  # fmt: skip
        alone = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            max_tokens=40,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert plain.result().choices[0].message.content == alone.choices[0].message.content
    texts = [c.message.content or "" for c in reply.choices]
    assert len(set(texts)) > 1 and all(c.finish_reason == "stop" for c in reply.choices)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
