"""The shipped demo checkpoint: a normal Hugging Face directory, trained, and in step with
its corpus, tokenizer and chat template."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from teeshard.attest import tool_call_text
from teeshard.model import demo
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.demo_data import render_chat, train_tokenizer, training_documents
from teeshard.model.demo_train import TrainSettings, corpus_digest
from tests.demo_sense import sense

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_balance",
            "description": "The token balance of an account.",
            "parameters": {"type": "object", "properties": {"account": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo.ensure_demo()))


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo.demo_dir()), dtype=torch.float32).eval()


def hf_chat(reference: Any, tokenizer: Any, prompt: str, max_tokens: int = 40) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_the_demo_is_a_hugging_face_checkpoint_of_a_small_gqa_llama() -> None:
    directory = demo.ensure_demo()
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "generation_config.json" in names and "training.json" in names
    spec = Checkpoint(directory).spec
    assert spec.model_type == "llama" and spec.num_layers == 6 and spec.hidden_size == 256
    assert spec.num_kv_heads < spec.num_heads  # grouped-query attention
    assert spec.tie_word_embeddings and spec.torch_dtype == "float16"
    assert (directory / "model.safetensors").stat().st_size < 10_000_000
    assert Checkpoint(directory).name == demo.DEMO_NAME


def test_a_missing_demo_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "demo_dir", lambda: tmp_path / "nothing")
    with pytest.raises(demo.DemoMissingError, match=r"train_demo\.py"):
        demo.ensure_demo()


def test_the_shipped_model_was_trained_on_the_shipped_corpus() -> None:
    record = json.loads((demo.demo_dir() / "training.json").read_text())
    assert record["corpus_sha256"] == corpus_digest(), "corpus edited: run scripts/train_demo.py"
    assert record["settings"] == dataclasses.asdict(TrainSettings())
    assert record["final_loss_mean_last_20"] < record["losses_every_10"][0] / 3


def test_the_shipped_tokenizer_is_the_one_the_corpus_trains() -> None:
    settings = TrainSettings()
    trained = train_tokenizer(training_documents(settings.seed), settings.vocab_size)
    shipped = json.loads((demo.demo_dir() / "tokenizer.json").read_text())
    assert json.loads(trained.to_str()) == shipped


def test_tokenizer_round_trips_and_ends_turns_with_its_eos(tokenizer: Any) -> None:
    text = "Hello world, how are you? Attestation proves what a TEE runs."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    config = json.loads((demo.demo_dir() / "config.json").read_text())
    generation = json.loads((demo.demo_dir() / "generation_config.json").read_text())
    assert tokenizer.eos_token == demo.EOS
    assert tokenizer.eos_token_id == config["eos_token_id"] == generation["eos_token_id"]
    assert tokenizer.bos_token is None  # ChatML: nothing before the first turn


def test_chat_template_renders_chatml_roles(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is a TEE?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is a TEE?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # what the model was trained on is what the entry renders
    assert render_chat(messages) + "<|im_start|>assistant\n" == rendered


def test_chat_template_renders_tools_calls_and_responses_hermes_style(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Balance of alice?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_balance", "arguments": '{"account": "alice"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"balance": 7}'},
        {"role": "tool", "content": '{"balance": 8}'},
    ]
    rendered = tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in rendered
    # the call in the one form the entry's grammar writes and the verifier rebuilds
    call = tool_call_text("get_balance", '{"account": "alice"}')
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in rendered
    # consecutive tool results: one user turn of tool_response blocks
    assert rendered.endswith(
        '<|im_start|>user\n<tool_response>\n{"balance": 7}\n</tool_response>\n'
        '<tool_response>\n{"balance": 8}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    # arguments given as a dict render as the same JSON
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"account": "alice"}  # type: ignore[index]
    assert (
        tokenizer.apply_chat_template(
            messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        == rendered
    )
    assert render_chat(messages, TOOLS) + "<|im_start|>assistant\n" == rendered


def test_tool_call_tags_are_single_tokens_that_survive_decoding(tokenizer: Any) -> None:
    ids = tokenizer.encode("<tool_call>\n{}\n</tool_call>", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<tool_call>"
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "<tool_call>\n{}\n</tool_call>"


# The answers it gets right name their theme; every answer is the corpus' English
# (a 4.5 M-parameter model answers some questions with a neighbouring answer).
@pytest.mark.parametrize(
    ("prompt", "theme"),
    [
        ("Hello! What is a TEE?", "trusted execution environment"),
        ("What is split inference?", "layers"),
        ("Hello!", "demo model"),
        ("What is attestation?", None),
        ("How do I pay?", None),
    ],
)
def test_the_demo_answers_in_the_corpus_english(
    reference: Any, tokenizer: Any, prompt: str, theme: str | None
) -> None:
    answer = hf_chat(reference, tokenizer, prompt)
    assert sense(answer).readable(), (answer, sense(answer))
    assert theme is None or theme in answer.lower(), answer


def test_the_sense_check_fails_on_a_broken_model(reference: Any, tokenizer: Any) -> None:
    """The check that guards the split tests reads a broken pipeline as nonsense: the
    nodes' ranges in the wrong order, layers out of order, a cache that forgets.

    (Two adjacent middle layers swapped, or one dropped, still read well: a residual
    stack tolerates that. The exactness tests on random models catch it, not this.)
    """
    layers = list(reference.model.layers)
    broken_orders = {
        "ranges swapped": layers[3:] + layers[:3],
        "reversed": layers[::-1],
        "rotated by one": layers[1:] + layers[:1],
        "first two swapped": [layers[1], layers[0], *layers[2:]],
    }
    try:
        for name, order in broken_orders.items():
            reference.model.layers = torch.nn.ModuleList(order)
            answer = hf_chat(reference, tokenizer, "Hello! What is a TEE?")
            assert not sense(answer).readable(), (name, answer)
    finally:
        reference.model.layers = torch.nn.ModuleList(layers)
    assert sense(hf_chat(reference, tokenizer, "Hello! What is a TEE?")).readable()


def test_the_sense_check_fails_when_the_cache_forgets(reference: Any, tokenizer: Any) -> None:
    """Greedy decoding where each new token attends to nothing before it (at the right
    position): what a session whose KV cache was lost or not appended would compute."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello! What is a TEE?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    generated: list[int] = []
    with torch.no_grad():
        token = int(reference(torch.tensor([ids])).logits[0, -1].argmax())
        for position in range(len(ids), len(ids) + 40):
            generated.append(token)
            logits = reference(
                torch.tensor([[token]]), position_ids=torch.tensor([[position]])
            ).logits
            token = int(logits[0, -1].argmax())
    answer = tokenizer.decode(generated, skip_special_tokens=True)
    assert not sense(answer).readable(), answer
