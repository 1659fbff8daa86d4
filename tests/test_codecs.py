"""Update codecs: what a user's update becomes on the wire, what comes back, and what error feedback keeps."""

from __future__ import annotations

import pytest
import torch

from unitedllm.comm.codecs import TensorSpec, UpdateCodec, available, codec_for, register
from unitedllm.errors import ConfigError, ProtocolError, UpdateRejected
from unitedllm.protocol.payload import decode_tensors, encode_tensors

LIKE_DTYPES = {"a.lora_A.weight": torch.float32, "a.lora_B.weight": torch.bfloat16, "bias": torch.float32}


def update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(8, 300, generator=g) * 1e-3,
        "a.lora_B.weight": (torch.randn(300, 8, generator=g) * 1e-2).to(torch.bfloat16),
        "bias": torch.randn(5, generator=g),
    }


def specs(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


def through_the_wire(codec: UpdateCodec, tensors: dict[str, torch.Tensor], residual=None):
    encoded = codec.encode(tensors, residual)
    wire = decode_tensors(encode_tensors(encoded.wire))
    return codec.decode(wire, specs(tensors)), encoded


def test_every_codec_is_registered() -> None:
    assert available() == ["bf16", "fp16", "int8", "none", "topk"]


@pytest.mark.parametrize("name", ["none", "bf16", "fp16", "int8", "topk"])
def test_decoding_gives_the_reference_names_shapes_and_dtypes(name: str) -> None:
    tensors = update()
    decoded, _ = through_the_wire(codec_for(name), tensors)
    assert {n: (tuple(t.shape), t.dtype) for n, t in decoded.items()} == {
        n: (tuple(t.shape), t.dtype) for n, t in tensors.items()
    }


def test_none_is_exact_and_the_casts_are_within_their_precision() -> None:
    tensors = {"w": torch.randn(1000) * 1e-3}
    exact, _ = through_the_wire(codec_for("none"), tensors)
    assert torch.equal(exact["w"], tensors["w"])
    # Half a unit in the last place, relative; fp16's subnormals (below 2^-14) have a fixed step of 2^-24.
    for name, rel, floor in (("bf16", 2**-8, 0.0), ("fp16", 2**-11, 2**-25)):
        decoded, _ = through_the_wire(codec_for(name), tensors)
        assert torch.all((decoded["w"] - tensors["w"]).abs() <= rel * tensors["w"].abs() + floor), name


def test_fp16_refuses_a_value_it_cannot_hold() -> None:
    with pytest.raises(UpdateRejected, match="65504"):
        codec_for("fp16").encode({"w": torch.tensor([1e6])})


def test_int8_error_is_at_most_half_a_step_of_each_blocks_own_scale() -> None:
    codec = codec_for("int8", block_size=64)
    value = torch.randn(1000) * 1e-3
    value[10] = 5.0  # one outlier costs precision in its own block only
    decoded, encoded = through_the_wire(codec, {"w": value})
    scale = encoded.wire["w::scale"]
    step = torch.repeat_interleave(scale, 64)[:1000]
    assert torch.all((decoded["w"] - value).abs() <= step / 2 + 1e-9)
    assert float((decoded["w"] - value)[64:].abs().max()) < 1e-4  # blocks without the outlier stay fine


def test_topk_sends_exactly_the_largest_entries_with_sorted_indices() -> None:
    value = torch.randn(1000)
    decoded, encoded = through_the_wire(codec_for("topk", fraction=0.05), {"w": value})
    kept = torch.topk(value.abs(), 50).indices.sort().values
    assert torch.equal(encoded.wire["w::idx"].to(torch.int64), kept)
    assert torch.equal(decoded["w"][kept], value[kept])
    assert int((decoded["w"] != 0).sum()) == 50


@pytest.mark.parametrize(("name", "params"), [("int8", {"block_size": 32}), ("topk", {"fraction": 0.02})])
def test_error_feedback_loses_nothing_over_rounds(name: str, params: dict[str, float]) -> None:
    """Σ sent = Σ updates − the last residual: what a round's encoding drops is sent later."""
    codec = codec_for(name, **params)
    residual = None
    sent_total = torch.zeros(500)
    true_total = torch.zeros(500)
    for round_idx in range(30):
        value = {"w": torch.randn(500, generator=torch.Generator().manual_seed(round_idx)) * 1e-2}
        decoded, encoded = through_the_wire(codec, value, residual)
        residual = encoded.residual
        sent_total += decoded["w"]
        true_total += value["w"]
    assert torch.allclose(sent_total + residual["w"], true_total, atol=1e-5)


def test_with_error_feedback_topk_sends_a_small_steady_coordinate_once_it_has_grown() -> None:
    codec = codec_for("topk", fraction=0.01)  # one entry of 100 per round
    value = {"w": torch.zeros(100)}
    value["w"][0], value["w"][99] = 1.0, 0.05
    residual = None
    sent = torch.zeros(100)
    for _ in range(40):
        decoded, encoded = through_the_wire(codec, value, residual)
        residual = encoded.residual
        sent += decoded["w"]
    # Without the residual index 99 (0.05 a round) would never beat index 0 (1.0 a round); with it, it
    # is sent once it has accumulated, and nothing of it is lost.
    assert float(sent[99]) > 1.0
    assert float(sent[99] + residual["w"][99]) == pytest.approx(0.05 * 40)


@pytest.mark.parametrize("name", ["none", "bf16", "int8", "topk"])
def test_the_same_update_gives_the_same_bytes(name: str) -> None:
    codec = codec_for(name)
    assert encode_tensors(codec.encode(update()).wire) == encode_tensors(codec.encode(update()).wire)


def test_wire_sizes_match_what_each_codec_promises() -> None:
    tensors = {"w": torch.randn(1 << 18)}
    size = {name: len(encode_tensors(codec_for(name).encode(tensors).wire)) for name in available()}
    assert size["none"] / size["bf16"] > 1.99
    assert size["none"] / size["int8"] > 3.9
    assert size["none"] / size["topk"] > 45  # 1% of entries, 8 bytes each


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("none", lambda w: w.update({"stranger::v": torch.zeros(1)}), "unexpected tensor"),
        ("none", lambda w: w.pop("bias::v"), "lacks 1 tensor"),
        ("none", lambda w: w.update({"bias::v": torch.zeros(6)}), "malformed"),
        ("int8", lambda w: w.update({"bias::scale": torch.tensor([float("nan")])}), "malformed"),
        ("int8", lambda w: w.pop("bias::scale"), "malformed"),
        ("int8", lambda w: w.update({"bias::q": torch.zeros(5, dtype=torch.int16)}), "malformed"),
        ("topk", lambda w: w.update({"bias::idx": torch.tensor([9], dtype=torch.int32)}), "malformed"),
        ("topk", lambda w: w.update({"bias::idx": torch.tensor([-1], dtype=torch.int32)}), "malformed"),
        (
            "topk",
            lambda w: w.update(
                {"bias::idx": torch.tensor([3, 1], dtype=torch.int32), "bias::val": torch.zeros(2)}
            ),
            "malformed",
        ),
    ],
)
def test_a_malformed_payload_is_refused_never_guessed_at(name: str, mutate, message: str) -> None:
    tensors = update()
    codec = codec_for(name)
    wire = dict(codec.encode(tensors).wire)
    mutate(wire)
    with pytest.raises(ProtocolError, match=message):
        codec.decode(wire, specs(tensors), where="update from rank 2: ")


def test_unknown_codec_and_bad_parameters_are_config_errors_naming_the_value() -> None:
    with pytest.raises(
        ConfigError, match=r"comm_args.update_codec: unknown codec 'zip'; choose one of bf16, fp16"
    ):
        codec_for("zip")
    with pytest.raises(ConfigError, match=r"int8: block_size must be an integer from 8 to 1048576, got 3"):
        codec_for("int8", block_size=3)
    with pytest.raises(ConfigError, match=r"topk: fraction must be in \(0, 1\], got 0"):
        codec_for("topk", fraction=0)


def test_a_codec_name_is_registered_once() -> None:
    class Again(UpdateCodec):
        name = "int8"

        def encode_tensor(self, value):  # pragma: no cover - never called
            return {}

        def decode_tensor(self, parts, spec):  # pragma: no cover - never called
            return torch.zeros(0)

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
