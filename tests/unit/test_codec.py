"""Tests for asyndgan.codec: round trips, precision on real gradients, defaults, hostile messages."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import numpy as np
import pytest
import torch
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from asyndgan.codec import (
    DEFAULT_LIMITS,
    IMAGE_CODEC,
    LABEL_CODEC,
    LOSSLESS,
    Codec,
    CodecError,
    LimitExceeded,
    Limits,
    decode,
    encode,
    raw_nbytes,
    roundtrip,
    wire_nbytes,
)
from asyndgan.v1 import tensor_pb2

FLOAT_SPECS = ["f32", "f32+zstd", "f32+lz4", "bf16", "bf16+zstd", "bf16+lz4", "f16", "f16+zstd", "f16+lz4"]
U8_SPECS = ["u8", "u8+zstd", "u8+lz4", "labels"]
SHAPES = array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _raises(cls: type[CodecError], msg: tensor_pb2.Tensor, limits: Limits = DEFAULT_LIMITS) -> CodecError:
    """Decode msg, assert it raises exactly cls, return the exception."""
    with pytest.raises(CodecError) as info:
        decode(msg, limits)
    assert type(info.value) is cls, repr(info.value)
    return info.value


def _mutated(msg: tensor_pb2.Tensor, shape: list[int] | None = None, **fields: object) -> tensor_pb2.Tensor:
    """A copy of msg with some fields replaced."""
    out = tensor_pb2.Tensor()
    out.CopyFrom(msg)
    if shape is not None:
        del out.shape[:]
        out.shape.extend(shape)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def _image(seed: int = 0, shape: tuple[int, ...] = (8, 1, 64, 64)) -> torch.Tensor:
    """A smooth image-like tensor in [-1, 1]: blurred noise plus structure."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    kernel = torch.ones(shape[1], 1, 5, 5) / 25
    blurred = torch.nn.functional.conv2d(noise, kernel, padding=2, groups=shape[1])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[2]), torch.linspace(-1, 1, shape[3]), indexing="ij")
    return torch.tanh(blurred + torch.sin(4 * xx) * torch.cos(3 * yy))


def _labels(seed: int = 0, shape: tuple[int, int, int] = (8, 64, 64), classes: int = 4) -> torch.Tensor:
    """A label map with blob structure: thresholded smooth noise."""
    smooth = _image(seed, (shape[0], 1, shape[1], shape[2]))[:, 0]
    edges = torch.linspace(-0.6, 0.6, classes - 1)
    return torch.bucketize(smooth, edges).to(torch.uint8)


def _discriminator_grad(seed: int = 0) -> torch.Tensor:
    """A real discriminator-style gradient w.r.t. the generator's output (pix2pix loss)."""
    torch.manual_seed(seed)
    disc = torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(16, 1, 4, 1, 1)
    )
    fake = _image(seed, (8, 1, 64, 64)).requires_grad_(True)
    cond = _labels(seed, (8, 64, 64)).float().unsqueeze(1).expand(8, 3, 64, 64) / 3
    target = _image(seed + 1, (8, 1, 64, 64))
    logits = disc(torch.cat([fake, cond], dim=1))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits)
    ) + 100 * torch.nn.functional.l1_loss(fake, target)
    (grad,) = torch.autograd.grad(loss, fake)
    return grad


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --- round trips -------------------------------------------------------------------------------


@FAST
@given(
    arr=arrays(np.float32, SHAPES, elements=st.floats(-(2.0**100), 2.0**100, width=32)),
    spec=st.sampled_from(["q8", "q8+zstd", "q8+lz4", "q4", "q4+zstd", "q2", "q2+lz4", "q1", "q1+zstd"]),
)
def test_q_round_trip_within_half_a_step_per_block(arr: np.ndarray, spec: str) -> None:
    x = torch.from_numpy(arr)
    msg = encode(x, spec)
    y = decode(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, roundtrip(x, Codec.parse(spec)))  # roundtrip is what the wire yields
    flat, out = x.reshape(-1).double(), y.reshape(-1).double()
    levels = {"q8": 127, "q4": 7, "q2": 1, "q1": 0}[spec[:2]]
    for start in range(0, flat.numel(), msg.block):
        block, got = flat[start : start + msg.block], out[start : start + msg.block]
        if levels:
            step = float(block.abs().max()) / levels
            assert float((got - block).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-30
        else:  # the sign times the mean magnitude
            assert torch.all((got >= 0) == (block >= 0))
            torch.testing.assert_close(got.abs(), block.abs().mean().expand_as(got), rtol=1e-5, atol=1e-30)
    # idempotent: what a site sent re-encodes to itself (q1's mean of equal values may move by an ulp)
    torch.testing.assert_close(decode(encode(y, spec)), y, rtol=1e-6 if levels == 0 else 0, atol=0)


def test_fewer_bits_fewer_bytes() -> None:
    x = _discriminator_grad()
    sizes = [wire_nbytes(encode(x, q)) for q in ("q8", "q4", "q2", "q1")]
    n = x.numel()
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] < n / 8 + 4 * n / 64 + 64  # one bit per element plus the scales


def test_q8_rejects_non_finite_and_integers() -> None:
    with pytest.raises(CodecError, match="finite"):
        encode(torch.tensor([1.0, float("nan")]), "q8")
    with pytest.raises(CodecError, match="floating-point"):
        encode(torch.arange(4), "q8")
    with pytest.raises(CodecError):
        roundtrip(torch.zeros(2), LABEL_CODEC)


def test_roundtrip_matches_decode_for_every_float_codec() -> None:
    x = _discriminator_grad()
    for spec in [*FLOAT_SPECS, "q8+zstd", "q4", "q2+zstd", "q1"]:
        assert torch.equal(roundtrip(x, Codec.parse(spec)), decode(encode(x, spec))), spec


@pytest.mark.filterwarnings("error")
@FAST
@given(
    arr=arrays(np.float32, SHAPES, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    spec=st.sampled_from(["f32", "f32+zstd", "f32+lz4", "raw"]),
)
def test_f32_round_trip_is_bit_exact(arr: np.ndarray, spec: str) -> None:
    x = torch.from_numpy(arr)
    msg = encode(x, spec)
    y = decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert y.dtype == torch.float32 and y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    y += 1  # owned and writable


def _normal_floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    magnitude = st.floats(min_value=lo, max_value=hi, width=32)
    return st.one_of(st.just(0.0), st.tuples(magnitude, st.booleans()).map(lambda p: -p[0] if p[1] else p[0]))


@pytest.mark.filterwarnings("error")
@FAST
@given(
    data=st.data(),
    shape=SHAPES,
    codec=st.sampled_from([("bf16", 2.0**-8, 2.0**-100, 2.0**100), ("f16", 2.0**-11, 2.0**-14, 6e4)]),
    compression=st.sampled_from(["", "+zstd", "+lz4"]),
)
def test_half_round_trip_within_precision(
    data: st.DataObject, shape: tuple[int, ...], codec: tuple[str, float, float, float], compression: str
) -> None:
    dtype, rel, lo, hi = codec
    arr = data.draw(arrays(np.float32, shape, elements=_normal_floats(lo, hi)))
    x = torch.from_numpy(arr)
    y = decode(encode(x, dtype + compression))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.all((y - x).abs() <= rel * x.abs())


@pytest.mark.filterwarnings("error")
@FAST
@given(data=st.data(), shape=SHAPES, top=st.sampled_from([1, 3, 15, 255]), spec=st.sampled_from(U8_SPECS))
def test_u8_round_trip_exact_for_every_bit_width(
    data: st.DataObject, shape: tuple[int, ...], top: int, spec: str
) -> None:
    arr = data.draw(arrays(np.int64, shape, elements=st.integers(0, top)))
    msg = encode(arr, spec)
    y = decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert y.dtype == torch.uint8 and y.shape == shape == tuple(msg.shape)
    assert np.array_equal(y.numpy(), arr)
    n = arr.size
    peak = int(arr.max()) if n else 0
    expected_bits = 1 if peak < 2 else 2 if peak < 4 else 4 if peak < 16 else 0
    assert msg.bits == expected_bits
    assert msg.raw_size == ((n * expected_bits + 7) // 8 if expected_bits else n)
    y += 1


@given(
    dtype=st.sampled_from(["f32", "bf16", "f16", "q8", "q4", "q2", "q1", "u8"]),
    compression=st.sampled_from(["none", "zstd", "lz4"]),
    level=st.integers(-5, 22),
)
def test_codec_parse_str_round_trip(dtype: str, compression: str, level: int) -> None:
    codec = Codec(dtype, compression, level if compression == "zstd" else 1)
    assert Codec.parse(str(codec)) == codec
    assert Codec.parse(f" {str(codec).upper()} ") == codec


def test_parse_aliases_and_levels() -> None:
    assert Codec.parse("raw") == Codec("f32", "none") == LOSSLESS
    assert Codec.parse("labels") == Codec("u8", "zstd") == LABEL_CODEC
    assert Codec.parse("labels:5") == Codec("u8", "zstd", 5)
    assert Codec.parse("bf16+zstd:3") == Codec("bf16", "zstd", 3)
    assert str(Codec.parse("bf16+zstd:3")) == "bf16+zstd:3"
    assert str(Codec.parse("f32+none")) == "f32"


@pytest.mark.parametrize(
    "spec", ["", "f64", "bf16+gzip", "f32+", "bf16+zstd+lz4", "bf16+lz4:3", "bf16+zstd:x", "bf16+zstd:99"]
)
def test_parse_rejects_unknown_specs(spec: str) -> None:
    with pytest.raises(CodecError) as info:
        Codec.parse(spec)
    assert type(info.value) is CodecError
    if spec not in ("bf16+zstd:99",):
        assert "valid forms" in str(info.value)


def test_shuffle_and_packing_layouts() -> None:
    x = torch.tensor([1.0, -2.5, 3.25])
    msg = encode(x, "bf16+zstd")
    assert msg.shuffled and msg.raw_size == 6
    payload = zstandard.ZstdDecompressor().decompress(msg.data)
    words = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(3, 2)
    assert payload == words.T.tobytes()
    assert not encode(x, "bf16").shuffled
    assert encode(x, "bf16").data == words.tobytes()
    # Bit packing is little end first within a byte; padding bits are zero.
    assert encode(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), "u8").data == bytes([0b00001101, 1])
    assert encode(torch.tensor([1, 2, 3, 0, 1]), "u8").data == bytes([0b00111001, 1])
    assert encode(torch.tensor([1, 15, 7]), "u8").data == bytes([0xF1, 7])
    assert encode(torch.tensor([16, 255]), "u8").data == bytes([16, 255])


def test_encode_accepts_varied_inputs() -> None:
    base = _image(3, (2, 3, 5, 4))
    noncontig = base.transpose(1, 3)
    assert torch.equal(decode(encode(noncontig, LOSSLESS)), noncontig)
    assert torch.equal(decode(encode(base.double().requires_grad_(True), LOSSLESS)), base)
    big_endian = base.numpy().astype(">f4")[:, ::2]
    assert torch.equal(decode(encode(big_endian, "f32+lz4")), torch.from_numpy(big_endian.astype(np.float32)))
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.equal(decode(encode(mask, LABEL_CODEC)), mask.to(torch.uint8))
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16):
        labels = torch.tensor([0, 7, 100], dtype=dtype)
        assert decode(encode(labels, "u8")).tolist() == [0, 7, 100]


@pytest.mark.parametrize("spec", FLOAT_SPECS + U8_SPECS)
def test_empty_tensors_round_trip(spec: str) -> None:
    x = torch.zeros(0, 3) if spec in FLOAT_SPECS else torch.zeros(2, 0, 5, dtype=torch.uint8)
    y = decode(encode(x, spec))
    assert y.shape == x.shape
    assert y.dtype == (torch.float32 if spec in FLOAT_SPECS else torch.uint8)


def test_encode_rejects_wrong_inputs() -> None:
    cases: list[tuple[object, str]] = [
        (torch.rand(3), "u8"),
        (torch.tensor([0, -1]), "labels"),
        (torch.tensor([0, 256]), "u8"),
        (torch.tensor([1, 2]), "bf16"),
        (np.array(["a"]), "f32"),
        ([1.0, 2.0], "f32"),
    ]
    for x, spec in cases:
        with pytest.raises(CodecError):
            encode(x, spec)  # type: ignore[arg-type]


def test_concurrent_use_is_thread_safe() -> None:
    x = _image(5)
    labels = _labels(5)

    def work(i: int) -> bool:
        for _ in range(20):
            img = encode(x * i, IMAGE_CODEC)
            lab = encode(labels, LABEL_CODEC)
            if not (torch.equal(decode(lab), labels) and _rel_l2(decode(img), x * i) < 4e-3):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(1, 9)))


# --- precision on real data and defaults --------------------------------------------------------


@pytest.mark.parametrize("spec", ["bf16", "bf16+zstd", "bf16+lz4"])
def test_bf16_on_real_discriminator_gradient(spec: str) -> None:
    grad = _discriminator_grad()
    assert grad.abs().max() > 0 and torch.isfinite(grad).all()
    msg = encode(grad, spec)
    assert _rel_l2(decode(msg), grad) <= 2e-3
    assert wire_nbytes(msg) < raw_nbytes(msg) / 1.9


def test_defaults() -> None:
    assert str(IMAGE_CODEC) == "bf16+zstd" and IMAGE_CODEC.level == 1
    assert str(LOSSLESS) == "f32" and str(LABEL_CODEC) == "u8+zstd"
    img = encode(_image())
    assert (img.dtype, img.compression, img.shuffled) == (tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.COMPRESSION_ZSTD, True)
    assert wire_nbytes(img) < raw_nbytes(img) / 2.5
    labels = _labels(classes=4)
    assert int(labels.max()) == 3
    lab = encode(labels, LABEL_CODEC)
    assert (lab.dtype, lab.compression, lab.bits) == (tensor_pb2.DTYPE_UINT8, tensor_pb2.COMPRESSION_ZSTD, 2)
    assert lab.raw_size == labels.numel() // 4
    assert wire_nbytes(lab) < lab.raw_size / 2
    assert torch.equal(decode(lab), labels)


def test_size_helpers() -> None:
    msg = encode(torch.rand(2, 3), "bf16+zstd")
    assert raw_nbytes(msg) == 24
    assert wire_nbytes(msg) == len(msg.SerializeToString())
    assert raw_nbytes(encode(torch.ones(2, 3, dtype=torch.uint8), "labels")) == 6


# --- hostile messages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_msg() -> tensor_pb2.Tensor:
    return encode(torch.arange(12, dtype=torch.float32).reshape(3, 4), "f32")


def test_rejects_bad_enums_and_flags(f32_msg: tensor_pb2.Tensor) -> None:
    _raises(CodecError, _mutated(f32_msg, dtype=tensor_pb2.DTYPE_UNSPECIFIED))
    _raises(CodecError, _mutated(f32_msg, dtype=9))
    _raises(CodecError, _mutated(f32_msg, compression=7))
    _raises(CodecError, _mutated(f32_msg, bits=2))
    _raises(CodecError, _mutated(f32_msg, block=64))
    q8 = encode(torch.rand(3, 4), "q8")
    _raises(CodecError, _mutated(q8, block=0))
    _raises(CodecError, _mutated(q8, block=1 << 21))
    _raises(CodecError, _mutated(q8, shuffled=True))
    _raises(CodecError, _mutated(q8, block=4))  # 3 scales expected, 1 sent: raw_size mismatch
    _raises(CodecError, _mutated(q8, bits=3))
    q2 = encode(torch.rand(3, 4), "q2")
    beyond = q2.data[:4] + bytes([0xFF, 0xFF, 0xFF])  # code 3 = +2 in a ternary quantizer
    _raises(CodecError, _mutated(q2, data=beyond, crc32=zlib.crc32(beyond)))
    nan_scale = bytes(np.float32([np.nan]).view(np.uint8)) + q8.data[4:]
    _raises(CodecError, _mutated(q8, data=nan_scale, crc32=zlib.crc32(nan_scale)))
    labels = encode(torch.tensor([0, 1, 2, 3, 2]), "u8")
    _raises(CodecError, _mutated(labels, bits=3))
    _raises(CodecError, _mutated(labels, bits=8))
    _raises(CodecError, _mutated(labels, shuffled=True))


def test_rejects_bad_shapes(f32_msg: tensor_pb2.Tensor) -> None:
    _raises(CodecError, _mutated(f32_msg, shape=[-3, -4]))
    _raises(LimitExceeded, _mutated(f32_msg, shape=[1] * 9))
    _raises(LimitExceeded, _mutated(f32_msg, shape=[2**40, 2**40]))
    _raises(LimitExceeded, _mutated(f32_msg, shape=[0, 2**62]))
    _raises(LimitExceeded, f32_msg, Limits(max_elements=11))
    _raises(LimitExceeded, f32_msg, Limits(max_bytes=47))
    _raises(LimitExceeded, f32_msg, Limits(max_dims=1))
    assert decode(f32_msg, Limits(max_elements=12, max_bytes=48, max_dims=2)).shape == (3, 4)


def test_rejects_size_mismatches(f32_msg: tensor_pb2.Tensor) -> None:
    _raises(CodecError, _mutated(f32_msg, shape=[3, 5]))
    _raises(CodecError, _mutated(f32_msg, raw_size=44))
    _raises(CodecError, _mutated(f32_msg, raw_size=48, data=f32_msg.data[:-4]))
    _raises(CodecError, _mutated(f32_msg, data=f32_msg.data[:-1]))
    _raises(CodecError, _mutated(f32_msg, data=f32_msg.data + b"\0"))
    zmsg = encode(torch.rand(3, 4), "f32+zstd")
    _raises(CodecError, _mutated(zmsg, data=zmsg.data + bytes(10_000)))  # longer than any compressor emits
    other = zstandard.ZstdCompressor().compress(bytes(40))
    _raises(CodecError, _mutated(zmsg, data=other))  # frame declares 40 bytes, raw_size is 48


def test_rejects_wrong_packed_length() -> None:
    labels = encode(torch.tensor([0, 1, 2, 3, 2, 1, 0]), "u8")  # 7 values at 2 bits -> 2 bytes
    assert (labels.bits, labels.raw_size) == (2, 2)
    longer = labels.data + b"\0"
    _raises(CodecError, _mutated(labels, raw_size=3, data=longer, crc32=zlib.crc32(longer)))
    _raises(CodecError, _mutated(labels, data=longer, crc32=zlib.crc32(longer)))
    _raises(CodecError, _mutated(labels, raw_size=1, data=labels.data[:1], crc32=zlib.crc32(labels.data[:1])))
    # Garbage in the padding bits past the element count is ignored.
    padded = bytes([labels.data[0], labels.data[1] | 0b11000000])
    assert decode(_mutated(labels, data=padded, crc32=zlib.crc32(padded))).tolist() == [0, 1, 2, 3, 2, 1, 0]


def test_checksum_mismatch(f32_msg: tensor_pb2.Tensor) -> None:
    data = bytearray(f32_msg.data)
    data[17] ^= 0x40
    err = _raises(CodecError, _mutated(f32_msg, data=bytes(data)))
    assert "checksum mismatch" in str(err)
    _raises(CodecError, _mutated(f32_msg, crc32=f32_msg.crc32 ^ 1))


@pytest.mark.parametrize("spec", ["f32+zstd", "bf16+zstd", "labels", "f32+lz4", "f16+lz4", "u8+lz4"])
def test_corrupt_compressed_data(spec: str) -> None:
    x = _labels(1, (2, 16, 16)) if spec in U8_SPECS else _image(1, (2, 1, 16, 16))
    msg = encode(x, spec)
    rng = np.random.default_rng(0)
    for _ in range(30):
        data = bytearray(msg.data)
        for i in rng.integers(0, len(data), 3):
            data[i] ^= int(rng.integers(1, 256))
        _raises(CodecError, _mutated(msg, data=bytes(data)))
    _raises(CodecError, _mutated(msg, data=rng.bytes(len(msg.data))))
    _raises(CodecError, _mutated(msg, data=msg.data[: len(msg.data) // 2]))
    _raises(CodecError, _mutated(msg, data=b""))
    if "zstd" in spec or spec == "labels":
        _raises(CodecError, _mutated(msg, data=msg.data + b"trailing"))


def _zstd_bomb(size: int, declare_size: bool) -> bytes:
    """size zero bytes compressed by zstd, built without holding them in memory."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=declare_size).compressobj(
        size=size if declare_size else -1
    )
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(size >> 20)]
    parts.append(cobj.flush())
    return b"".join(parts)


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_zstd_and_lz4_bombs_are_refused_without_allocating() -> None:
    size, limits = 200 << 20, Limits(max_bytes=1 << 20)
    bomb = _zstd_bomb(size, declare_size=True)
    assert zstandard.frame_content_size(bomb) == size and len(bomb) < 1 << 20
    # Honest header: the declared size alone is over the limit.
    honest = tensor_pb2.Tensor(
        shape=[size // 4],
        dtype=tensor_pb2.DTYPE_FLOAT32,
        compression=tensor_pb2.COMPRESSION_ZSTD,
        raw_size=size,
        data=bomb,
    )
    assert _peak_bytes(lambda: _raises(LimitExceeded, honest, limits)) < 20 << 20
    # Lying header: a 1 MB tensor whose zstd frame declares 200 MB.
    lying = _mutated(honest, shape=[1 << 18], raw_size=1 << 20)
    assert _peak_bytes(lambda: _raises(LimitExceeded, lying, limits)) < 20 << 20
    # Frame without a declared size: decompression stops at raw_size.
    undeclared = _mutated(lying, data=_zstd_bomb(size, declare_size=False))
    assert zstandard.frame_content_size(undeclared.data) == -1
    assert _peak_bytes(lambda: _raises(CodecError, undeclared, limits)) < 20 << 20
    # lz4 expands at most 255x: a short block claiming 64 MB is refused before allocating, and
    # a block that expands past raw_size stops there.
    lz4_bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    short = _mutated(
        lying, compression=tensor_pb2.COMPRESSION_LZ4, data=lz4_bomb[:1000], shape=[16 << 20], raw_size=64 << 20
    )
    assert _peak_bytes(lambda: _raises(CodecError, short, Limits())) < 1 << 20
    long = _mutated(lying, compression=tensor_pb2.COMPRESSION_LZ4, data=lz4_bomb)
    assert _peak_bytes(lambda: _raises(CodecError, long, limits)) < 20 << 20


def _decode_only_codec_errors(msg: tensor_pb2.Tensor) -> None:
    try:
        out = decode(msg, Limits(max_elements=1 << 16, max_bytes=1 << 18))
    except CodecError:
        return
    assert tuple(out.shape) == tuple(msg.shape)
    assert out.dtype == (torch.uint8 if msg.dtype == tensor_pb2.DTYPE_UINT8 else torch.float32)


@FAST
@given(blob=st.binary(max_size=300))
def test_random_bytes_decode_or_raise_codec_error(blob: bytes) -> None:
    try:
        msg = tensor_pb2.Tensor.FromString(blob)
    except DecodeError:
        return  # the transport's job
    _decode_only_codec_errors(msg)


@FAST
@given(
    shape=st.lists(st.integers(-2, 40), max_size=4),
    dtype=st.integers(0, 6),
    compression=st.integers(0, 3),
    shuffled=st.booleans(),
    bits=st.integers(0, 5),
    block=st.sampled_from([0, 1, 3, 64]),
    raw_size=st.integers(0, 200),
    data=st.binary(max_size=200),
)
def test_arbitrary_fields_decode_or_raise_codec_error(
    shape: list[int],
    dtype: int,
    compression: int,
    shuffled: bool,
    bits: int,
    block: int,
    raw_size: int,
    data: bytes,
) -> None:
    msg = tensor_pb2.Tensor(
        shape=shape,
        dtype=dtype,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
        shuffled=shuffled,
        bits=bits,
        block=block,
        raw_size=raw_size,
        crc32=zlib.crc32(data),
        data=data,
    )
    _decode_only_codec_errors(msg)


@pytest.fixture(scope="module")
def valid_wire() -> list[bytes]:
    specs = ["f32", "f32+zstd", "bf16+zstd", "bf16+lz4", "f16", "q8", "q8+zstd", "q4", "q1+zstd", "labels", "u8"]
    return [
        encode(_labels(2, (2, 9, 7)) if spec in U8_SPECS else _image(2, (2, 1, 9, 7)), spec).SerializeToString()
        for spec in specs
    ]


@FAST
@given(data=st.data())
def test_mutated_valid_messages_decode_or_raise_codec_error(data: st.DataObject, valid_wire: list[bytes]) -> None:
    wire = bytearray(data.draw(st.sampled_from(valid_wire)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    try:
        msg = tensor_pb2.Tensor.FromString(bytes(wire))
    except DecodeError:
        return
    _decode_only_codec_errors(msg)
