"""`--price-per-device-hour X` or `--price-per-device-hour KIND=X` (repeatable): the one parser of a price on the command line.

`X` prices every device kind; `KIND=X` (cuda, cpu) one kind, overriding `X` for that kind. `--currency MARK`
($, EUR …) is written before a cost, as the pipeline config's `cost.currency` is. Any command that shows a cost
(`spectrum runs --cost`, `spectrum report`, `spectrum card`) adds both with add_price_argument and reads them with
prices_from_args and currency_from_args.
"""

from __future__ import annotations

import argparse

from stages.base.errors import InputError
from stages.store.compute import DEVICE_KINDS, Prices

FLAG = "--price-per-device-hour"
CURRENCY_FLAG = "--currency"
MAX_CURRENCY_CHARS = 8  # as the pipeline config's cost.currency (flows/integration_settings.py)


def add_price_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        FLAG,
        dest="price_per_device_hour",
        action="append",
        metavar="[KIND=]X",
        help=f"price of one device-hour, to show a cost: X for every device kind, or KIND=X per kind ({', '.join(DEVICE_KINDS)}); "
        "repeatable, e.g. --price-per-device-hour cuda=4.5 --price-per-device-hour cpu=0.05",
    )
    parser.add_argument(
        CURRENCY_FLAG,
        default="",
        metavar="MARK",
        help=f"written before a cost, e.g. '$' or 'EUR ' (at most {MAX_CURRENCY_CHARS} characters; default none); with {FLAG}",
    )


def prices_from_args(args: argparse.Namespace) -> Prices | None:
    """The prices given with --price-per-device-hour, or None when none was given (--currency is checked too)."""
    prices = parse_prices(getattr(args, "price_per_device_hour", None) or [])
    currency = currency_from_args(args)
    if currency and prices is None:
        raise InputError(f"{CURRENCY_FLAG} {currency!r} marks a cost: give it with {FLAG} X (e.g. {FLAG} 4.5 {CURRENCY_FLAG} '$')")
    return prices


def currency_from_args(args: argparse.Namespace) -> str:
    """The --currency mark ('' when none); a long or multi-line one raises InputError."""
    currency = getattr(args, "currency", "") or ""
    if len(currency) > MAX_CURRENCY_CHARS or not currency.isprintable():
        raise InputError(
            f"{CURRENCY_FLAG} {currency!r}: expected a short currency mark ($, EUR …) of at most {MAX_CURRENCY_CHARS} printable characters"
        )
    return currency


def parse_prices(values: list[str]) -> Prices | None:
    """`["4.5"]`, `["cuda=4.5", "cpu=0.05"]` or both kinds mixed; a bad value raises InputError naming it."""
    if not values:
        return None
    default: float | None = None
    by_device: dict[str, float] = {}
    for value in values:
        kind, sep, number = value.partition("=")
        if not sep:
            if default is not None:
                raise InputError(f"{FLAG} {value}: a price for every device kind was already given ({default:g}); give it once, or KIND=X")
            default = _number(value, f"{FLAG} {value}")
            continue
        kind = kind.strip()
        if kind not in DEVICE_KINDS:
            raise InputError(f"{FLAG} {value}: unknown device kind {kind!r}; use one of {', '.join(DEVICE_KINDS)} (e.g. cuda=4.5)")
        if kind in by_device:
            raise InputError(f"{FLAG} {value}: {kind} was already given a price; give each device kind once")
        by_device[kind] = _number(number, f"{FLAG} {value}")
    return Prices(by_device, default)


def _number(text: str, where: str) -> float:
    try:
        number = float(text.strip())
    except ValueError:
        raise InputError(f"{where}: a price per device-hour must be a number >= 0 (e.g. 4.5), found {text!r}") from None
    prices = Prices.parse(number, where)  # the store's own check: >= 0 and finite
    assert prices is not None and prices.default is not None
    return prices.default
