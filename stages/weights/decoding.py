"""A safetensors tensor's stored bytes as numpy values, widened exactly where numpy lacks the dtype.

bfloat16 becomes float32 (its bits are float32's upper half), float8 E5M2 becomes float16 (its
bits are float16's upper byte) and float8 E4M3 (the `fn` variant torch and safetensors store)
becomes float32 through a 256-entry table: every value is represented exactly, so a digest, a Gram
matrix or a norm computed from the widened array equals one computed in the stored dtype.
"""

from __future__ import annotations

import numpy as np

from ..base.errors import CorruptWeightsError

_NATIVE = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
_SIZES = {**{name: np.dtype(code).itemsize for name, code in _NATIVE.items()}, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def element_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    try:
        return _SIZES[dtype]
    except KeyError:
        raise CorruptWeightsError(f"tensor dtype {dtype!r} is not one this tool reads ({', '.join(sorted(_SIZES))})") from None


def decode(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The values of `raw` (uint8, the stored bytes) as an array of `shape`."""
    if dtype in _NATIVE:
        values = raw.view(_NATIVE[dtype])
    elif dtype == "BF16":
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype == "F8_E5M2":
        values = (raw.astype(np.uint16) << 8).view(np.float16)
    elif dtype == "F8_E4M3":
        values = _E4M3_VALUES[raw]
    else:
        element_size(dtype)  # raises: an unknown dtype
        raise AssertionError(dtype)
    return values.reshape(shape)


def _e4m3_values() -> np.ndarray:
    """float8 E4M3 (fn: no infinities, S.1111.111 is NaN, bias 7) for each of the 256 bit patterns."""
    bits = np.arange(256)
    sign = np.where(bits >> 7, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    normal = (1 + mantissa / 8) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 0xF) & (mantissa == 0x7)] = np.nan
    return values.astype(np.float32)


_E4M3_VALUES = _e4m3_values()
