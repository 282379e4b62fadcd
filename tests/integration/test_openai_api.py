"""The entry node through the official ``openai`` package and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster


@pytest.fixture
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="unused", max_retries=0)


def hf_greedy_text(
    model: TinyModel, prompt_ids: list[int], max_tokens: int
) -> tuple[str, list[int]]:
    """What Hugging Face's own generate produces, stopping at EOS like the entry node."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=1,
        )
    new = out[0, len(prompt_ids) :].tolist()
    if 1 in new:
        new = new[: new.index(1)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_equals_hugging_face_generate(
    client: openai.OpenAI, tiny_llama: TinyModel
) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama.path))
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    expected_text, expected_ids = hf_greedy_text(tiny_llama, prompt_ids, 24)
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0
    )  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected_text
    assert reply.choices[0].finish_reason == ("length" if len(expected_ids) == 24 else "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(expected_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + len(expected_ids)


def test_streaming_gives_the_same_text_and_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about the river."}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0
    )  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_completions_and_seeded_sampling_are_reproducible(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "prompt": "The river ran",
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 7,
    }
    first = client.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.completions.create(**kwargs)  # type: ignore[call-overload]
    other = client.completions.create(**{**kwargs, "seed": 8})  # type: ignore[call-overload]
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.completion_tokens > 0
    assert other.choices[0].text != first.choices[0].text


def test_stop_sequence_cuts_output(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0)
    text = base.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_completion_with_stop(client: openai.OpenAI) -> None:
    base = (
        client.completions.create(model="tiny", prompt="Numbers", max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    stop = base[5:8]
    stream = client.completions.create(
        model="tiny", prompt="Numbers", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == base[: base.index(stop)]


def test_generate_endpoint_of_the_original_demo(cluster: LocalCluster) -> None:
    response = httpx.post(
        cluster.entry.http_url + "/generate", json={"prompt": "Hello", "max_tokens": 8}
    )
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["output"], str)
    assert body["usage"]["completion_tokens"] <= 8


def test_web_page_is_served(cluster: LocalCluster) -> None:
    response = httpx.get(cluster.entry.http_url + "/")
    assert response.status_code == 200
    assert "/v1/chat/completions" in response.text


def test_health_and_metrics(cluster: LocalCluster) -> None:
    health = httpx.get(cluster.entry.http_url + "/health").json()
    assert health["layers"] == [0, 2] and health["entry"] is True
    assert health["sessions"]["open"] == 0  # every earlier request closed its session
    assert health["memory"]["rss_bytes"] > 0
    downstream = cluster.nodes[1].get("/health").json()
    assert downstream["layers"] == [2, 4] and downstream["sessions"]["open"] == 0
    metrics = cluster.nodes[1].get("/metrics").text
    assert 'teeshard_steps_total{model="tiny",layers="2:4"}' in metrics


def test_a_prompt_of_token_ids_and_ignore_eos(cluster: LocalCluster, tiny_llama: TinyModel) -> None:
    """OpenAI's token-id prompts; ``ignore_eos`` (as vLLM's) decodes exactly max_tokens."""
    prompt = [5, 17, 250, 33, 101]
    response = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"
    ids = body["teeshard"]["completion_token_ids"]
    reference = tiny_llama.reference.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
    )[0, len(prompt):].tolist()  # fmt: skip
    assert ids[:12] == reference
    bad = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        json={"model": "tiny", "prompt": [5, 10**9], "max_tokens": 2},
        timeout=60,
    )
    assert bad.status_code == 400 and "token ids must lie in" in bad.json()["error"]["message"]
