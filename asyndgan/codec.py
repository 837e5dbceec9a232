"""Wire codec: torch/numpy tensors <-> ``asyndgan.v1.Tensor`` messages.

Floats travel as f32, bf16 or f16 (cast by torch, decoded to float32) or quantized (q8, q4, q2, q1):
signed 8/4/2-bit codes or 1-bit signs with one float32 scale per block of :data:`Q_BLOCK` elements
(absmax scaling and rounding to nearest; q1: the sign times the block's mean magnitude);
label maps travel as uint8, bit-packed to 1, 2 or 4 bits when their values allow.
:func:`roundtrip` gives what a float tensor decodes to without encoding it (the sites' error
feedback carries the difference to the next step). Payloads are optionally compressed
with zstd or lz4 (floats are byte-shuffled first, which is what makes them compressible).

:func:`decode` treats every message as hostile: it checks the header against :class:`Limits`
before allocating anything sized by the message, bounds decompression by the declared size, and
verifies a CRC-32 of the decompressed payload. Malformed input raises :class:`CodecError`,
input over a limit raises :class:`LimitExceeded`; nothing else escapes.

The wire byte order is little-endian, as is every host this runs on.
"""

from __future__ import annotations

import math
import sys
import threading
import zlib
from dataclasses import dataclass

import lz4.block
import numpy as np
import torch
import torch.nn.functional as F
import zstandard

from asyndgan.v1 import tensor_pb2

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("asyndgan.codec needs a little-endian host")

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_CODEC",
    "LABEL_CODEC",
    "LOSSLESS",
    "Q_BLOCK",
    "Codec",
    "CodecError",
    "LimitExceeded",
    "Limits",
    "decode",
    "encode",
    "raw_nbytes",
    "roundtrip",
    "wire_nbytes",
]


class CodecError(ValueError):
    """A malformed or unencodable tensor (maps to INVALID_ARGUMENT)."""


class LimitExceeded(CodecError):
    """A tensor over a size limit (maps to RESOURCE_EXHAUSTED)."""


# Codec dtype name -> (wire dtype, torch dtype cast to).
_FLOATS: dict[str, tuple[tensor_pb2.Dtype.ValueType, torch.dtype]] = {
    "f32": (tensor_pb2.DTYPE_FLOAT32, torch.float32),
    "bf16": (tensor_pb2.DTYPE_BFLOAT16, torch.bfloat16),
    "f16": (tensor_pb2.DTYPE_FLOAT16, torch.float16),
}
_COMPRESSIONS: dict[str, tensor_pb2.Compression.ValueType] = {
    "none": tensor_pb2.COMPRESSION_NONE,
    "zstd": tensor_pb2.COMPRESSION_ZSTD,
    "lz4": tensor_pb2.COMPRESSION_LZ4,
}
_ALIASES = {"raw": "f32", "labels": "u8+zstd"}
_MIN_ZSTD_LEVEL = -(1 << 17)
_SPEC_HELP = (
    "valid forms: DTYPE[+COMPRESSION][:LEVEL] with DTYPE in f32|bf16|f16|q8|q4|q2|q1|u8, COMPRESSION in "
    "none|zstd|lz4 and LEVEL a zstd level (zstd only), or the aliases 'raw' (= f32) and "
    "'labels' (= u8+zstd); e.g. 'bf16+zstd', 'bf16+zstd:3', 'q8+zstd', 'f16+lz4', 'labels'"
)
Q_BLOCK = 64  # elements per scale of the q codecs: one 64-px image row
_Q_MAX_BLOCK = 1 << 20
_QBITS = {"q8": 8, "q4": 4, "q2": 2, "q1": 1}

# Wire dtype -> bytes per element after decompression (before unpacking bits).
_ITEMSIZE: dict[int, int] = {
    tensor_pb2.DTYPE_FLOAT32: 4,
    tensor_pb2.DTYPE_BFLOAT16: 2,
    tensor_pb2.DTYPE_FLOAT16: 2,
    tensor_pb2.DTYPE_UINT8: 1,
    tensor_pb2.DTYPE_INT8_BLOCK: 1,  # plus 4 bytes per block (see _expected_size)
}
_PACK_BITS = (0, 1, 2, 4)
_MINMAX_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class Codec:
    """How a tensor is put on the wire; build one with :meth:`parse`."""

    dtype: str  # "f32" | "bf16" | "f16" | "q8" | "q4" | "q2" | "q1" | "u8"
    compression: str  # "none" | "zstd" | "lz4"
    level: int = 1  # zstd level

    def __post_init__(self) -> None:
        if self.dtype not in _FLOATS and self.dtype not in _QBITS and self.dtype != "u8":
            raise CodecError(f"unknown codec dtype {self.dtype!r}; {_SPEC_HELP}")
        if self.compression not in _COMPRESSIONS:
            raise CodecError(f"unknown compression {self.compression!r}; {_SPEC_HELP}")
        if self.compression == "zstd":
            if not _MIN_ZSTD_LEVEL <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
                raise CodecError(
                    f"zstd level {self.level} outside [{_MIN_ZSTD_LEVEL}, {zstandard.MAX_COMPRESSION_LEVEL}]"
                )
        elif self.level != 1:
            raise CodecError(f"a level applies only to zstd, not to {self.compression!r}; {_SPEC_HELP}")

    @classmethod
    def parse(cls, spec: str) -> Codec:
        """Parse a codec spec such as ``"bf16+zstd"``, ``"bf16+zstd:3"``, ``"labels"`` or ``"raw"``."""
        head, colon, level_text = spec.strip().lower().partition(":")
        dtype, plus, compression = _ALIASES.get(head, head).partition("+")
        if plus and not compression:
            raise CodecError(f"unknown codec {spec!r}; {_SPEC_HELP}")
        level = 1
        if colon:
            try:
                level = int(level_text)
            except ValueError:
                raise CodecError(f"bad level in codec {spec!r}; {_SPEC_HELP}") from None
        return cls(dtype, compression or "none", level)

    @property
    def lossless(self) -> bool:
        """Whether a float32 tensor decodes to itself."""
        return self.dtype == "f32"

    def __str__(self) -> str:
        text = self.dtype if self.compression == "none" else f"{self.dtype}+{self.compression}"
        return text if self.level == 1 else f"{text}:{self.level}"


IMAGE_CODEC = Codec.parse("bf16+zstd")
LABEL_CODEC = Codec.parse("labels")
LOSSLESS = Codec.parse("f32")


@dataclass(frozen=True)
class Limits:
    """Bounds :func:`decode` enforces before allocating."""

    max_elements: int = 1 << 26  # per tensor
    max_bytes: int = 256 << 20  # decompressed payload per tensor
    max_dims: int = 8


DEFAULT_LIMITS = Limits()


class _ZstdContexts(threading.local):
    """Per-thread zstd contexts (they are not thread-safe; reusing them saves their setup)."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        ctx = self.compressors.get(level)
        if ctx is None:
            ctx = self.compressors[level] = zstandard.ZstdCompressor(level=level)
        return ctx


_ZSTD = _ZstdContexts()


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        try:
            return torch.from_numpy(np.asarray(x, dtype=x.dtype.newbyteorder("="), order="C"))
        except TypeError as exc:
            raise CodecError(f"cannot encode a numpy array of dtype {x.dtype}") from exc
    raise CodecError(f"can only encode a torch.Tensor or numpy.ndarray, not {type(x).__name__}")


def _shuffle(words: np.ndarray) -> np.ndarray:
    """Byte-shuffle 1-D unsigned words: all byte 0s, then all byte 1s, ..."""
    n, itemsize = words.size, words.itemsize
    out = np.empty(n * itemsize, np.uint8)
    for k in range(itemsize):
        np.right_shift(words, 8 * k, out=out[k * n : (k + 1) * n], casting="unsafe")
    return out


def _unshuffle(payload: np.ndarray, itemsize: int) -> np.ndarray:
    """Invert :func:`_shuffle` on a uint8 payload; returns a new uint8 array of the words' bytes."""
    n = payload.size // itemsize
    out = np.empty((n, itemsize), np.uint8)
    for k in range(itemsize):
        out[:, k] = payload[k * n : (k + 1) * n]
    return out.reshape(-1)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values < 2**bits into ceil(n*bits/8) bytes, little end first."""
    if bits == 1:
        return np.packbits(values, bitorder="little")
    per = 8 // bits
    pad = -values.size % per
    if pad:
        values = np.concatenate([values, np.zeros(pad, np.uint8)])
    # Halve the number of bytes per step: byte pairs (lo, hi) of width-w fields -> lo | hi << w.
    width = bits
    while width < 8:
        pairs = values.view(np.uint16)
        merged = pairs >> (8 - width)
        merged |= pairs
        values = merged.astype(np.uint8)
        width *= 2
    return values


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Invert :func:`_pack`: the first n values (padding beyond them is ignored)."""
    if bits == 1:
        return np.unpackbits(packed, count=n, bitorder="little")
    # Double the number of bytes per step: each byte's low and high halves go to a byte each.
    values, width = packed, 4
    while width >= bits:
        pairs = values.astype(np.uint16)
        pairs |= pairs << (8 - width)
        pairs &= ((1 << width) - 1) * 0x0101
        values = pairs.view(np.uint8)
        width //= 2
    return values[:n]


def _levels(bits: int) -> int:
    """Largest code magnitude of a ``bits``-bit quantizer (1 bit: codes -1 and +1)."""
    return max((1 << (bits - 1)) - 1, 1)


def _quantize(t: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float tensor -> (float32 scale per block, signed codes of every element, flat int16).

    ``bits`` 2..8: absmax scaling, scale = max|x| / levels, codes round(x / scale). ``bits`` 1: the sign, scale =
    mean|x| of the block (the scale that minimises the squared error of a sign code)."""
    flat = t.detach().to(torch.float32).reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise CodecError("q codecs can only encode finite values")
    n = flat.numel()
    padded = F.pad(flat, (0, -n % block)).reshape(-1, block)
    if bits == 1:
        counts = torch.full((padded.shape[0],), float(block))
        if n % block:
            counts[-1] = n % block
        scale = padded.abs().sum(1) / counts
        codes = torch.where(padded >= 0, 1, -1).to(torch.int16)
    else:
        levels = _levels(bits)
        scale = padded.abs().amax(1) / levels
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(padded / divisor[:, None]).clamp_(-levels, levels).to(torch.int16)
    return scale, codes.reshape(-1)[:n]


def _dequantize(scale: torch.Tensor, codes: torch.Tensor, block: int) -> torch.Tensor:
    """Invert :func:`_quantize` (flat float32)."""
    n = codes.numel()
    padded = F.pad(codes.to(torch.float32), (0, -n % block)).reshape(-1, block)
    return (padded * scale[:, None]).reshape(-1)[:n]


def roundtrip(x: torch.Tensor, codec: Codec) -> torch.Tensor:
    """The float32 tensor ``decode(encode(x, codec))`` yields, computed without encoding (same device)."""
    t = x.detach()
    if codec.dtype in _QBITS:
        return _dequantize(*_quantize(t, _QBITS[codec.dtype], Q_BLOCK), Q_BLOCK).reshape(t.shape)
    if codec.dtype == "u8":
        raise CodecError("roundtrip applies to float codecs only")
    return t.to(_FLOATS[codec.dtype][1]).to(torch.float32)


def _q_payload(t: torch.Tensor, bits: int) -> np.ndarray:
    """Scales (float32) then codes: int8 for 8 bits, else unsigned (code + levels; 1 bit: sign bit) bit-packed."""
    if not t.is_floating_point():
        raise CodecError(f"float codecs need a floating-point tensor, got {t.dtype}")
    scale, codes = _quantize(t, bits, Q_BLOCK)
    head = scale.cpu().numpy().view(np.uint8)
    if bits == 8:
        return np.concatenate([head, codes.to(torch.int8).cpu().numpy().view(np.uint8)])
    unsigned = (codes > 0) if bits == 1 else codes + _levels(bits)
    return np.concatenate([head, _pack(unsigned.to(torch.uint8).cpu().numpy(), bits)])


def _q_values(arr: np.ndarray, shape: tuple[int, ...], block: int, bits: int) -> torch.Tensor:
    """Decode a q payload (scales, then codes) to flat float32."""
    n = math.prod(shape)
    head = 4 * -(-n // block)
    arr = arr if arr.flags.writeable else arr.copy()
    scale = torch.from_numpy(arr[:head].view(np.float32))
    if not bool(torch.isfinite(scale).all()):
        raise CodecError("non-finite scale in a q payload")
    if not bits:
        return _dequantize(scale, torch.from_numpy(arr[head:].view(np.int8)), block)
    unsigned = torch.from_numpy(_unpack(arr[head:], bits, n).astype(np.int16))
    if bits == 1:
        return _dequantize(scale, unsigned * 2 - 1, block)
    if n and int(unsigned.max()) > 2 * _levels(bits):
        raise CodecError(f"{bits}-bit code beyond +-{_levels(bits)}")
    return _dequantize(scale, unsigned - _levels(bits), block)


def _float_payload(t: torch.Tensor, target: torch.dtype, shuffle: bool) -> np.ndarray:
    if not t.is_floating_point():
        raise CodecError(f"float codecs need a floating-point tensor, got {t.dtype}")
    cast = t.to(target).cpu().contiguous().reshape(-1)
    words = cast.view(torch.int32 if target == torch.float32 else torch.int16).numpy()
    if shuffle:
        return _shuffle(words.view(np.uint32 if words.itemsize == 4 else np.uint16))
    return words.view(np.uint8)


def _label_payload(t: torch.Tensor) -> tuple[np.ndarray, int]:
    if t.is_floating_point() or t.is_complex():
        raise CodecError(f"the u8 codec needs an integer tensor, got {t.dtype}")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.dtype not in _MINMAX_INTS:  # torch.uint16/32/64: no aminmax kernel
        t = t.to(torch.int64)
    top = 0
    if t.numel():
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) > 255:
            raise CodecError(f"u8 values must lie in 0..255, got {int(lo)}..{int(hi)}")
        top = int(hi)
    values = t.to(torch.uint8).cpu().contiguous().reshape(-1).numpy()
    bits = 1 if top < 2 else 2 if top < 4 else 4 if top < 16 else 0
    return (_pack(values, bits) if bits else values), bits


def encode(x: torch.Tensor | np.ndarray, codec: Codec | str = IMAGE_CODEC) -> tensor_pb2.Tensor:
    """Encode a tensor (any device; gradients detached) as a wire message."""
    if isinstance(codec, str):
        codec = Codec.parse(codec)
    t = _as_tensor(x)
    bits = block = 0
    shuffled = False
    if codec.dtype == "u8":
        wire_dtype = tensor_pb2.DTYPE_UINT8
        packed, bits = _label_payload(t)
    elif codec.dtype in _QBITS:
        wire_dtype, block, q_bits = tensor_pb2.DTYPE_INT8_BLOCK, Q_BLOCK, _QBITS[codec.dtype]
        packed = _q_payload(t, q_bits)
        bits = 0 if q_bits == 8 else q_bits
    else:
        wire_dtype, target = _FLOATS[codec.dtype]
        shuffled = codec.compression != "none"
        packed = _float_payload(t, target, shuffled)
    payload = packed.data
    if codec.compression == "zstd":
        data = _ZSTD.compressor(codec.level).compress(payload)
    elif codec.compression == "lz4":
        data = lz4.block.compress(payload, store_size=False)
    else:
        data = payload.tobytes()
    return tensor_pb2.Tensor(
        shape=t.shape,
        dtype=wire_dtype,
        compression=_COMPRESSIONS[codec.compression],
        shuffled=shuffled,
        bits=bits,
        block=block,
        raw_size=payload.nbytes,
        crc32=zlib.crc32(payload),
        data=data,
    )


def _check_header(msg: tensor_pb2.Tensor, limits: Limits) -> tuple[int, ...]:
    """Validate everything but the data; returns the shape."""
    itemsize = _ITEMSIZE.get(msg.dtype)
    if itemsize is None:
        raise CodecError(f"unknown or unspecified dtype {msg.dtype}")
    if msg.compression not in _COMPRESSIONS.values():
        raise CodecError(f"unknown compression {msg.compression}")
    bits = msg.bits
    if bits not in _PACK_BITS:
        raise CodecError(f"bits must be one of {_PACK_BITS}, got {bits}")
    if bits and msg.dtype not in (tensor_pb2.DTYPE_UINT8, tensor_pb2.DTYPE_INT8_BLOCK):
        raise CodecError("bit packing applies only to UINT8 and INT8_BLOCK")
    if msg.shuffled and msg.dtype in (tensor_pb2.DTYPE_UINT8, tensor_pb2.DTYPE_INT8_BLOCK):
        raise CodecError("byte shuffling applies only to f32, bf16 and f16")
    if (msg.dtype == tensor_pb2.DTYPE_INT8_BLOCK) != (msg.block > 0) or msg.block > _Q_MAX_BLOCK:
        raise CodecError(f"block {msg.block}: INT8_BLOCK needs 1..{_Q_MAX_BLOCK}, other dtypes 0")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_dims:
        raise LimitExceeded(f"{len(shape)} dims > max_dims {limits.max_dims}")
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    n = math.prod(shape)
    if n > limits.max_elements or any(d > limits.max_elements for d in shape):
        raise LimitExceeded(f"shape {list(shape)} exceeds max_elements {limits.max_elements}")
    expected = (n * bits + 7) // 8 if bits else n * itemsize
    if msg.block:
        expected += 4 * -(-n // msg.block)
    if expected > limits.max_bytes:
        raise LimitExceeded(f"payload of {expected} bytes exceeds max_bytes {limits.max_bytes}")
    if msg.raw_size != expected:
        raise CodecError(f"raw_size {msg.raw_size} does not match shape/dtype/bits ({expected} bytes)")
    return shape


def _decompress(msg: tensor_pb2.Tensor, limits: Limits) -> bytes | bytearray:
    """The payload of a header-checked message, decompressed to exactly raw_size bytes."""
    data, raw = msg.data, msg.raw_size
    if msg.compression not in _COMPRESSIONS.values():
        raise CodecError(f"unknown or unset compression {msg.compression}")
    if msg.compression == tensor_pb2.COMPRESSION_NONE:
        if len(data) != raw:
            raise CodecError(f"data length {len(data)} != raw_size {raw}")
        return data
    if len(data) > raw + raw // 64 + 1024:  # beyond the worst case of either compressor
        raise CodecError(f"compressed data of {len(data)} bytes is too long for raw_size {raw}")
    if msg.compression == tensor_pb2.COMPRESSION_LZ4:
        # lz4 expands at most 255x; checking that first keeps a small message from making
        # lz4.block allocate raw_size (twice: it copies its output buffer into the result).
        if raw > 256 * len(data):
            raise CodecError(f"lz4 data of {len(data)} bytes is too short for raw_size {raw}")
        try:
            out: bytes | bytearray = lz4.block.decompress(data, uncompressed_size=raw, return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"corrupt lz4 data: {exc}") from exc
    else:
        try:
            content_size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupt zstd frame header: {exc}") from exc
        if content_size > limits.max_bytes:
            raise LimitExceeded(f"zstd frame declares {content_size} bytes > max_bytes {limits.max_bytes}")
        if content_size not in (raw, -1):
            raise CodecError(f"zstd frame declares {content_size} bytes, raw_size is {raw}")
        try:
            out = _ZSTD.decompressor.decompress(data, max_output_size=raw, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupt zstd data: {exc}") from exc
    if len(out) != raw:
        raise CodecError(f"decompressed {len(out)} bytes, raw_size is {raw}")
    return out


def decode(msg: tensor_pb2.Tensor, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """Decode a wire message: float dtypes to contiguous float32, UINT8 to uint8 (CPU tensors)."""
    shape = _check_header(msg, limits)
    payload = _decompress(msg, limits)
    if zlib.crc32(payload) != msg.crc32:
        raise CodecError("checksum mismatch")
    arr = np.frombuffer(payload, np.uint8)
    dtype = msg.dtype
    if dtype == tensor_pb2.DTYPE_INT8_BLOCK:
        return _q_values(arr, shape, msg.block, msg.bits).reshape(shape)
    if msg.bits:
        arr = _unpack(arr, msg.bits, math.prod(shape))
    elif msg.shuffled:
        arr = _unshuffle(arr, _ITEMSIZE[dtype])
    elif not arr.flags.writeable:
        arr = arr.copy()
    if dtype == tensor_pb2.DTYPE_UINT8:
        t = torch.from_numpy(arr)
    elif dtype == tensor_pb2.DTYPE_FLOAT32:
        t = torch.from_numpy(arr.view(np.float32))
    else:
        half = torch.bfloat16 if dtype == tensor_pb2.DTYPE_BFLOAT16 else torch.float16
        t = torch.from_numpy(arr.view(np.int16)).view(half).to(torch.float32)
    return t.reshape(shape)


def raw_nbytes(msg: tensor_pb2.Tensor) -> int:
    """Bytes of the message's tensor as plain float32 (float dtypes) or uint8 (UINT8)."""
    return math.prod(msg.shape) * (1 if msg.dtype == tensor_pb2.DTYPE_UINT8 else 4)


def wire_nbytes(msg: tensor_pb2.Tensor) -> int:
    """Serialized size of the message in bytes."""
    return msg.ByteSize()
