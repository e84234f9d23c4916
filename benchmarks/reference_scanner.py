"""The public Spectrum scanner's computation, transcribed for benchmarking (the baseline).

It runs over a model already loaded with transformers, as the scanner does: every 2-D module
weight, `torch.linalg.svdvals` on the matrix as stored, the reference formula in float32.
"""

from __future__ import annotations

import numpy as np
import torch


def reference_snr(model: torch.nn.Module) -> dict[str, float]:
    """Module name -> reference snr for every module with a 2-D weight."""
    results = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        weights = weight.detach()
        S = torch.linalg.svdvals(weights)
        sigma = (torch.quantile(S, 0.75) - torch.quantile(S, 0.25)) / 1.349
        n, m = weights.shape[-2:]
        beta = n / m if n < m else m / n
        threshold = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
        signal_mask = S > threshold
        signal = S[signal_mask].sum() if signal_mask.any() else torch.tensor(0.0, device=S.device)
        noise = S[~signal_mask].sum() if (~signal_mask).any() else torch.tensor(1.0, device=S.device)
        snr = signal / noise if noise != 0 else float("inf")
        results[name] = float(snr / S[0])
    return results
