"""The key property: a split pipeline computes exactly what the unsplit model computes.

Compared against Hugging Face's own ``generate`` on the same checkpoint, over
real node servers and real WebSockets, for 1 to 4 nodes and two model families.
"""

from __future__ import annotations

import copy

import pytest
import torch

from teeshard.model.sampling import SamplingParams
from teeshard.transport.messages import SamplingHistory
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

DECODE_STEPS = 40
PROMPT = [0, 17, 250, 33, 101, 7, 402, 99, 5, 311, 64, 12]


def reference_generation(
    model: TinyModel, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    config = copy.deepcopy(model.reference.generation_config)
    config.update(
        eos_token_id=None,
        pad_token_id=None,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # an explicit mask: generate must not guess padding from token ids
        out = model.reference.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, [step_logits[0].float() for step_logits in out.logits]


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 4])
async def test_split_pipeline_matches_unsplit_model(tiny_model: TinyModel, num_nodes: int) -> None:
    ref_tokens, ref_logits = reference_generation(tiny_model, PROMPT, DECODE_STEPS)
    with LocalCluster(tiny_model.path, num_nodes) as cluster:
        client = cluster.entry_stage()
        session = await client.open_session(max_len=len(PROMPT) + DECODE_STEPS)
        tokens, logits = [], []
        token, step_logits = await client.step(session, PROMPT)  # prefill
        for _ in range(DECODE_STEPS):
            tokens.append(token)
            logits.append(step_logits)
            if len(tokens) == DECODE_STEPS:
                break
            token, step_logits = await client.step(session, [token])
        await client.close_session(session)

    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == DECODE_STEPS
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits, strict=True)):
        assert ours is not None
        err = (ours - theirs).abs().max().item()
        assert err < 1e-4, (
            f"{tiny_model.family}, {num_nodes} nodes: step {step} logits differ by {err}"
        )


async def test_half_precision_wire_stays_close(tiny_llama: TinyModel) -> None:
    """A float16 wire halves the bytes; logits move a little but stay close."""
    _, ref_logits = reference_generation(tiny_llama, PROMPT, 4)
    with LocalCluster(tiny_llama.path, 2, wire_dtype="float16") as cluster:
        client = cluster.entry_stage()
        session = await client.open_session(max_len=len(PROMPT) + 4, wire_dtype="float16")
        _, logits = await client.step(session, PROMPT)
    assert logits is not None
    err = (logits - ref_logits[0]).abs().max().item()
    assert 0 < err < 1e-2  # not bit-exact (it is really float16), but close


async def test_a_sampled_session_rebuilt_from_its_history_continues_identically(
    tiny_llama: TinyModel,
) -> None:
    """What failover relies on: sampling draws are a function of (seed, position), so a
    session rebuilt by one prefill of prompt + tokens so far samples what the first did."""
    sampling = SamplingParams(temperature=1.0, top_k=50, seed=1234)
    with LocalCluster(tiny_llama.path, 2) as cluster:
        stage = cluster.entry_stage()
        first = await stage.open_session(len(PROMPT) + 8, sampling, return_logits=False)
        tokens = [(await stage.step(first, PROMPT))[0]]
        while len(tokens) < 8:
            tokens.append((await stage.step(first, [tokens[-1]]))[0])
        await stage.close_session(first)
        rebuilt = await stage.open_session(len(PROMPT) + 8, sampling, return_logits=False)
        again = [(await stage.step(rebuilt, PROMPT + tokens[:3]))[0]]
        while len(again) < 5:
            again.append((await stage.step(rebuilt, [again[-1]]))[0])
        await stage.close_session(rebuilt)
    assert again == tokens[3:]
    assert len(set(tokens)) > 1  # really sampled, not greedy


PENALISED = SamplingParams(
    temperature=1.0,
    top_k=50,
    seed=99,
    presence_penalty=1.5,
    frequency_penalty=1.0,
    repetition_penalty=1.8,
    logit_bias=((7, 3.0), (33, -5.0)),
    min_tokens=6,
    eos_token_ids=(1,),
)


async def test_a_penalised_session_rebuilt_from_its_history_continues_identically(
    tiny_llama: TinyModel,
) -> None:
    """Penalties, logit bias and min_tokens depend on the token history: the rebuilt
    session gets it in ``open`` (the prompt's ids, the output so far) and samples on
    exactly as the lost one would have; without it, it would not."""
    sampling, steps, cut = PENALISED, 10, 4
    with LocalCluster(tiny_llama.path, 3) as cluster:
        stage = cluster.entry_stage()
        prompt_ids = SamplingHistory(prompt_tokens=tuple(sorted(set(PROMPT))))
        first = await stage.open_session(len(PROMPT) + steps, sampling, False, history=prompt_ids)
        tokens = [(await stage.step(first, PROMPT))[0]]
        while len(tokens) < steps:
            tokens.append((await stage.step(first, [tokens[-1]]))[0])
        await stage.close_session(first)

        async def rebuilt(history: SamplingHistory | None) -> list[int]:
            session = await stage.open_session(
                len(PROMPT) + steps, sampling, False, history=history
            )
            again = [(await stage.step(session, PROMPT + tokens[:cut]))[0]]
            while len(again) < steps - cut:
                again.append((await stage.step(session, [again[-1]]))[0])
            await stage.close_session(session)
            return again

        full = SamplingHistory(
            prompt_tokens=prompt_ids.prompt_tokens, output_tokens=tuple(tokens[:cut])
        )
        assert await rebuilt(full) == tokens[cut:]
        assert await rebuilt(prompt_ids) != tokens[cut:]  # the output history matters
    assert len(set(tokens)) > 1
