"""Logprobs against Hugging Face, several choices per request, and their receipts.

Logprobs are computed on the last node from its float32 logits; they must equal
Hugging Face's log-softmax of the unsplit model within 1e-4, streamed or not.
Several choices (``n``, a list of prompts) are parallel sessions; each carries its
own receipt chain and ``verify_response`` checks every one.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from teeshard.attest import ReceiptError, parse_choices, verify_response
from teeshard.attest.entry_files import hash_entry_files
from teeshard.attest.evidence import Bundle
from teeshard.entry.text import TextCodec
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

PROMPT_IDS = [0, 17, 250, 33, 101, 7, 402, 99, 5, 311, 64, 12]
TOP = 5


def hf_logprobs(model: TinyModel, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Hugging Face's log-softmax at each completion position: (len(completion), vocab)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model.reference(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def check_against_hf(
    model: TinyModel,
    completion: list[int],
    sampled: list[float],
    tops: list[list[tuple[int, float]]],
) -> None:
    ref = hf_logprobs(model, PROMPT_IDS, completion)
    for step, token in enumerate(completion):
        assert abs(sampled[step] - float(ref[step, token])) < 1e-4, step
        values, best = torch.topk(ref[step], TOP)
        assert [t for t, _ in tops[step]] == best.tolist(), step
        for (_, ours), theirs in zip(tops[step], values.tolist(), strict=True):
            assert abs(ours - theirs) < 1e-4, step


def completion_ids(body: dict[str, Any]) -> list[int]:
    return list(body["teeshard"]["completion_token_ids"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_logprobs_equal_hugging_face(
    cluster: LocalCluster, tiny_llama: TinyModel, temperature: float
) -> None:
    """Raw model logprobs whatever the sampling: also of a sampled (not top) token."""
    body = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": PROMPT_IDS,
            "max_tokens": 16,
            "temperature": temperature,
            "seed": 3,
            "logprobs": TOP,
            "ignore_eos": True,
        },
    ).json()
    completion = completion_ids(body)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(completion) == 16
    # the top list is keyed by token text: look the ids up from the HF reference instead
    ref = hf_logprobs(tiny_llama, PROMPT_IDS, completion)
    for step, token in enumerate(completion):
        assert abs(logprobs["token_logprobs"][step] - float(ref[step, token])) < 1e-4
        best = torch.topk(ref[step], TOP).values.tolist()
        got = sorted(logprobs["top_logprobs"][step].values(), reverse=True)
        # texts that collide (two ids, one spelling) keep one entry: compare what is there
        assert all(any(abs(g - b) < 1e-4 for b in best) for g in got)


def chat_request(**extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": TOP,
        "extra_body": {"ignore_eos": True},
        **extra,
    }


def test_chat_logprobs_equal_hugging_face_streamed_and_not(
    cluster: LocalCluster, tiny_llama: TinyModel
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama.path))
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    client = openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="x", max_retries=0)
    body = chat_request()
    whole = client.chat.completions.create(**body)
    completion = list(whole.model_extra["teeshard"]["completion_token_ids"])  # type: ignore[index]
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    ref = hf_logprobs(tiny_llama, prompt, completion)
    for step, (entry, token) in enumerate(zip(content, completion, strict=True)):
        assert abs(entry.logprob - float(ref[step, token])) < 1e-4
        assert entry.token == tokenizer.decode([token])
        best = torch.topk(ref[step], TOP)
        assert [
            abs(a.logprob - b) < 1e-4
            for a, b in zip(entry.top_logprobs, best.values.tolist(), strict=True)
        ] == [True] * TOP
    streamed = [
        e
        for chunk in client.chat.completions.create(**body, stream=True)
        if chunk.choices and chunk.choices[0].logprobs is not None
        for e in chunk.choices[0].logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


# -- several choices -------------------------------------------------------------------


def post(cluster: LocalCluster, path: str, body: dict[str, Any]) -> httpx.Response:
    return send(cluster, path, json.dumps(body).encode())


def send(cluster: LocalCluster, path: str, raw: bytes) -> httpx.Response:
    """The exact bytes given (the receipts hash them), as JSON."""
    headers = {"content-type": "application/json"}
    return httpx.post(cluster.entry.http_url + path, content=raw, headers=headers, timeout=60)


def test_n_choices_are_ordered_distinct_reproducible_and_counted(cluster: LocalCluster) -> None:
    body = {
        "model": "tiny",
        "prompt": ["The river ran", "A much longer second prompt, with more words"],
        "n": 3,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 21,
    }
    first = post(cluster, "/v1/completions", body).json()
    again = post(cluster, "/v1/completions", body).json()
    assert "choices" in first, first
    assert [c["index"] for c in first["choices"]] == list(range(6))
    draws = [tuple(c["teeshard"]["completion_token_ids"]) for c in first["choices"]]
    assert draws == [tuple(c["teeshard"]["completion_token_ids"]) for c in again["choices"]]
    assert len(set(draws[:3])) == 3 and len(set(draws[3:])) == 3
    singles = [
        post(cluster, "/v1/completions", {**body, "prompt": p, "n": 1}).json()
        for p in body["prompt"]
    ]
    # choice 0 of each prompt keeps the request's seed: it samples what n=1 would
    assert draws[0] == tuple(singles[0]["teeshard"]["completion_token_ids"])
    assert draws[3] == tuple(singles[1]["teeshard"]["completion_token_ids"])
    prompt_tokens = sum(s["usage"]["prompt_tokens"] for s in singles)
    completion_tokens = sum(
        len(c["teeshard"]["completion_token_ids"])
        - (c["teeshard"]["completion_token_ids"][-1:] == [1])
        for c in first["choices"]
    )
    assert first["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def bundles_of(cluster: LocalCluster) -> list[Bundle]:
    nonce = secrets.token_bytes(32)
    body = cluster.entry.get(f"/v1/attestation/chain?nonce={nonce.hex()}").json()
    return [Bundle.from_json(b) for b in body["bundles"]]


def verify_all(cluster: LocalCluster, text: str, request_body: bytes) -> list[str]:
    """Every choice's claims verified with the library's rules; their request ids."""
    path = cluster.model_dir
    reports = [
        verify_response(
            claims,
            bundles_of(cluster),
            entry_files=hash_entry_files(path),
            decode=TextCodec(path).decode,
            eos_token_ids={1},
            request_body=request_body,
        )
        for claims in parse_choices(text)
    ]
    return [r.request_id for r in reports]


def test_verify_receipt_cli_checks_every_choice(cluster: LocalCluster, tmp_path: Path) -> None:
    body = {"model": "tiny", "prompt": "Two", "n": 2, "max_tokens": 5, "temperature": 1.0}
    raw = json.dumps(body).encode()
    (tmp_path / "body.json").write_bytes(raw)
    answer = send(cluster, "/v1/completions", raw)
    (tmp_path / "answer.json").write_text(answer.text)
    command = [sys.executable, "-m", "teeshard.cli", "verify-receipt", str(tmp_path / "answer.json"),
               "--chain-url", cluster.entry.http_url, "--policy", str(cluster.entry.config.policy_path),
               "--model", str(cluster.model_dir), "--request-body", str(tmp_path / "body.json")]  # fmt: skip
    ok = subprocess.run(command, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("PASS") == 2 and "choice 1:" in ok.stdout
    forged = answer.json()
    forged["choices"][1]["text"] = "forged"
    (tmp_path / "answer.json").write_text(json.dumps(forged))
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1 and "decode" in bad.stdout, bad.stdout


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_carries_receipts_that_verify(cluster: LocalCluster, stream: bool) -> None:
    body = {
        "model": "tiny",
        "prompt": ["Echo me", "And me too"],
        "n": 2,
        "echo": True,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 2,
        "stop": ["e"],
        "stream": stream,
    }
    raw = json.dumps(body).encode()
    response = send(cluster, "/v1/completions", raw)
    assert response.status_code == 200
    ids = verify_all(cluster, response.text, raw)
    base = ids[0].rsplit("-", 1)[0]
    assert ids == [f"{base}-{i}" for i in range(4)]
    if stream:  # per-choice indexes in the stream
        events = [
            json.loads(line[5:])
            for line in response.text.splitlines()
            if line.startswith("data:") and line != "data: [DONE]"
        ]
        assert {c["index"] for e in events for c in e["choices"]} == {0, 1, 2, 3}
    else:
        texts = [c["text"] for c in response.json()["choices"]]
        assert [
            t.startswith(p)
            for t, p in zip(texts, ["Echo me"] * 2 + ["And me too"] * 2, strict=True)
        ] == [True] * 4


def test_a_choice_swapped_or_relabelled_fails_verification(cluster: LocalCluster) -> None:
    body = {
        "model": "tiny",
        "prompt": "Swap",
        "n": 2,
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 4,
    }
    raw = json.dumps(body).encode()
    answer = send(cluster, "/v1/completions", raw).json()
    assert answer["choices"][0]["text"] != answer["choices"][1]["text"]
    swapped = json.loads(json.dumps(answer))
    swapped["choices"][0]["text"], swapped["choices"][1]["text"] = (
        answer["choices"][1]["text"],
        answer["choices"][0]["text"],
    )
    with pytest.raises(ReceiptError, match="decode"):
        verify_all(cluster, json.dumps(swapped), raw)
    relabelled = json.loads(json.dumps(answer))
    relabelled["choices"][0]["index"], relabelled["choices"][1]["index"] = 1, 0
    with pytest.raises(ReceiptError):
        verify_all(cluster, json.dumps(relabelled), raw)
    other = json.loads(json.dumps(answer))
    other["id"] = "cmpl-" + "0" * 32
    with pytest.raises(ReceiptError, match="response id"):
        verify_all(cluster, json.dumps(other), raw)


def test_single_choice_shape_is_unchanged(cluster: LocalCluster) -> None:
    body = {"model": "tiny", "prompt": "One", "max_tokens": 4}
    answer = post(cluster, "/v1/completions", body).json()
    assert "receipts" in answer and "teeshard" in answer
    assert "receipts" not in answer["choices"][0]
    assert answer["teeshard"]["request_id"] == answer["id"].removeprefix("cmpl-")


# -- small endpoints -------------------------------------------------------------------


def test_tokenize_detokenize_and_model_retrieval(
    cluster: LocalCluster, tiny_llama: TinyModel
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama.path))
    tokens = post(cluster, "/tokenize", {"model": "tiny", "prompt": "Hello world"}).json()
    assert tokens["tokens"] == tokenizer.encode("Hello world")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] > 0
    bare = post(cluster, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert bare.json()["tokens"] == tokenizer.encode("Hello world", add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    chat = post(cluster, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    text = post(cluster, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == tokenizer.decode(tokens["tokens"], skip_special_tokens=True)
    assert post(cluster, "/detokenize", {"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert post(cluster, "/tokenize", {"prompt": "x", "messages": messages}).status_code == 400
    unknown = post(cluster, "/tokenize", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404
    client = openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["type"] == "not_found_error"  # type: ignore[index]


def test_a_chat_stream_of_n_2_gives_each_choice_its_index_role_and_text(
    cluster: LocalCluster,
) -> None:
    client = openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="x", max_retries=0)
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Two answers, please"}],
        "n": 2,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
    }
    whole = client.chat.completions.create(**body)
    chunks = list(
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )
    texts, roles = {0: "", 1: ""}, {0: 0, 1: 0}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role == "assistant"
    assert roles == {0: 1, 1: 1}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert texts[0] != texts[1]
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
