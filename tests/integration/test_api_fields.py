"""No field silently ignored: every request field of OpenAI's chat and completions
schemas, as the installed ``openai`` package declares them, is either accepted and
has its effect, or refused with a 400 whose ``param`` names it. Through the real
servers and the official client.

A new field in a new ``openai`` release fails ``test_the_table_covers_every_field``
until it is given a decision here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from tests.cluster import LocalCluster

MESSAGES = [{"role": "user", "content": "Tell me about the river."}]
PROMPT = "The river ran"
Client = openai.OpenAI
Check = Callable[[Client], None]


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Client:
    return openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="unused", max_retries=0)


def chat(client: Client, **kwargs: Any) -> Any:
    base: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12}
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(**{**base, **kwargs}, extra_body=extra)


def complete(client: Client, **kwargs: Any) -> Any:
    base: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12}
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    return client.completions.create(**{**base, **kwargs}, extra_body=extra)


def ids(reply: Any, index: int = 0) -> list[int]:
    """The completion token ids a response's receipts extension names."""
    holder = reply if len(reply.choices) == 1 else reply.choices[index]
    return list(holder.model_extra["teeshard"]["completion_token_ids"])


def refused(call: Callable[..., Any], param: str, **kwargs: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        call(**kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value.body


# -- effects, shared by both endpoints ---------------------------------------------------


def greedy_differs(call: Callable[..., Any], **kwargs: Any) -> None:
    plain = call(temperature=0, max_tokens=24)
    other = call(temperature=0, max_tokens=24, **kwargs)
    assert ids(other) != ids(plain), kwargs


def bias_forces(call: Callable[..., Any]) -> None:
    assert set(ids(call(temperature=0, logit_bias={"77": 100}))) == {77}


def seed_reproduces(call: Callable[..., Any]) -> None:
    first, again = (call(temperature=1.0, seed=5) for _ in range(2))
    assert ids(first) == ids(again) != ids(call(temperature=1.0, seed=6))


def temperature_samples(call: Callable[..., Any]) -> None:
    greedy = call(temperature=0, max_tokens=24)
    assert ids(greedy) == ids(call(temperature=0, max_tokens=24))
    assert ids(call(temperature=2.0, seed=1, max_tokens=24)) != ids(greedy)


def top_p_narrows(call: Callable[..., Any]) -> None:
    greedy = ids(call(temperature=0))
    assert ids(call(temperature=1.5, top_p=1e-6, seed=3)) == greedy
    assert ids(call(temperature=1.5, top_p=1.0, seed=3)) != greedy


def max_tokens_bounds(call: Callable[..., Any], field: str) -> None:
    assert call(**{field: 3}).usage.completion_tokens == 3
    assert call(**{field: 5}).usage.completion_tokens == 5


def n_gives_choices(call: Callable[..., Any]) -> None:
    reply = call(n=3, temperature=1.0, seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({tuple(ids(reply, i)) for i in range(3)}) == 3  # distinct draws


def user_is_accepted(call: Callable[..., Any], field: str) -> None:
    # an end-user id for the operator: by design it changes nothing of the answer
    assert ids(call(temperature=0, extra_body={field: "u-1"})) == ids(call(temperature=0))


def stop_cuts(call: Callable[..., Any], text_of: Callable[[Any], str]) -> None:
    text = text_of(call(temperature=0, max_tokens=24))
    assert len(text) > 6
    stop = text[3:5]
    cut = call(temperature=0, max_tokens=24, stop=[stop, "\u2603"])
    assert text_of(cut) == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    single = call(temperature=0, max_tokens=24, stop=stop)
    assert text_of(single) == text_of(cut)


def streams(call: Callable[..., Any], text_of_chunk: Callable[[Any], str]) -> None:
    whole = call(temperature=0)
    chunks = list(call(temperature=0, stream=True))
    assert len(chunks) > 2
    assert "".join(text_of_chunk(c) for c in chunks if c.choices) == (
        whole.choices[0].message.content
        if hasattr(whole.choices[0], "message")
        else whole.choices[0].text
    )


def stream_usage(call: Callable[..., Any]) -> None:
    chunks = list(call(stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in call(stream=True, stream_options={"include_usage": False}))


def chat_text(reply: Any) -> str:
    return str(reply.choices[0].message.content)


def completion_text(reply: Any) -> str:
    return str(reply.choices[0].text)


def _chat(f: Callable[..., None], *args: Any, **kwargs: Any) -> Check:
    return lambda c: f(lambda **kw: chat(c, **kw), *args, **kwargs)


def _completion(f: Callable[..., None], *args: Any, **kwargs: Any) -> Check:
    return lambda c: f(lambda **kw: complete(c, **kw), *args, **kwargs)


def _chat_logprobs(client: Client) -> None:
    reply = chat(client, temperature=0, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == 12 and all(e.logprob <= 0 and e.top_logprobs == [] for e in content)
    assert chat(client, temperature=0).choices[0].logprobs is None


def _chat_top_logprobs(client: Client) -> None:
    content = chat(client, temperature=0, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    # greedy: the sampled token is the most likely one
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in content)
    refused(lambda **kw: chat(client, **kw), "top_logprobs", top_logprobs=2)  # without logprobs


def _chat_messages(client: Client) -> None:
    other = [{"role": "user", "content": "Something else entirely, and longer too."}]
    assert chat(client, messages=other).usage.prompt_tokens != chat(client).usage.prompt_tokens
    refused(
        lambda **kw: chat(client, **kw), "messages.0.name", messages=[{**MESSAGES[0], "name": "x"}]
    )


def _model(call: Callable[..., Any]) -> Check:
    def check(client: Client) -> None:
        assert call(client).model == "tiny"
        with pytest.raises(openai.NotFoundError) as caught:
            call(client, model="gpt-unknown")
        assert caught.value.param == "model"

    return check


def _completion_logprobs(client: Client) -> None:
    logprobs = complete(client, temperature=0, logprobs=2).choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 12
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(v <= 0 for v in logprobs.token_logprobs)


def _echo(client: Client) -> None:
    assert complete(client, echo=True).choices[0].text.startswith(PROMPT)
    assert not complete(client, echo=False).choices[0].text.startswith(PROMPT)


def _prompt_list(client: Client) -> None:
    reply = complete(client, prompt=["One prompt", "Another, longer prompt"], temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert ids(reply, 0) == ids(complete(client, prompt="One prompt", temperature=0))


def _best_of(client: Client) -> None:
    assert len(complete(client, n=2, best_of=2).choices) == 2
    refused(lambda **kw: complete(client, **kw), "best_of", best_of=3)


def _accepts_only(call: Callable[..., Any], field: str, ok: object, bad: object) -> Check:
    def check(client: Client) -> None:
        assert ids(call(client, temperature=0, **{field: ok})) == ids(call(client, temperature=0))
        refused(lambda **kw: call(client, **kw), field, **{field: bad})

    return check


def _response_format(client: Client) -> None:
    """Structured output (tests/integration/test_structured_output.py has the rest)."""
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}},
    }
    reply = chat(client, response_format=schema, temperature=1.0, seed=2)
    assert reply.choices[0].message.content in ('"yes"', '"no"')
    assert reply.choices[0].finish_reason == "stop"
    bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}}
    refused(lambda **kw: chat(client, **kw), "response_format", response_format=bad)


TOOL = {  # short: the tiny model's context is small
    "type": "function",
    "function": {
        "name": "p",
        "parameters": {
            "properties": {"x": {"enum": [1]}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
}


def _tool_checks(client: Client, field: str) -> None:
    """Tool calls (tests/integration/test_structured_output.py has the rest)."""
    if field == "tools":  # the chat template renders them into the prompt
        plain = chat(client, max_tokens=2).usage.prompt_tokens
        assert chat(client, max_tokens=2, tools=[TOOL]).usage.prompt_tokens > plain
    kwargs: dict[str, Any] = {"tools": [TOOL], "temperature": 1.0, "seed": 3, "max_tokens": 70}
    if field == "tool_choice":
        assert not chat(client, tool_choice="none", **kwargs).choices[0].message.tool_calls
        named = {"type": "function", "function": {"name": "p"}}
        reply = chat(client, tool_choice=named, **kwargs)
    else:
        reply = chat(client, tool_choice="required", parallel_tool_calls=False, **kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "p"
    bad = {"type": "function", "function": {"name": "other"}}
    refused(lambda **kw: chat(client, **kw), "tool_choice", tools=[TOOL], tool_choice=bad)


def _refuse(call: Callable[..., Any], field: str, value: object) -> Check:
    return lambda client: refused(lambda **kw: call(client, **kw), field, **{field: value})


CHAT: dict[str, Check] = {
    "messages": _chat_messages,
    "model": _model(chat),
    "frequency_penalty": _chat(greedy_differs, frequency_penalty=2.0),
    "presence_penalty": _chat(greedy_differs, presence_penalty=2.0),
    "logit_bias": _chat(bias_forces),
    "logprobs": _chat_logprobs,
    "top_logprobs": _chat_top_logprobs,
    "max_completion_tokens": _chat(max_tokens_bounds, "max_completion_tokens"),
    "max_tokens": _chat(max_tokens_bounds, "max_tokens"),
    "n": _chat(n_gives_choices),
    "seed": _chat(seed_reproduces),
    "stop": _chat(stop_cuts, chat_text),
    "stream_options": _chat(stream_usage),
    "temperature": _chat(temperature_samples),
    "top_p": _chat(top_p_narrows),
    "user": _chat(user_is_accepted, "user"),
    "safety_identifier": _chat(user_is_accepted, "safety_identifier"),
    "stream": _chat(streams, lambda c: c.choices[0].delta.content or ""),
    "store": _accepts_only(chat, "store", False, True),
    "service_tier": _accepts_only(chat, "service_tier", "default", "flex"),
    "modalities": _accepts_only(chat, "modalities", ["text"], ["text", "audio"]),
    "audio": _refuse(chat, "audio", {"voice": "alloy", "format": "wav"}),
    "function_call": _refuse(chat, "function_call", "auto"),
    "functions": _refuse(chat, "functions", [{"name": "f", "parameters": {}}]),
    "metadata": _refuse(chat, "metadata", {"k": "v"}),
    "moderation": _refuse(chat, "moderation", {"model": "omni-moderation-latest"}),
    "parallel_tool_calls": lambda c: _tool_checks(c, "parallel_tool_calls"),
    "prediction": _refuse(chat, "prediction", {"type": "content", "content": "x"}),
    "prompt_cache_key": _refuse(chat, "prompt_cache_key", "k"),
    "prompt_cache_options": _refuse(chat, "prompt_cache_options", {"ttl": "1h"}),
    "prompt_cache_retention": _refuse(chat, "prompt_cache_retention", "24h"),
    "reasoning_effort": _refuse(chat, "reasoning_effort", "low"),
    "response_format": _response_format,
    "tool_choice": lambda c: _tool_checks(c, "tool_choice"),
    "tools": lambda c: _tool_checks(c, "tools"),
    "verbosity": _refuse(chat, "verbosity", "low"),
    "web_search_options": _refuse(chat, "web_search_options", {}),
}
COMPLETIONS: dict[str, Check] = {
    "prompt": _prompt_list,
    "model": _model(complete),
    "best_of": _best_of,
    "echo": _echo,
    "frequency_penalty": _completion(greedy_differs, frequency_penalty=2.0),
    "presence_penalty": _completion(greedy_differs, presence_penalty=2.0),
    "logit_bias": _completion(bias_forces),
    "logprobs": _completion_logprobs,
    "max_tokens": _completion(max_tokens_bounds, "max_tokens"),
    "n": _completion(n_gives_choices),
    "seed": _completion(seed_reproduces),
    "stop": _completion(stop_cuts, completion_text),
    "stream_options": _completion(stream_usage),
    "temperature": _completion(temperature_samples),
    "top_p": _completion(top_p_narrows),
    "user": _completion(user_is_accepted, "user"),
    "stream": _completion(streams, lambda c: c.choices[0].text),
    "suffix": _refuse(complete, "suffix", "the end"),
}
EXTENSIONS: dict[str, Check] = {
    "top_k": lambda c: (
        (
            ids(chat(c, temperature=2.0, seed=4, extra_body={"top_k": 1}))
            == ids(chat(c, temperature=0))
        )
        or pytest.fail("top_k=1 is not greedy")
    ),
    "ignore_eos": lambda c: None,  # every check above runs with it: exactly max_tokens tokens
    "repetition_penalty": lambda c: greedy_differs(
        lambda **kw: chat(c, **kw), extra_body={"repetition_penalty": 2.0}
    ),
    "min_tokens": lambda c: None,  # see test_min_tokens_holds_back_the_end_of_sequence
}


def test_the_table_covers_every_field() -> None:
    chat_fields = set(chat_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    completion_fields = set(completion_params.CompletionCreateParamsBase.__annotations__) | {
        "stream"
    }
    assert set(CHAT) == chat_fields
    assert set(COMPLETIONS) == completion_fields


@pytest.mark.parametrize("field", sorted(CHAT))
def test_chat_field(client: Client, field: str) -> None:
    CHAT[field](client)


@pytest.mark.parametrize("field", sorted(COMPLETIONS))
def test_completions_field(client: Client, field: str) -> None:
    COMPLETIONS[field](client)


@pytest.mark.parametrize("field", sorted(EXTENSIONS))
def test_extension(client: Client, field: str) -> None:
    EXTENSIONS[field](client)


@pytest.mark.parametrize("call", [chat, complete])
def test_an_unknown_field_is_refused_by_name(client: Client, call: Callable[..., Any]) -> None:
    refused(lambda **kw: call(client, **kw), "guided_json", extra_body={"guided_json": {}})
    refused(
        lambda **kw: call(client, **kw),
        "stream_options.include_obfuscation",
        stream=True,
        stream_options={"include_obfuscation": True},
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", 3.0),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"999999": 1}),
        ("min_tokens", -1),
        ("min_tokens", 13),  # more than max_tokens
        ("top_logprobs", 21),
        ("n", 17),
        ("top_k", -2),
    ],
)
def test_nonsense_values_are_refused_by_name(client: Client, field: str, value: object) -> None:
    kwargs: dict[str, Any] = {"extra_body": {field: value}}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    refused(lambda **kw: chat(client, **kw), field, **kwargs)


def test_min_tokens_holds_back_the_end_of_sequence(client: Client) -> None:
    """With the end-of-sequence id (1) forced by logit_bias, only min_tokens delays it."""
    force_eos = {"logit_bias": {"1": 100}}
    assert (
        complete(
            client, temperature=0, **force_eos, extra_body={"ignore_eos": False}
        ).usage.completion_tokens
        == 0
    )
    held = complete(
        client, temperature=0, **force_eos, extra_body={"ignore_eos": False, "min_tokens": 5}
    )
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    assert 1 not in ids(held)[:5] and ids(held)[5] == 1
