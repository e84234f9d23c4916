"""Signal-to-noise estimators over a matrix's singular values.

`reference` reproduces the public Spectrum scanner's formula exactly (see DESIGN.md).
`gavish-donoho` is the statistically sound alternative: the optimal hard threshold for an
unknown noise level, tau = omega(beta) * median(S) (Gavish & Donoho, 2014), and a scale-free
score, the ratio of signal energy (sum of S^2 above tau) to noise energy (the rest). Pure noise
scores ~0 with rank 0, a planted rank-r signal is recovered as rank r, and multiplying W by a
constant leaves the score unchanged -- none of which holds for the reference formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ESTIMATORS = ("reference", "gavish-donoho")


@dataclass(frozen=True)
class SpectrumStats:
    sigma: float  # noise level estimate (reference: from the singular values; GD: per entry)
    threshold: float  # singular values above it count as signal
    signal_count: int
    signal_sum: float  # reference: sum of S; GD: sum of S^2 (energy)
    noise_sum: float
    max_singular_value: float
    snr: float

    @classmethod
    def zero(cls) -> SpectrumStats:
        """An all-zero matrix: no signal, no noise, score 0."""
        return cls(sigma=0.0, threshold=0.0, signal_count=0, signal_sum=0.0, noise_sum=0.0, max_singular_value=0.0, snr=0.0)


def estimate(name: str, singular_values: np.ndarray, rows: int, cols: int) -> SpectrumStats:
    if name == "reference":
        return reference_snr(singular_values, rows, cols)
    if name == "gavish-donoho":
        return gavish_donoho_snr(singular_values, rows, cols)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def aspect_ratio(rows: int, cols: int) -> float:
    return min(rows, cols) / max(rows, cols)


def reference_snr(s: np.ndarray, rows: int, cols: int) -> SpectrumStats:
    """The public scanner's score, step for step (its float32 arithmetic aside)."""
    q75, q25 = np.quantile(s, [0.75, 0.25])  # linear interpolation, as torch.quantile
    sigma = float((q75 - q25) / 1.349)
    threshold = sigma * math.sqrt((1 + math.sqrt(aspect_ratio(rows, cols))) ** 2)
    signal_mask = s > threshold
    signal = float(s[signal_mask].sum()) if signal_mask.any() else 0.0
    noise = float(s[~signal_mask].sum()) if (~signal_mask).any() else 1.0
    ratio = signal / noise if noise != 0 else math.inf
    return SpectrumStats(
        sigma=sigma,
        threshold=threshold,
        signal_count=int(signal_mask.sum()),
        signal_sum=signal,
        noise_sum=noise,
        max_singular_value=float(s[0]),
        snr=_ieee_divide(ratio, float(s[0])),
    )


def gavish_donoho_snr(s: np.ndarray, rows: int, cols: int) -> SpectrumStats:
    beta = aspect_ratio(rows, cols)
    median = float(np.median(s))
    threshold = optimal_threshold_coefficient(beta) * median
    sigma = median / math.sqrt(max(rows, cols) * marchenko_pastur_median(beta))
    signal_mask = s > threshold
    energy = s * s
    signal = float(energy[signal_mask].sum())
    noise = float(energy[~signal_mask].sum())
    return SpectrumStats(
        sigma=sigma,
        threshold=threshold,
        signal_count=int(signal_mask.sum()),
        signal_sum=signal,
        noise_sum=noise,
        max_singular_value=float(s[0]),
        snr=_ieee_divide(signal, noise),
    )


def optimal_threshold_coefficient(beta: float) -> float:
    """omega(beta) of Gavish & Donoho's unknown-noise threshold (their polynomial fit)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with ratio beta in (0, 1] and unit variance."""
    low, high = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    # x = low + (high - low) * (1 - cos t) / 2 removes the square-root singularities at both ends.
    t = np.linspace(0.0, math.pi, 200_001)
    x = low + (high - low) * (1 - np.cos(t)) / 2
    dx_dt = (high - low) * np.sin(t) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.sqrt(np.clip((high - x) * (x - low), 0, None)) / (2 * math.pi * beta * x)
    integrand = np.nan_to_num(density * dx_dt)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, x))


def _ieee_divide(numerator: float, denominator: float) -> float:
    """Division with IEEE semantics (x/0 = inf, 0/0 = nan), as the reference's torch arithmetic."""
    if denominator == 0:
        if numerator == 0 or math.isnan(numerator):
            return math.nan
        return math.copysign(math.inf, numerator)
    return numerator / denominator
