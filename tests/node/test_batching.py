"""Continuous batching: a batched step gives each session what it would get alone.

The model level (``Shard.forward_batch``) is compared with one session at a time
and with Hugging Face; the node level (``NodeService`` with its scheduler) runs
sessions concurrently, with mixed prompt lengths and sessions joining mid-way,
and checks greedy tokens, logits, chunked prefill, fairness, cancellation and
that one session's bad input never fails its batch-mates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.sampling import SamplingParams
from teeshard.model.transformer import Block, Shard
from teeshard.node import NodeService, SessionLimits
from teeshard.node.compute import BatchItem, run_batch
from teeshard.node.errors import AcceleratorFailedError, BadRequestError
from teeshard.node.scheduler import SchedulerLimits
from teeshard.node.service import Session
from teeshard.offload.errors import AcceleratorError
from tests.checkpoints import TinyModel, build_tiny_model

PROMPTS = [
    [3, 17, 250, 33, 101, 7, 402, 99, 5, 311, 64, 12, 8, 200, 41, 77, 19, 23, 400, 6],
    [5, 9],
    [44, 120, 7, 301, 2, 88, 15],
    [260],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    # sliding window 16: prompts of 20 and 22 tokens really get cut by it
    return build_tiny_model("mistral", tmp_path_factory.mktemp("tiny-mistral"))


def whole(model: TinyModel) -> Shard:
    return load_shard(Checkpoint(model.path), LayerRange(0, model.num_layers))


def greedy_alone(shard: Shard, prompt: list[int], new: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = shard.new_cache(len(prompt) + new)
    tokens, logits = [], []
    step = prompt
    with torch.no_grad():
        for _ in range(new):
            out = shard(shard.embed(torch.tensor([step])), cache)[0]
            logits.append(out)
            tokens.append(int(out.argmax()))
            step = [tokens[-1]]
    return tokens, logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_forward_batch_matches_each_session_alone_and_hugging_face(
    family: str, tmp_path: Path, tiny_llama: TinyModel, tiny_qwen2: TinyModel, mistral: TinyModel
) -> None:
    """Mixed prompt lengths, sessions joining mid-way (a prefill in the same batch as
    decodes): greedy tokens identical, logits within 1e-4 of the session run alone."""
    model = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": mistral}[family]
    shard = whole(model)
    new = 12
    alone = [greedy_alone(shard, p, new) for p in PROMPTS]

    caches = [shard.new_cache(len(p) + new) for p in PROMPTS]
    pending = [list(p) for p in PROMPTS]  # what each session feeds next
    got_tokens: list[list[int]] = [[] for _ in PROMPTS]
    got_logits: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    joins = [0, 0, 3, 5, 8]  # batch index at which each session starts
    with torch.no_grad():
        for batch_index in range(max(joins) + new):
            live = [
                i
                for i in range(len(PROMPTS))
                if joins[i] <= batch_index and len(got_tokens[i]) < new
            ]
            outs = shard.forward_batch(
                [shard.embed(torch.tensor([pending[i]])) for i in live], [caches[i] for i in live]
            )
            for i, out in zip(live, outs, strict=True):
                got_logits[i].append(out[0])
                got_tokens[i].append(int(out[0].argmax()))
                pending[i] = [got_tokens[i][-1]]
    for i, (tokens, logits) in enumerate(alone):
        assert got_tokens[i] == tokens, f"session {i}"
        worst = max((a - b).abs().max().item() for a, b in zip(got_logits[i], logits, strict=True))
        assert worst < 1e-4, f"session {i}: logits differ by {worst}"

    # and the first token of each prompt against Hugging Face's unsplit model
    with torch.no_grad():
        for prompt, (_, logits) in zip(PROMPTS, alone, strict=True):
            reference = model.reference(torch.tensor([prompt])).logits[0, -1]
            assert (logits[0] - reference).abs().max().item() < 1e-4


def test_forward_batch_refuses_two_steps_of_one_session(tiny_llama: TinyModel) -> None:
    shard = whole(tiny_llama)
    cache = shard.new_cache(8)
    hidden = shard.embed(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="at most one step per session"):
        shard.forward_batch([hidden, hidden], [cache, cache])
    assert cache.length == 0


def test_run_batch_on_a_middle_shard_returns_each_sessions_rows(tiny_llama: TinyModel) -> None:
    """Hidden states in, hidden states out, split back per session in order."""
    first = load_shard(Checkpoint(tiny_llama.path), LayerRange(0, 2))
    middle = load_shard(Checkpoint(tiny_llama.path), LayerRange(2, 3))
    hiddens = []
    with torch.no_grad():
        for prompt in PROMPTS[:3]:
            hiddens.append(first(first.embed(torch.tensor([prompt])), first.new_cache(32)))
    sessions = [
        Session(f"s{i}", middle.new_cache(32), "float32", SamplingParams(), 0, False)
        for i in range(3)
    ]
    alone = []
    with torch.no_grad():
        for hidden in hiddens:
            alone.append(middle(hidden, middle.new_cache(32)))
    outs = run_batch(
        middle, [BatchItem(s, hidden=h) for s, h in zip(sessions, hiddens, strict=True)]
    )
    for out, want, hidden in zip(outs, alone, hiddens, strict=True):
        assert out.hidden is not None and out.hidden.shape == hidden.shape
        assert (out.hidden - want).abs().max().item() < 1e-4


# -- the node's scheduler --------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


def service_for(model: TinyModel, scheduler: SchedulerLimits | None = None) -> NodeService:
    return NodeService(
        whole(model), "tiny", SessionLimits(max_sessions=32), node_id="solo", scheduler=scheduler
    )


async def generate(
    service: NodeService,
    sid: str,
    prompt: list[int],
    new: int,
    delay: float = 0.0,
    pause: float = 0.0,
) -> list[int]:
    """Open, step ``new`` times (``pause`` seconds before each step after the first, as
    a slower upstream would), close."""
    await asyncio.sleep(delay)
    await service.open_session(sid, len(prompt) + new, SamplingParams())
    tokens = []
    step = prompt
    for index in range(new):
        if index and pause:
            await asyncio.sleep(pause)
        result = await service.step_tokens(sid, step)
        tokens.append(result.token)
        step = [result.token]
    await service.close_session(sid)
    return tokens


def test_concurrent_sessions_are_batched_and_each_gets_its_own_answer(
    tiny_llama: TinyModel,
) -> None:
    shard = whole(tiny_llama)
    new = 10
    expected = [greedy_alone(shard, p, new)[0] for p in PROMPTS]

    async def main() -> tuple[list[list[int]], NodeService]:
        service = service_for(tiny_llama)
        try:
            delays = [0.0, 0.0, 0.01, 0.02, 0.05]  # some join while others decode
            got = await asyncio.gather(
                *(
                    generate(service, f"s{i}", p, new, d)
                    for i, (p, d) in enumerate(zip(PROMPTS, delays, strict=True))
                )
            )
            return list(got), service
        finally:
            await service.shutdown()

    got, service = asyncio.run(main())
    assert got == expected
    counters = service.counters
    assert counters.steps == new * len(PROMPTS)
    assert counters.batches < counters.steps, "no two steps ever shared a forward"
    assert counters.batched_rows == sum(len(p) + new - 1 for p in PROMPTS)


def test_a_long_prefill_runs_in_chunks_without_stalling_decodes(tiny_llama: TinyModel) -> None:
    """With chunks of 4 positions, a 22-token prompt takes 6 batches; a session that is
    decoding meanwhile gets a token from each of them, and both answers stay exact."""
    shard = whole(tiny_llama)
    long_prompt = PROMPTS[4]
    expected_long = greedy_alone(shard, long_prompt, 3)[0]
    expected_short = greedy_alone(shard, PROMPTS[1], 12)[0]

    async def main() -> tuple[list[int], list[int], int]:
        service = service_for(tiny_llama, SchedulerLimits(prefill_chunk=4))
        try:
            await service.open_session("short", 2 + 12, SamplingParams())
            first = await service.step_tokens("short", PROMPTS[1])  # now decoding
            short = [first.token]
            long_task = asyncio.create_task(generate(service, "long", long_prompt, 3))
            decoded_during_prefill = 0
            while len(short) < 12:
                result = await service.step_tokens("short", [short[-1]])
                short.append(result.token)
                if service.sessions._sessions.get("long") is not None:
                    cache = service.sessions._sessions["long"].cache
                    if 0 < cache.length < len(long_prompt):
                        decoded_during_prefill += 1
            long = await long_task
            await service.close_session("short")
            return short, long, decoded_during_prefill
        finally:
            await service.shutdown()

    short, long, interleaved = asyncio.run(main())
    assert long == expected_long
    assert short == expected_short
    assert interleaved >= 3, "the decoding session waited for the whole prefill"


def test_bad_input_of_one_session_never_fails_its_batch_mates(tiny_llama: TinyModel) -> None:
    async def main() -> list[object]:
        service = service_for(tiny_llama)
        try:
            for sid in ("good1", "bad", "good2"):
                await service.open_session(sid, 16, SamplingParams())
            vocab = service.shard.spec.vocab_size
            results = await asyncio.gather(
                service.step_tokens("good1", [1, 2, 3]),
                service.step_tokens("bad", [1, vocab + 5]),
                service.step_tokens("good2", [4, 5]),
                return_exceptions=True,
            )
            return list(results)
        finally:
            await service.shutdown()

    good1, bad, good2 = asyncio.run(main())
    assert isinstance(bad, BadRequestError)
    assert not isinstance(good1, BaseException) and not isinstance(good2, BaseException)


def test_a_failed_batch_fails_its_steps_and_puts_every_cache_back(tiny_llama: TinyModel) -> None:
    """The node itself failing (here: the TSQP accelerator raising) fails the steps of
    that batch, and each session is exactly as before its step, so a retry works."""

    async def main() -> tuple[list[object], list[int], int]:
        service = service_for(tiny_llama, SchedulerLimits(prefill_chunk=4))
        try:
            for sid in ("a", "b"):
                await service.open_session(sid, 40, SamplingParams())
            await service.step_tokens("a", [7, 8])
            calls = {"n": 0}
            block = service.shard.layers[0]
            assert isinstance(block, Block)
            original = block.mlp.forward

            def failing(x: torch.Tensor) -> torch.Tensor:
                calls["n"] += 1
                if calls["n"] == 3:  # the third batch: b's prefill is mid-way
                    raise AcceleratorError("accelerator gave no answer")
                return original(x)

            block.mlp.forward = failing  # type: ignore[method-assign]
            results = await asyncio.gather(
                service.step_tokens("a", [9]),
                service.step_tokens("b", PROMPTS[0]),
                return_exceptions=True,
            )
            block.mlp.forward = original  # type: ignore[method-assign]
            lengths = [service.sessions.get(s).cache.length for s in ("a", "b")]
            retry = await service.step_tokens("b", PROMPTS[0])
            return list(results), lengths, retry.token
        finally:
            await service.shutdown()

    results, lengths, retried = asyncio.run(main())
    assert any(isinstance(r, AcceleratorFailedError) for r in results)
    assert isinstance(results[1], AcceleratorFailedError)
    a_ok = not isinstance(results[0], BaseException)
    assert lengths == [3 if a_ok else 2, 0]
    assert retried == greedy_alone(whole(tiny_llama), PROMPTS[0], 1)[0][0]


def test_a_cancelled_step_leaves_the_queue_and_its_cache(tiny_llama: TinyModel) -> None:
    async def main() -> tuple[int, int, int]:
        service = service_for(tiny_llama, SchedulerLimits(prefill_chunk=2))
        try:
            await service.open_session("gone", 40, SamplingParams())
            await service.open_session("stays", 40, SamplingParams())
            stays = asyncio.create_task(service.step_tokens("stays", PROMPTS[0]))
            gone = asyncio.create_task(service.step_tokens("gone", PROMPTS[4]))
            await until(lambda: service.sessions._sessions["gone"].cache.length > 0)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            await stays
            await until(lambda: not service.scheduler.waiting)
            length = service.sessions._sessions["gone"].cache.length
            again = await service.step_tokens("gone", PROMPTS[4])
            return length, service.scheduler.waiting, again.token
        finally:
            await service.shutdown()

    length, waiting, token = asyncio.run(main())
    assert length == 0 and waiting == 0
    assert token == greedy_alone(whole(tiny_llama), PROMPTS[4], 1)[0][0]


def test_pipeline_groups_split_the_active_sessions_into_smaller_batches(
    tiny_llama: TinyModel,
) -> None:
    """With groups=2, four decoding sessions run as two batches of two (so that on a
    two-node route each node computes one group while the other computes the next)."""
    shard = whole(tiny_llama)
    prompts = PROMPTS[:4]
    expected = [greedy_alone(shard, p, 8)[0] for p in prompts]

    async def main(groups: int) -> tuple[list[list[int]], int, int]:
        service = service_for(tiny_llama, SchedulerLimits(groups=groups))
        try:
            got = await asyncio.gather(
                *(generate(service, f"s{i}", p, 8) for i, p in enumerate(prompts))
            )
            return list(got), service.counters.batches, service.counters.steps
        finally:
            await service.shutdown()

    grouped, grouped_batches, steps = asyncio.run(main(2))
    together, together_batches, _ = asyncio.run(main(1))
    assert grouped == together == expected
    assert grouped_batches >= steps // 2  # never more than two steps in a batch
    assert together_batches < grouped_batches


def test_steps_that_arrive_a_few_milliseconds_apart_still_share_a_batch(
    tiny_llama: TinyModel,
) -> None:
    """The previous node sends a batch's steps one frame each, so they arrive spread
    over a few milliseconds (here 1, 4, 7 and 10 ms after each result). Waiting a
    share of the last decode batch's time (``gather_share``) collects all four into
    one batch; waiting only ``gather_s`` leaves the late ones for a batch of their own,
    which costs as much as the whole batch when decode is bound by reading weights.
    Each batch takes 120 ms here, so the share (25%) is 30 ms."""
    prompts = PROMPTS[:4]
    new = 6
    expected = [greedy_alone(whole(tiny_llama), p, new)[0] for p in prompts]

    async def main(share: float) -> tuple[list[list[int]], list[int]]:
        service = service_for(tiny_llama, SchedulerLimits(gather_s=0.002, gather_share=share))
        recorder = ThreadRecorder(service, slow=dict.fromkeys(range(200), 0.12))
        try:
            got = await asyncio.gather(
                *(
                    generate(service, f"s{i}", p, new, pause=0.001 + 0.003 * i)
                    for i, p in enumerate(prompts)
                )
            )
        finally:
            await service.shutdown()
        return list(got), recorder.sizes

    gathered, sizes = asyncio.run(main(0.25))
    assert gathered == expected
    # one batch per step, and at most one more: the first decode step, before any decode
    # batch was timed, has only ``gather_s``
    assert len(sizes) <= new + 1, sizes
    hurried, sizes = asyncio.run(main(0.0))
    assert hurried == expected
    assert len(sizes) >= new + 3, sizes  # the later sessions kept missing the batch


def test_a_session_that_stopped_stepping_holds_the_others_back_only_briefly(
    tiny_llama: TinyModel,
) -> None:
    """A session whose client stopped reading stays open but is not about to step.
    The scheduler waits for it only while its last step is recent (``recent_s``, or
    four decode batches' time): after that the session still decoding runs without
    the wait, where counting every open session would make each of its steps wait
    in vain."""
    new = 12
    expected = greedy_alone(whole(tiny_llama), PROMPTS[0], new + 1)[0]

    async def main(recent_s: float) -> tuple[list[int], int]:
        limits = SchedulerLimits(gather_share=0.25, recent_s=recent_s)
        service = service_for(tiny_llama, limits)
        ThreadRecorder(service, slow=dict.fromkeys(range(100), 0.02))  # 20 ms a batch
        try:
            for sid, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[1])):
                await service.open_session(sid, len(prompt) + new + 1, SamplingParams())
            first, _ = await asyncio.gather(
                service.step_tokens("a", PROMPTS[0]), service.step_tokens("b", PROMPTS[1])
            )
            tokens = [first.token]  # b's client stops reading here; b stays open
            for _ in range(new):
                tokens.append((await service.step_tokens("a", [tokens[-1]])).token)
            return tokens, service.counters.gather_timeouts
        finally:
            await service.shutdown()

    tokens, waited_in_vain = asyncio.run(main(0.05))  # b counts for 80 ms: 4 batches
    assert tokens == expected
    assert 1 <= waited_in_vain <= 6
    tokens, waited_in_vain = asyncio.run(main(float("inf")))  # b always counts
    assert tokens == expected
    assert waited_in_vain == new


class ThreadRecorder:
    """Wraps the service's ``shard.forward_batch`` to note which thread ran each batch,
    how many steps it held and how many sessions were stepping then (and, when asked,
    to make a given call slow or fail)."""

    def __init__(
        self, service: NodeService, slow: dict[int, float] | None = None, fail: int | None = None
    ) -> None:
        self.threads: list[int] = []
        self.sizes: list[int] = []  # steps in each batch
        self.active: list[int] = []
        self._service = service
        self._original = service.shard.forward_batch
        self._slow = slow or {}
        self._fail = fail
        service.shard.forward_batch = self  # type: ignore[method-assign]

    def __call__(self, *args: object, **kwargs: object) -> list[torch.Tensor]:
        call = len(self.threads)
        self.threads.append(threading.get_ident())
        self.sizes.append(len(args[0]))  # type: ignore[arg-type]
        self.active.append(self._service.sessions.stepping())
        if call == self._fail:
            raise AcceleratorError("accelerator gave no answer")
        time.sleep(self._slow.get(call, 0.0))
        return self._original(*args, **kwargs)  # type: ignore[arg-type]


def test_a_lone_sessions_decode_steps_run_on_the_loops_thread(tiny_llama: TinyModel) -> None:
    """One session decoding: its one-row steps skip the compute thread (after the
    first, which measures how long a step takes), and give the same tokens."""
    prompt, new = PROMPTS[0], 8

    async def main() -> tuple[list[int], ThreadRecorder, int, NodeService]:
        service = service_for(tiny_llama)
        recorder = ThreadRecorder(service)
        try:
            return (
                await generate(service, "a", prompt, new),
                recorder,
                threading.get_ident(),
                service,
            )
        finally:
            await service.shutdown()

    tokens, recorder, loop_thread, service = asyncio.run(main())
    assert tokens == greedy_alone(whole(tiny_llama), prompt, new)[0]
    on_loop = [t == loop_thread for t in recorder.threads]
    # the prefill (20 rows) and the first one-row step on the compute thread, the rest inline
    assert on_loop == [False, False] + [True] * (new - 2)
    assert service.counters.inline_batches == new - 2


def test_steps_stay_on_the_compute_thread_with_two_sessions_or_when_turned_off(
    tiny_llama: TinyModel,
) -> None:
    async def main(
        limits: SchedulerLimits, sessions: int
    ) -> tuple[list[bool], list[int], list[list[int]]]:
        service = service_for(tiny_llama, limits)
        recorder = ThreadRecorder(service)
        try:
            got = await asyncio.gather(
                *(generate(service, f"s{i}", PROMPTS[i], 6) for i in range(sessions))
            )
        finally:
            await service.shutdown()
        on_loop = [t == threading.get_ident() for t in recorder.threads]
        return on_loop, recorder.active, list(got)

    # groups=2: each session's steps form a batch of their own, one row each, so only
    # the other active session keeps them off the loop (whose I/O serves that session)
    on_loop, active, got = asyncio.run(main(SchedulerLimits(groups=2), 2))
    beside = [loop for loop, n in zip(on_loop, active, strict=True) if n > 1]
    assert len(beside) >= 6
    assert not any(beside), "a step ran on the loop's thread beside another session"
    assert got == [greedy_alone(whole(tiny_llama), PROMPTS[i], 6)[0] for i in range(2)]
    on_loop, _, got = asyncio.run(main(SchedulerLimits(inline_step_s=0), 1))
    assert not any(on_loop)
    assert got == [greedy_alone(whole(tiny_llama), PROMPTS[0], 6)[0]]


def test_a_slow_step_sends_the_next_one_back_to_the_compute_thread(
    tiny_llama: TinyModel,
) -> None:
    """A step that took longer than ``inline_step_s`` means the next would hold the
    event loop that long: it goes to the compute thread, and a fast one brings the
    steps after it back."""

    async def main() -> tuple[list[bool], list[int]]:
        service = service_for(tiny_llama, SchedulerLimits(inline_step_s=0.05))
        recorder = ThreadRecorder(service, slow={3: 0.08})
        try:
            tokens = await generate(service, "a", PROMPTS[1], 7)
        finally:
            await service.shutdown()
        return [t == threading.get_ident() for t in recorder.threads], tokens

    on_loop, tokens = asyncio.run(main())
    assert on_loop == [False, False, True, True, False, True, True]
    assert tokens == greedy_alone(whole(tiny_llama), PROMPTS[1], 7)[0]


def test_a_failed_inline_step_fails_alone_and_leaves_the_cache_as_before(
    tiny_llama: TinyModel,
) -> None:
    """The node failing (the TSQP accelerator) during a step on the loop's thread
    fails that step like any batch: the session's cache is put back, and a retry
    gives the token it would have given."""

    async def main() -> tuple[BaseException | None, int, int, int, bool]:
        service = service_for(tiny_llama)
        recorder = ThreadRecorder(service, fail=3)
        try:
            await service.open_session("a", 40, SamplingParams())
            first = await service.step_tokens("a", PROMPTS[1])
            second = await service.step_tokens("a", [first.token])
            third = await service.step_tokens("a", [second.token])
            length = service.sessions.get("a").cache.length
            error: BaseException | None = None
            try:
                await service.step_tokens("a", [third.token])
            except AcceleratorFailedError as exc:
                error = exc
            after = service.sessions.get("a").cache.length
            retry = await service.step_tokens("a", [third.token])
            failed_on_loop = recorder.threads[3] == threading.get_ident()
            return error, length, after, retry.token, failed_on_loop
        finally:
            await service.shutdown()

    error, length, after, retried, failed_on_loop = asyncio.run(main())
    assert failed_on_loop, "the failing step did not run on the loop's thread"
    assert isinstance(error, AcceleratorFailedError)
    assert after == length == len(PROMPTS[1]) + 2
    assert retried == greedy_alone(whole(tiny_llama), PROMPTS[1], 4)[0][3]
