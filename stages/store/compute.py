"""What a stage's work cost in device time: recorded in its manifest, summed and priced by whoever reads it.

A manifest's `compute` says on which device kind the stage ran, on how many, for how long:

    {"device": "cuda", "device_name": "NVIDIA H200", "device_count": 8, "seconds": 812.4, "device_seconds": 6499.2}

`device_seconds` = device_count × seconds. A reuse record's is zero (nothing was computed); a
manifest written before this field existed has none (unknown, shown as such). GPU-hours are the
device-hours of `cuda` stages; a price per device-hour (one number, or one per device kind)
turns device-hours into a cost.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..base.errors import InputError

CUDA = "cuda"
CPU = "cpu"
DEVICE_KINDS = (CUDA, CPU)  # the kinds compute_record writes, and so the kinds a price may name


def begin_compute() -> None:
    """Called as a stage's work starts: CUDA memory peaks are counted from here, so a later stage of the same process
    that stays on the CPU is not taken for a GPU stage because an earlier one used the GPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def compute_record(seconds: float) -> dict[str, Any]:
    """The compute of a stage that ran `seconds` in this process: a CUDA device when it allocated CUDA memory since
    begin_compute, else the CPU. Each process counts one device; a distributed run counts its WORLD_SIZE processes.

    torch is looked at only if already loaded (a stage that never imported it ran on the CPU).
    """
    torch = sys.modules.get("torch")
    count = int(os.environ.get("WORLD_SIZE") or 1)
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.max_memory_allocated() > 0:
        device, name = CUDA, torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        device, name = CPU, None
    seconds = max(0.0, float(seconds))
    return {
        "device": device,
        "device_name": name,
        "device_count": count,
        "seconds": round(seconds, 3),
        "device_seconds": round(count * seconds, 3),
    }


def reused_compute(compute: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A reuse record's compute: the same device, no time (the work was done, and counted, by the run it reuses)."""
    return None if compute is None else {**compute, "seconds": 0.0, "device_seconds": 0.0}


@dataclass(frozen=True)
class Prices:
    """Price per device-hour, by device kind; `default` for kinds not named (None: they cost nothing, and are said
    to be unpriced). Parsed from a number or a mapping: `{cuda: 4.5}` prices GPU time and leaves CPU time free."""

    by_device: Mapping[str, float]
    default: float | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> Prices | None:
        """`4.5` (every device kind) or `{cuda: 4.5, cpu: 0.05}`; None when no price is given."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
            raise InputError(
                f"{where}: expected a price per device-hour (a number, or a mapping like {{cuda: 4.5, cpu: 0.05}}), found {value!r}"
            )
        if isinstance(value, Mapping):
            unknown = sorted(str(kind) for kind in value if kind not in DEVICE_KINDS)
            if unknown:
                raise InputError(f"{where}: unknown device kind {unknown[0]!r}; use one of {', '.join(DEVICE_KINDS)} (e.g. {{cuda: 4.5}})")
            prices = {str(kind): _price(price, f"{where}.{kind}") for kind, price in value.items()}
            return cls(prices)
        return cls({}, _price(value, where))

    def of(self, device: str) -> float | None:
        """The price of `device`'s hours; None when it is not priced (it is counted at 0)."""
        return self.by_device.get(device, self.default)


def _price(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value or value == float("inf"):
        raise InputError(f"{where}: a price per device-hour must be a number >= 0, found {value!r}")
    return float(value)


@dataclass(frozen=True)
class Usage:
    """Device time summed over stages: device-hours by kind, GPU-hours, and a cost when priced."""

    device_hours: Mapping[str, float]
    unknown: int  # stages whose manifest records no compute (written before it was recorded)
    cost: float | None  # None: no price given
    unpriced: tuple[str, ...] = ()  # device kinds used but given no price: counted at 0 in the cost

    @property
    def gpu_hours(self) -> float:
        return self.device_hours.get(CUDA, 0.0)


def usage(computes: Iterable[Mapping[str, Any] | None], prices: Prices | None = None) -> Usage:
    """The device-hours (and cost, with `prices`) of the stages whose `compute` records are given."""
    hours: dict[str, float] = {}
    unknown = 0
    for compute in computes:
        if not compute:
            unknown += 1
            continue
        hours[compute["device"]] = hours.get(compute["device"], 0.0) + float(compute["device_seconds"]) / 3600
    if prices is None:
        return Usage(hours, unknown, None)
    used = {device: h for device, h in hours.items() if h > 0}
    unpriced = tuple(sorted(device for device in used if prices.of(device) is None))
    return Usage(hours, unknown, sum(h * (prices.of(device) or 0.0) for device, h in used.items()), unpriced)


def describe_usage(use: Usage, currency: str = "") -> str:
    """`0.0123 GPU-h, 0.2500 CPU-h, cost 0.06` (the cost only when priced; unpriced kinds said)."""
    parts = [f"{use.gpu_hours:.4f} GPU-h"] + [f"{h:.4f} {d.upper()}-h" for d, h in sorted(use.device_hours.items()) if d != CUDA]
    if use.unknown:
        parts.append(f"{use.unknown} stage(s) without a compute record")
    if use.cost is not None:
        unpriced = f" ({', '.join(d.upper() for d in use.unpriced)} time not priced)" if use.unpriced else ""
        parts.append(f"cost {currency}{use.cost:.2f}{unpriced}")
    return ", ".join(parts)
