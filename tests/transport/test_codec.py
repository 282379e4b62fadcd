from __future__ import annotations

import msgpack
import pytest
import torch

from teeshard.transport.codec import ProtocolError, decode, encode, tensor_from_wire, tensor_to_wire
from teeshard.transport.messages import (
    OpenMsg,
    ResultMsg,
    SamplingHistory,
    SamplingParams,
    StepMsg,
    WireTensor,
    logprobs_from_wire,
)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_round_trip(dtype: str) -> None:
    tensor = torch.randn(1, 5, 8)
    back = tensor_from_wire(tensor_to_wire(tensor, dtype))
    assert back.shape == (1, 5, 8) and str(back.dtype) == f"torch.{dtype}"
    assert torch.equal(back, tensor.to(back.dtype))


def test_message_round_trip() -> None:
    wire = tensor_to_wire(torch.ones(1, 2, 3), "float32")
    for message in (
        OpenMsg(id=1, session="s", max_len=9, sampling=SamplingParams(temperature=0.5, seed=4)),
        StepMsg(id=2, session="s", hidden=wire),
        StepMsg(id=3, session="s", tokens=(1, 2, 3)),
    ):
        assert decode(encode(message)) == message


def test_raw_bytes_are_little_endian_float32() -> None:
    wire = tensor_to_wire(torch.tensor([[[1.0]]]), "float32")
    assert wire.data == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        (WireTensor(dtype="float64", shape=(1,), data=bytes(8)), "dtype"),
        (WireTensor(dtype="float32", shape=(2, 2), data=bytes(15)), "needs 16 bytes"),
        (WireTensor(dtype="float32", shape=(-1, 4), data=bytes(16)), "negative"),
    ],
)
def test_bad_tensors(wire: WireTensor, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        tensor_from_wire(wire)


def test_bad_frames_keep_the_request_id_when_known() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(msgpack.packb({"v": 1, "type": "step", "id": 42, "session": 7}))
    assert err.value.request_id == 42
    with pytest.raises(ProtocolError, match="msgpack"):
        decode(b"\xc1")
    with pytest.raises(ProtocolError, match="invalid"):
        decode(msgpack.packb({"v": 1, "type": "step", "id": "1", "session": "s"}))  # no coercion


def test_sampling_history_and_logprobs_travel_and_nonsense_is_refused() -> None:
    history = SamplingHistory(prompt_tokens=(3, 5), output_tokens=(9, 9, 2))
    params = SamplingParams(temperature=0.7, seed=1, frequency_penalty=1.0, logprobs=2)
    message = OpenMsg(id=1, session="s", max_len=9, sampling=params, history=history)
    assert decode(encode(message)) == message
    frame = msgpack.unpackb(encode(message))
    for bad in ({"output_tokens": [-1]}, {"prompt_tokens": [1.5]}):
        frame["history"] = bad
        with pytest.raises(ProtocolError):
            decode(msgpack.packb(frame))
    frame["history"] = None
    frame["sampling"] = {**frame["sampling"], "eos_token_ids": [-3]}
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(frame))
    result = decode(
        msgpack.packb(
            {"v": 1, "type": "result", "id": 2, "token": 4,
             "logprobs": {"logprob": -0.5, "top_ids": [4, 1], "top_logprobs": [-0.5, -1.0]}}
        )
    )  # fmt: skip
    assert isinstance(result, ResultMsg) and result.logprobs is not None
    assert logprobs_from_wire(4, result.logprobs).top == ((4, -0.5), (1, -1.0))
    uneven = result.logprobs.model_copy(update={"top_logprobs": (-0.5,)})
    with pytest.raises(ValueError):
        logprobs_from_wire(4, uneven)
