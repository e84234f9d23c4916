"""Singular values of one weight matrix, in float64.

The default route forms the Gram matrix on the smaller side (W·Wᵀ or Wᵀ·W) in float64, block by
block so the float64 copy never exists whole, and takes square roots of its eigenvalues. It is
several times faster than an SVD for rectangular matrices and matches float64 SVD to ~1e-13
relative. A float32 Gram is not offered: its rounding error cannot be bounded tightly enough to
prove a score (an a-priori bound, gamma_m * trace(G) for the Gram plus n*u*||G|| for the
eigensolver, leaves the sum of singular values uncertain by 0.7% to 180% on SmolLM2-135M's 211
matrices, against the 1e-5 needed), even though its observed error there is small (<= 1.3e-5).

The same algorithm runs on one of two array libraries (`backend_for`): numpy on the CPU, whose
OpenBLAS computes AᵀA as a symmetric rank-k update (half the multiply-adds of a product) and
whose `eigvalsh` was 1.9x faster than torch's here on 576-wide Grams, and which leaves torch
(1 s and ~220 MiB of imports) out of a CPU scan; torch on a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..base.environment import cuda_available
from ..base.errors import InputError
from ..weights.decoding import decode

SVD_METHODS = ("gram", "svd")
BLOCK_ELEMENTS = 1 << 22  # float64 elements cast at a time (32 MiB)


def resolve_device(requested: str) -> str:
    """The device a scan runs on, as `cpu` or `cuda[:N]`: `auto` picks CUDA when present; an explicit `cuda` without a GPU is an error.

    `cpu` imports no torch; the others ask torch whether a GPU is there (where an NVIDIA driver is loaded).
    """
    if requested == "cpu":
        return "cpu"
    if requested != "auto" and not re.fullmatch(r"cuda(:\d+)?", requested or ""):
        raise InputError(f"unknown --device {requested!r}; use cpu, cuda, cuda:N or auto")
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        raise InputError(f"--device {requested} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return requested


class NonFiniteMatrixError(ValueError):
    """The matrix holds NaN or Inf (seen in the Gram diagonal or the singular values)."""


class DecompositionError(RuntimeError):
    """The eigen- or singular-value solver did not converge."""


class NumpyBackend:
    """The CPU: numpy arrays and numpy's OpenBLAS/LAPACK."""

    device = "cpu"

    def decode(self, raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return decode(raw, dtype, shape)

    def native(self, matrix: Any) -> np.ndarray:
        return _host_array(matrix)

    def widen(self, block: np.ndarray) -> np.ndarray:
        return block.astype(np.float64)

    def zeros(self, n: int) -> np.ndarray:
        return np.zeros((n, n), dtype=np.float64)

    def all_finite(self, values: np.ndarray) -> bool:
        return bool(np.isfinite(values).all())

    def eigvalsh(self, gram: np.ndarray) -> np.ndarray:
        try:
            return np.linalg.eigvalsh(gram, UPLO="L")
        except np.linalg.LinAlgError as exc:
            raise DecompositionError(str(exc)) from exc

    def svdvals(self, matrix: np.ndarray) -> np.ndarray:
        try:
            return np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
        except np.linalg.LinAlgError as exc:
            raise DecompositionError(str(exc)) from exc

    @contextlib.contextmanager
    def threads(self, count: int) -> Iterator[None]:
        """BLAS/LAPACK threads per call while the scan runs (its workers share the cores)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=count, user_api="blas"):
            yield


class TorchBackend:
    """A CUDA GPU through torch; matrices travel in their stored dtype and are widened on the device."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device

    def decode(self, raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> Any:
        if dtype not in _TORCH_DTYPES:
            raise InputError(f"the scan decomposes floating-point tensors ({', '.join(_TORCH_DTYPES)}), not {dtype}")
        stored = self.torch.frombuffer(raw, dtype=getattr(self.torch, _TORCH_DTYPES[dtype])).reshape(shape)
        return stored.to(self.device)

    def native(self, matrix: Any) -> Any:
        if isinstance(matrix, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(matrix)).to(self.device)
        return matrix.to(self.device)

    def widen(self, block: Any) -> Any:
        return block.to(dtype=self.torch.float64)

    def zeros(self, n: int) -> Any:
        return self.torch.zeros((n, n), dtype=self.torch.float64, device=self.device)

    def all_finite(self, values: Any) -> bool:
        if values.element_size() == 1:  # float8: CUDA has no isfinite for it; float16 holds every float8 value
            values = values.to(self.torch.float16)
        return bool(self.torch.isfinite(values).all())

    def eigvalsh(self, gram: Any) -> np.ndarray:
        try:
            return self.torch.linalg.eigvalsh(gram, UPLO="L").cpu().numpy()
        except self.torch.linalg.LinAlgError as exc:
            raise DecompositionError(str(exc)) from exc

    def svdvals(self, matrix: Any) -> np.ndarray:
        try:
            return self.torch.linalg.svdvals(matrix.to(dtype=self.torch.float64)).cpu().numpy()
        except self.torch.linalg.LinAlgError as exc:
            raise DecompositionError(str(exc)) from exc

    @contextlib.contextmanager
    def threads(self, count: int) -> Iterator[None]:
        previous = self.torch.get_num_threads()
        self.torch.set_num_threads(count)
        try:
            yield
        finally:
            self.torch.set_num_threads(previous)


Backend = NumpyBackend | TorchBackend
_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def backend_for(device: str) -> Backend:
    """numpy for `cpu`, torch for `cuda[:N]` (see the module docstring)."""
    return NumpyBackend() if device == "cpu" else TorchBackend(device)


def singular_values(matrix: Any, method: str = "gram", device: Any = "cpu") -> np.ndarray:
    """All min(n, m) singular values of a 2-D array (numpy, or a torch tensor), descending, as float64.

    Raises NonFiniteMatrixError when the matrix holds NaN or Inf: the check comes for free from
    the Gram diagonal (the squared column norms) instead of a separate pass over the weights.
    """
    if len(matrix.shape) != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if method not in SVD_METHODS:
        raise InputError(f"unknown singular-value method {method!r}; choose one of {', '.join(SVD_METHODS)}")
    backend = backend_for(str(device))
    native = backend.native(matrix)
    tall = native if native.shape[0] >= native.shape[1] else native.T
    if method == "svd":
        if not backend.all_finite(tall):  # LAPACK would fail to converge on them
            raise NonFiniteMatrixError("the matrix holds NaN or Inf")
        return descending(backend.svdvals(tall))
    step = rows_per_block(tall.shape[1])
    blocks = (tall[start : start + step] for start in range(0, tall.shape[0], step))
    return descending(gram_singular_values(gram_lower(blocks, tall.shape[1], backend), backend))


def descending(values: np.ndarray) -> np.ndarray:
    """Singular values as a float64 numpy array, largest first."""
    return np.sort(np.asarray(values, dtype=np.float64))[::-1].copy()


def rows_per_block(short_side: int) -> int:
    """Rows of the tall matrix widened to float64 at a time (BLOCK_ELEMENTS elements)."""
    return max(1, BLOCK_ELEMENTS // max(short_side, 1))


def gram_lower(blocks: Iterable[np.ndarray], short_side: int, backend: Backend) -> Any:
    """Aᵀ·A in float64 (at least its lower triangle, which is all eigvalsh reads) for a tall A given as consecutive row blocks.

    Each block is widened to float64 on the backend's device. numpy computes `piece.T @ piece`
    as a symmetric rank-k update (half the multiply-adds). The blocks may come straight from the
    checkpoint file, so a tall matrix (an embedding) never needs to be in memory whole.
    """
    gram = backend.zeros(short_side)
    for block in blocks:
        piece = backend.widen(block)
        with np.errstate(over="ignore", invalid="ignore"):  # values too large to square show in the diagonal (gram_singular_values)
            gram += piece.T @ piece
        del piece
    return gram


def gram_singular_values(gram: Any, backend: Backend) -> np.ndarray:
    """Singular values (ascending) from the lower triangle of a float64 Gram matrix."""
    if not backend.all_finite(gram.diagonal()):
        raise NonFiniteMatrixError("the matrix holds NaN or Inf, or values too large to square in float64")
    eigenvalues = backend.eigvalsh(gram)
    return np.sqrt(np.clip(eigenvalues, 0.0, None))


def _host_array(matrix: Any) -> np.ndarray:
    """A numpy view of `matrix`; a torch tensor in a dtype numpy lacks (bfloat16, float8) is widened exactly to float32."""
    if isinstance(matrix, np.ndarray):
        return matrix
    tensor = matrix.detach().cpu()
    if str(tensor.dtype) not in ("torch.float64", "torch.float32", "torch.float16"):
        tensor = tensor.float()
    return tensor.numpy()
