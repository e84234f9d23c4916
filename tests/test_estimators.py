"""Estimators: bit-compatibility of `reference` with the public scanner, soundness of `gavish-donoho`."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from stages.scan.estimators import (
    ESTIMATORS,
    aspect_ratio,
    estimate,
    gavish_donoho_snr,
    marchenko_pastur_median,
    optimal_threshold_coefficient,
    reference_snr,
)
from stages.scan.spectra import singular_values
from stages.snr_scan import ScanConfig, run

from .helpers import QUIET

PARITY_RTOL = 1e-4


def public_scanner_snr(weight: torch.Tensor) -> dict:
    """Independent transcription of the public Spectrum scanner, in torch float32, step for step."""
    W = weight.detach().to(torch.float32)
    S = torch.linalg.svdvals(W)
    max_singular_value = S[0]
    sigma_estimated = (torch.quantile(S, 0.75) - torch.quantile(S, 0.25)) / 1.349
    n, m = W.shape[-2:]
    beta = n / m if n < m else m / n
    thr = sigma_estimated * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = S[S > thr].sum() if (S > thr).any() else 0
    noise = S[S <= thr].sum() if (S <= thr).any() else 1.0
    snr = signal / noise if noise != 0 else float("inf")
    result = snr / max_singular_value
    return {
        "snr": float(result),
        "sigma": float(sigma_estimated),
        "threshold": float(thr),
        "signal_count": int((S > thr).sum()),
        "max_singular_value": float(max_singular_value),
    }


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def _low_rank_plus_noise(rows: int, cols: int, rank: int, gain: float, seed: int, noise: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    edge = noise * (math.sqrt(rows) + math.sqrt(cols))
    strengths = edge * gain * torch.linspace(1.0, 5.0, rank).flip(0)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=g)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=g)).Q
    return (left * strengths) @ right.T + noise * torch.randn(rows, cols, generator=g)


def _parity_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "gaussian.square.weight": 0.02 * torch.randn(256, 256, generator=g),
        "gaussian.tall.weight": torch.randn(384, 96, generator=g),
        "gaussian.wide.weight": 0.05 * torch.randn(96, 384, generator=g),
        "lowrank.square.weight": _low_rank_plus_noise(200, 200, 12, 2.0, seed=1),
        "lowrank.tall.weight": _low_rank_plus_noise(352, 128, 8, 1.5, seed=2),
        "lowrank.wide.weight": _low_rank_plus_noise(128, 352, 8, 3.0, seed=3),
        "bf16.lowrank.weight": _low_rank_plus_noise(160, 224, 6, 2.5, seed=4).to(torch.bfloat16),
        "fp16.gaussian.weight": (0.03 * torch.randn(128, 192, generator=g)).to(torch.float16),
        "decaying.spectrum.weight": torch.randn(150, 150, generator=g)
        @ torch.diag(torch.logspace(0, -4, 150))
        @ torch.randn(150, 150, generator=g),
        "one.row.weight": torch.randn(1, 64, generator=g),
        "two.rows.weight": torch.randn(2, 384, generator=g),
        "one.column.weight": torch.randn(64, 1, generator=g),
        "zeros.weight": torch.zeros(32, 48),
    }


# --- the reference formula itself -------------------------------------------------------------


@pytest.mark.parametrize("name", list(_parity_matrices()))
def test_reference_estimator_matches_public_scanner(name):
    W = _parity_matrices()[name]
    expected = public_scanner_snr(W)
    got = estimate("reference", singular_values(W), *W.shape)
    if math.isinf(expected["snr"]):
        assert got.snr == expected["snr"]
    else:
        assert _rel(got.snr, expected["snr"]) < PARITY_RTOL, (got.snr, expected["snr"])
    assert got.signal_count == expected["signal_count"]
    assert _rel(got.max_singular_value, expected["max_singular_value"]) < PARITY_RTOL
    assert abs(got.threshold - expected["threshold"]) <= PARITY_RTOL * max(expected["max_singular_value"], 1e-30)


def test_reference_edge_cases_have_the_public_values():
    # a single singular value: IQR 0, threshold 0, all signal, no noise -> noise 1.0 -> snr = S0 / 1 / S0 = 1
    assert reference_snr(np.array([3.0]), 1, 64).snr == pytest.approx(1.0)
    # an all-zero matrix: noise sum 0 -> inf, then inf / S[0]=0 stays inf (torch semantics)
    zero = reference_snr(np.zeros(8), 8, 16)
    assert zero.snr == math.inf and zero.signal_count == 0
    # beta is min/max whichever side is longer
    assert aspect_ratio(100, 400) == aspect_ratio(400, 100) == 0.25


def test_reference_threshold_formula_by_hand():
    s = np.array([10.0, 4.0, 3.0, 2.0, 1.0])
    q75, q25 = np.quantile(s, [0.75, 0.25])  # 4.0, 2.0 with linear interpolation
    sigma = (q75 - q25) / 1.349
    thr = sigma * (1 + math.sqrt(5 / 8))
    stats = reference_snr(s, 5, 8)
    assert stats.sigma == pytest.approx(sigma, rel=1e-15)
    assert stats.threshold == pytest.approx(thr, rel=1e-15)
    signal = s[s > thr].sum()
    noise = s[s <= thr].sum()
    assert stats.signal_count == int((s > thr).sum())
    assert stats.snr == pytest.approx(signal / noise / 10.0, rel=1e-15)


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="unknown estimator 'mystery'"):
        estimate("mystery", np.array([1.0]), 1, 1)
    assert set(ESTIMATORS) == {"reference", "gavish-donoho"}


# --- parity through the whole scan ------------------------------------------------------------


def test_scan_matches_public_scanner_on_synthetic_matrices(tmp_path, write_checkpoint):
    matrices = _parity_matrices()
    folder = write_checkpoint(tmp_path / "model", matrices)
    result = run(ScanConfig(model_dir=str(folder), output=str(tmp_path / "snr.parquet")), QUIET).detail
    rows = {r["tensor_name"]: r for r in result.rows}
    assert set(rows) == set(matrices)
    for name, W in matrices.items():
        expected = public_scanner_snr(W)
        row = rows[name]
        if not W.any():  # the public scanner scores an all-zero matrix +inf (best of all); we refuse to score it
            assert math.isinf(expected["snr"])
            assert not row["scanned"] and "all-zero matrix (rank 0)" in row["skip_reason"] and row.get("snr") is None
            continue
        assert row["scanned"] and row["estimator"] == "reference"
        if math.isinf(expected["snr"]):
            assert row["snr"] == expected["snr"], name
        else:
            assert _rel(row["snr"], expected["snr"]) < PARITY_RTOL, (name, row["snr"], expected["snr"])
        assert row["signal_count"] == expected["signal_count"], name


def test_scan_matches_public_scanner_on_real_pretrained_bert(minilm_scan):
    """all-MiniLM-L6-v2 (real BERT weights, float32): every 2-D float matrix within 1e-4 of the public scanner."""
    folder, result = minilm_scan
    rows = {r["tensor_name"]: r for r in pq.read_table(result.output).to_pylist()}
    compared = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
            tensor = handle.get_tensor(name)
            row = rows[name]
            if tensor.ndim != 2 or not tensor.is_floating_point():
                assert row["scanned"] is False and row["skip_reason"], name
                assert row["snr"] is None and row["sigma"] is None and row["signal_count"] is None
                continue
            expected = public_scanner_snr(tensor)
            assert row["scanned"], name
            assert _rel(row["snr"], expected["snr"]) < PARITY_RTOL, (name, row["snr"], expected["snr"])
            assert row["signal_count"] == expected["signal_count"], name
            assert _rel(row["max_singular_value"], expected["max_singular_value"]) < PARITY_RTOL, name
            compared += 1
    # 6 layers x 6 matrices, word/position/token-type embeddings and the pooler; position_ids (int64) is no weight
    assert compared == 40
    assert rows["embeddings.position_ids"]["skip_reason"].startswith("dtype I64")


def test_real_bert_embedding_roles_resolved_from_its_config(minilm_scan):
    _, result = minilm_scan
    inputs = [r["tensor_name"] for r in result.rows if r["is_input_embedding"]]
    assert inputs == ["embeddings.word_embeddings.weight"]


# --- Gavish-Donoho ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.02 * torch.randn(400, 600, generator=g, dtype=torch.float64)


def test_gavish_donoho_labels_pure_noise_as_noise_where_reference_does_not(noise_matrix):
    s = singular_values(noise_matrix)
    gd = gavish_donoho_snr(s, 400, 600)
    ref = reference_snr(s, 400, 600)
    assert gd.signal_count == 0
    assert gd.snr == 0.0
    assert gd.noise_sum == pytest.approx(float((s * s).sum()), rel=1e-12)
    # the reference threshold (sigma from singular values, no sqrt(n)) calls a large share "signal"
    assert ref.signal_count > 0.2 * 400
    assert ref.snr > 1.0


def test_gavish_donoho_estimates_the_entry_noise_level(noise_matrix):
    gd = gavish_donoho_snr(singular_values(noise_matrix), 400, 600)
    assert gd.sigma == pytest.approx(0.02, rel=0.03)
    # the threshold sits above the top of the noise bulk, sigma * (sqrt(n) + sqrt(m))
    assert gd.threshold > 0.02 * (math.sqrt(400) + math.sqrt(600))


@pytest.mark.parametrize(("rows", "cols"), [(400, 600), (600, 400), (300, 300)])
def test_gavish_donoho_recovers_planted_rank_where_reference_does_not(rows, cols):
    rank = 5
    g = torch.Generator().manual_seed(7)
    noise = 0.02
    edge = noise * (math.sqrt(rows) + math.sqrt(cols))
    strengths = edge * torch.tensor([8.0, 6.0, 5.0, 4.0, 3.0], dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    W = (left * strengths) @ right.T + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    s = singular_values(W)
    gd = gavish_donoho_snr(s, rows, cols)
    ref = reference_snr(s, rows, cols)
    assert gd.signal_count == rank
    assert gd.signal_sum == pytest.approx(float((s[:rank] ** 2).sum()), rel=1e-12)
    assert abs(ref.signal_count - rank) > 20


def test_gavish_donoho_is_scale_free_and_reference_is_not(noise_matrix):
    W = _low_rank_plus_noise(300, 500, 6, 2.0, seed=11).to(torch.float64)
    s1, s1000 = singular_values(W), singular_values(W * 1000)
    gd1, gd1000 = gavish_donoho_snr(s1, 300, 500), gavish_donoho_snr(s1000, 300, 500)
    assert gd1.snr > 0
    assert _rel(gd1.snr, gd1000.snr) < 1e-9
    assert gd1.signal_count == gd1000.signal_count
    ref1, ref1000 = reference_snr(s1, 300, 500), reference_snr(s1000, 300, 500)
    assert ref1.signal_count == ref1000.signal_count
    assert ref1.snr / ref1000.snr == pytest.approx(1000.0, rel=1e-6)


def test_gavish_donoho_of_a_zero_matrix_is_nan_not_a_number_made_up():
    stats = gavish_donoho_snr(np.zeros(5), 5, 7)
    assert math.isnan(stats.snr) and stats.signal_count == 0


def test_marchenko_pastur_median_known_value_and_monte_carlo():
    assert marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=2e-4)
    # beta -> 0 the law concentrates at 1
    assert marchenko_pastur_median(1e-4) == pytest.approx(1.0, abs=0.03)
    # Monte Carlo: eigenvalues of X^T X / n for X n x p Gaussian, beta = p / n
    g = torch.Generator().manual_seed(3)
    for n, p in ((2000, 500), (1200, 800)):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(X.T @ X / n).numpy()
        assert marchenko_pastur_median(p / n) == pytest.approx(float(np.median(eig)), rel=0.01)


def test_optimal_threshold_coefficient_matches_gavish_donoho():
    # omega(1) = 2.858 in the paper's table; the polynomial fit gives 2.86
    assert optimal_threshold_coefficient(1.0) == pytest.approx(2.858, abs=0.005)
    # omega(beta) = lambda*(beta) / sqrt(mu_beta) within the fit's accuracy
    for beta in (0.1, 0.25, 0.5, 0.75, 1.0):
        lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))
        assert optimal_threshold_coefficient(beta) == pytest.approx(lam / math.sqrt(marchenko_pastur_median(beta)), rel=0.01)
