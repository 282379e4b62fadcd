"""The trained demo over real nodes on loopback: 1, 2 and 4 nodes say the same English.

Exactness tests on random models show that a split computes the same numbers;
this shows it computes the *right* ones: the demo answers the corpus' questions
in the corpus' words, and a split over 2 or 4 nodes gives the very same greedy
text as the unsplit model and as Hugging Face transformers on the same files. A
wrong layer order or a stale cache would not read as English
(tests/model/test_demo.py shows the check failing on such a model).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch

from teeshard.model.demo import demo_dir
from tests.cluster import LocalCluster
from tests.demo_sense import sense

PROMPTS = ("Hello! What is a TEE?", "What is split inference?", "How do I pay?")
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def hf_answers() -> dict[str, tuple[str, int]]:
    """Greedy text and token count per prompt from transformers' own generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(demo_dir()), dtype=torch.float32).eval()
    answers = {}
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        answers[prompt] = (tokenizer.decode(new, skip_special_tokens=True), len(new))
    return answers


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}-nodes")
def demo_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with LocalCluster(demo_dir(), request.param) as running:
        yield running


def chat(cluster: LocalCluster, prompt: str) -> Any:
    client = openai.OpenAI(base_url=cluster.entry.http_url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_split_answers_as_transformers_in_readable_english(
    demo_cluster: LocalCluster, hf_answers: dict[str, tuple[str, int]], prompt: str
) -> None:
    assert [n.config.layers.end - n.config.layers.start for n in demo_cluster.nodes] == {
        1: [6],
        2: [3, 3],
        4: [2, 2, 1, 1],
    }[len(demo_cluster.nodes)]
    reply = chat(demo_cluster, prompt)
    text = reply.choices[0].message.content
    expected, count = hf_answers[prompt]
    assert text == expected
    assert reply.usage is not None and reply.usage.completion_tokens == count
    assert reply.choices[0].finish_reason == ("length" if count == MAX_TOKENS else "stop")
    assert sense(text).readable(), (text, sense(text))
