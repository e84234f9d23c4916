"""Singular values: the float64 Gram route agrees with exact SVD; devices are chosen explicitly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.base.errors import InputError
from stages.scan import spectra
from stages.scan.estimators import estimate
from stages.scan.spectra import resolve_device, singular_values


def _matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    rank = 7
    low = torch.randn(300, rank, generator=g) @ torch.randn(rank, 180, generator=g) + 0.01 * torch.randn(300, 180, generator=g)
    q1 = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(200, 120, generator=g, dtype=torch.float64)).Q
    ill = (q2 * torch.logspace(0, -6, 120, dtype=torch.float64)) @ q1.T  # condition number 1e6
    return {
        "gaussian-square": torch.randn(160, 160, generator=g),
        "gaussian-tall": torch.randn(400, 90, generator=g),
        "gaussian-wide": torch.randn(90, 400, generator=g),
        "low-rank-plus-noise": low,
        "bf16": torch.randn(128, 256, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(64, 96, generator=g).to(torch.float16),
        "ill-conditioned": ill.to(torch.float32),
    }


@pytest.mark.parametrize("name", list(_matrices()))
def test_gram_and_svd_agree(name):
    W = _matrices()[name]
    # cond 1e6: the Gram route's error on s is ~eps * S0^2 / s, so scores built from the smallest
    # values agree to ~1e-9 there; on ordinary weights the two routes agree to better than 1e-10
    snr_rtol = 1e-8 if name == "ill-conditioned" else 1e-10
    gram = singular_values(W, "gram")
    svd = singular_values(W, "svd")
    exact = np.linalg.svd(W.to(torch.float64).numpy(), compute_uv=False)
    assert gram.dtype == svd.dtype == np.float64
    assert gram.shape == svd.shape == (min(W.shape),)
    # Gram loses relative accuracy only on singular values far below the largest (~eps * S0^2 / s)
    assert np.max(np.abs(gram - svd)) <= 1e-10 * svd[0]
    assert np.max(np.abs(svd - exact)) <= 1e-12 * exact[0]
    for estimator in ("reference", "gavish-donoho"):
        a = estimate(estimator, gram, *W.shape)
        b = estimate(estimator, svd, *W.shape)
        assert a.signal_count == b.signal_count
        assert a.snr == pytest.approx(b.snr, rel=snr_rtol)
        assert a.threshold == pytest.approx(b.threshold, rel=1e-10)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_singular_values_are_descending_and_transpose_invariant(method):
    W = torch.randn(70, 30, generator=torch.Generator().manual_seed(2))
    s = singular_values(W, method)
    assert np.all(np.diff(s) <= 0)
    assert np.all(s >= 0)
    np.testing.assert_allclose(singular_values(W.T.contiguous(), method), s, rtol=1e-12, atol=1e-12 * s[0])


def test_gram_accumulates_blocks_exactly(monkeypatch):
    W = torch.randn(1000, 40, generator=torch.Generator().manual_seed(9))
    whole = singular_values(W, "gram")
    monkeypatch.setattr(spectra, "BLOCK_ELEMENTS", 40 * 7)  # 143 blocks, the last one partial
    blocked = singular_values(W, "gram")
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12 * whole[0])
    exact = np.linalg.svd(W.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(blocked, exact, rtol=1e-10)


def test_low_precision_inputs_are_cast_exactly():
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    exact = np.linalg.svd(W.to(torch.float64).numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values(W, "gram"), exact, rtol=1e-10)


def test_rank_deficient_matrix_has_no_negative_or_nan_values():
    W = torch.ones(50, 20)
    s = singular_values(W, "gram")
    assert not np.isnan(s).any() and np.all(s >= 0)
    assert s[0] == pytest.approx(math.sqrt(50 * 20), rel=1e-12)
    assert np.all(s[1:] <= 1e-6 * s[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"expected a matrix, got shape \(5,\)"):
        singular_values(torch.ones(5))
    with pytest.raises(InputError, match="unknown singular-value method 'qr'"):
        singular_values(torch.ones(3, 3), "qr")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_explicit_cuda_without_a_gpu_is_a_clear_error(requested):
    with pytest.raises(InputError, match=rf"--device {requested} .*no CUDA GPU"):
        resolve_device(requested)


def test_unknown_device_name_is_rejected():
    with pytest.raises((InputError, RuntimeError)):
        resolve_device("tpu-of-dreams")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_gpu_matches_cpu(method):
    W = torch.randn(300, 500, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    cpu = singular_values(W, method, torch.device("cpu"))
    gpu = singular_values(W, method, torch.device("cuda"))
    assert np.max(np.abs(cpu - gpu)) <= 1e-10 * cpu[0]
