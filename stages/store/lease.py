"""Leases: at most one live holder of something (a run's stage, a data drop, a pipeline run) in a store.

A lease folder F holds generations of claims, created with the store's conditional create (S3
`If-None-Match: *`, an exclusive link on a file store), so of two processes racing for the same
generation exactly one wins:

    F/<generation>.json             the claim: {holder, acquired_at, timeout}
    F/<generation>.beat-<unix>      heartbeats of the holder (empty objects)
    F/<generation>.released.json    the holder ended: {outcome, reason, at}

A generation is live while it is not released and its last sign of life (claim or heartbeat)
is younger than its timeout. A holder that dies (kill -9, a lost machine) stops beating; once
its timeout has passed the next claimant takes generation + 1 (conditionally again). A holder
that cannot renew (the store is down) stops its own work before the lease can expire
(`Lease.heartbeat`'s `on_lost`), so a taker never duplicates a live holder's work. Times are the
holders' clocks: machines sharing a store must keep their clocks roughly in sync (NTP).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..base.errors import InputError, OutputExistsError
from .base import ArtifactStore
from .errors import ArtifactNotFoundError, StoreUnavailableError

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".json"
BEAT_MARK = ".beat-"
RELEASED_SUFFIX = ".released.json"
LEASE_SECONDS_ENV = "SPECTRUM_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 600.0


class LeaseHeldError(OutputExistsError):
    """Another live holder has the lease (exit 4, like any output that exists)."""


class LeaseLostError(StoreUnavailableError):
    """The holder could not renew its lease in time and stopped its work (another may now take over)."""


class LeaseTakenError(LeaseLostError):
    """A later generation exists: the holder was silent past its timeout (paused, swapped out) and another took over."""


def lease_timeout() -> float:
    """$SPECTRUM_LEASE_SECONDS, else 600 s: how long a silent holder keeps its lease."""
    raw = os.environ.get(LEASE_SECONDS_ENV)
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise InputError(f"${LEASE_SECONDS_ENV} must be a positive number of seconds, got {raw!r}")
    return seconds


@dataclass(frozen=True)
class LeaseState:
    """The latest generation of a lease folder as a reader sees it now."""

    folder: str
    generation: int
    holder: dict[str, Any]
    acquired_at: float
    timeout: float
    last_sign_of_life: float
    released: dict[str, Any] | None = None

    @property
    def expired(self) -> bool:
        return self.released is None and time.time() - self.last_sign_of_life >= self.timeout

    @property
    def live(self) -> bool:
        return self.released is None and not self.expired

    def describe(self) -> str:
        who = ", ".join(f"{k} {v}" for k, v in self.holder.items() if k in ("host", "pid", "watcher", "run_id"))
        age = time.time() - self.last_sign_of_life
        return f"held by {who or 'another process'} (generation {self.generation}, last heartbeat {age:.0f} s ago)"


def holder_identity(**fields: Any) -> dict[str, Any]:
    """Who holds a lease: host and pid, plus what the caller adds (run id, cache key, ...)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), **fields}


def lease_state(
    store: ArtifactStore, folder: str, default_timeout: float = DEFAULT_LEASE_SECONDS, keys: list[str] | None = None
) -> LeaseState | None:
    """The latest generation in `folder`, or None when nobody ever claimed it.

    `default_timeout` applies to claims that record none (written before leases recorded theirs).
    `keys`: a listing the caller already made that covers the folder (it is not listed again).
    """
    folder = folder.rstrip("/")
    return _state(store, folder, store.list(f"{folder}/") if keys is None else keys, default_timeout)


def generations(folder: str, keys: list[str]) -> dict[int, list[str]]:
    """Generation -> the names of its files (claim, heartbeats, release) among `keys` directly in `folder`."""
    found: dict[int, list[str]] = {}
    for key in keys:
        if not key.startswith(f"{folder}/"):
            continue
        name = key[len(folder) + 1 :]
        head = name.split(".", 1)[0]
        if "/" not in name and head.isdigit():
            found.setdefault(int(head), []).append(name)
    return found


def acquire_lease(store: ArtifactStore, folder: str, holder: Mapping[str, Any], timeout: float | None = None) -> Lease:
    """Claim `folder` for `holder`, or raise LeaseHeldError naming the live holder.

    A released or expired generation is followed by the next one, created conditionally: of two
    processes taking over at once, one wins and the other gets LeaseHeldError.
    """
    folder = folder.rstrip("/")
    timeout = lease_timeout() if timeout is None else timeout
    state = lease_state(store, folder, timeout)
    if state is not None and state.live:
        raise LeaseHeldError(f"{store.uri(folder)} is {state.describe()}")
    generation = 0 if state is None else state.generation + 1
    claim = {"holder": dict(holder), "acquired_at": time.time(), "timeout": timeout}
    try:
        store.put_bytes(f"{folder}/{generation}{CLAIM_SUFFIX}", json.dumps(claim, sort_keys=True).encode())
    except OutputExistsError as exc:
        raise LeaseHeldError(f"{store.uri(folder)} was claimed (generation {generation}) by another process a moment ago") from exc
    return Lease(store, folder, generation, dict(holder), timeout)


@dataclass
class Lease:
    """A lease this process holds (see the module docstring)."""

    store: ArtifactStore
    folder: str
    generation: int
    holder: dict[str, Any]
    timeout: float
    last_renewed: float = field(default_factory=time.time)  # the holder's clock, as other machines read the beats
    released: bool = False
    renewed_at: float = field(default_factory=time.monotonic, repr=False)  # how long it was silent, immune to clock steps
    # Set by the heartbeat when the work must stop: it could not renew, or another holder took over.
    lost: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def renew(self) -> None:
        """One heartbeat (raises what the store raises), then LeaseTakenError if another holder took over meanwhile."""
        if self.released:  # the work released it itself (e.g. as reused) and may still be finishing: nothing to keep
            return
        now = time.time()
        self.store.put_bytes(f"{self.folder}/{self.generation}{BEAT_MARK}{now:.3f}", b"")
        self.last_renewed, self.renewed_at = now, time.monotonic()
        newer = [g for g in generations(self.folder, self.store.list(f"{self.folder}/")) if g > self.generation]
        if newer:
            raise LeaseTakenError(
                f"the lease {self.store.uri(self.folder)} was taken over (generation {max(newer)}) while this holder "
                f"(generation {self.generation}) was silent past its {self.timeout:.0f} s timeout (paused or swapped out?); "
                "the work was stopped so that it is not done twice"
            )

    def release(self, outcome: str, reason: str = "") -> None:
        """End the lease with its outcome; another holder may claim at once. Never raises: if the store is
        unreachable the lease simply expires."""
        if self.released:
            return
        self.released = True
        record = {"outcome": outcome, "reason": reason[:2000], "at": time.time()}
        try:
            self.store.put_bytes(f"{self.folder}/{self.generation}{RELEASED_SUFFIX}", json.dumps(record, sort_keys=True).encode())
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself; the holder's own outcome matters more
            log.warning("could not release the lease %s (%s); it expires after %.0f s", self.store.uri(self.folder), exc, self.timeout)

    @contextmanager
    def held(self, reason: Callable[[Exception], str] = lambda exc: "") -> Iterator[Lease]:
        """Work under the renewed lease (heartbeat), then release it with the outcome: `succeeded` (unless the
        work released it itself, e.g. as `reused`), `interrupted` (Ctrl-C, SIGTERM), `lost` (LeaseLostError), or
        `failed` with `reason(error)`; the error is re-raised."""
        try:
            with self.heartbeat():
                yield self
        except KeyboardInterrupt:
            self.release("interrupted")
            raise
        except LeaseLostError as exc:
            self.release("lost", reason(exc))
            raise
        except Exception as exc:
            self.release("failed", reason(exc))
            raise
        except BaseException:  # SystemExit and the like: still released, not left to expire
            self.release("failed")
            raise
        self.release("succeeded")

    @contextmanager
    def heartbeat(self, on_lost: Callable[[], None] | None = None) -> Iterator[Lease]:
        """Renew the lease from a daemon thread while inside.

        Store errors are retried (every few seconds) and never end the thread. If no renewal has
        succeeded for half the timeout, `on_lost()` runs once (default: interrupt the main thread)
        so the holder stops well before its lease expires and another may take over.
        """
        stop = threading.Event()
        lost = self.lost
        lost.clear()
        interval = self.timeout / 4
        retry = max(min(interval / 4, 5.0), 0.01)

        taken: list[LeaseTakenError] = []

        def stop_work() -> None:
            lost.set()
            (on_lost or _thread.interrupt_main)()

        def beat() -> None:
            wait = interval
            while not stop.wait(wait):
                try:
                    self.renew()
                    wait = interval
                except LeaseTakenError as exc:
                    taken.append(exc)
                    log.warning("%s", exc)
                    stop_work()
                    return
                except Exception as exc:  # noqa: BLE001 - a store outage must not kill the heartbeat
                    silent = time.monotonic() - self.renewed_at
                    log.warning("cannot renew the lease %s (%s); retrying (silent for %.0f s)", self.store.uri(self.folder), exc, silent)
                    wait = retry
                    if silent >= self.timeout / 2 and not lost.is_set():
                        log.warning(
                            "the lease %s could not be renewed for %.0f s: stopping this work before another process takes it over",
                            self.store.uri(self.folder),
                            silent,
                        )
                        stop_work()

        def lost_error() -> LeaseLostError:
            if taken:
                return taken[0]
            return LeaseLostError(
                f"the lease {self.store.uri(self.folder)} could not be renewed for over {self.timeout / 2:.0f} s (is the store "
                "reachable?); the work was stopped so that no other process duplicates it: run it again once the store is back"
            )

        thread = threading.Thread(target=beat, daemon=True, name=f"lease-{self.folder}")
        with _interruptible(lost) if on_lost is None else contextlib.nullcontext():
            thread.start()
            try:
                yield self
            except KeyboardInterrupt:
                if lost.is_set():  # our own on_lost interrupted the work
                    raise lost_error() from None
                raise
            finally:
                stop.set()
                thread.join()
        if lost.is_set():
            raise lost_error()


_watched_leases: list[threading.Event] = []  # the `lost` events of the heartbeats `_stop_if_a_lease_is_lost` serves


def _stop_if_a_lease_is_lost(signum: int, frame: object) -> None:
    if any(lost.is_set() for lost in _watched_leases):
        raise KeyboardInterrupt


@contextmanager
def _interruptible(lost: threading.Event) -> Iterator[None]:
    """Make `_thread.interrupt_main` reach the main thread while inside, even where SIGINT is ignored.

    A process started in the background (`nohup spectrum watch … &`, a non-interactive shell's `&`)
    inherits SIGINT ignored, and then interrupt_main does nothing: a holder that lost its lease would
    work on while another took it over. Here SIGINT gets a handler that stops the work once a lease
    is lost and otherwise keeps ignoring it, as the process asked. Heartbeats nest (a watcher's claim
    holds a pipeline's lease, which holds each stage's): the outermost installs the handler and each
    one inside adds its own lease to those it watches.
    """
    installed = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if installed is not signal.SIG_IGN and installed is not _stop_if_a_lease_is_lost:
        yield
        return
    _watched_leases.append(lost)
    if installed is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop_if_a_lease_is_lost)
    try:
        yield
    finally:
        _watched_leases.remove(lost)
        if installed is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _state(store: ArtifactStore, folder: str, keys: list[str], default_timeout: float) -> LeaseState | None:
    files = generations(folder, keys)
    claimed = sorted(g for g, names in files.items() if f"{g}{CLAIM_SUFFIX}" in names)
    if not claimed:
        return None
    generation = claimed[-1]
    names = files[generation]
    try:
        claim = json.loads(store.get_bytes(f"{folder}/{generation}{CLAIM_SUFFIX}"))
        acquired_at = float(claim.get("claimed_at", claim.get("acquired_at")))
    except (ArtifactNotFoundError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{store.uri(f'{folder}/{generation}{CLAIM_SUFFIX}')} is not a lease claim ({exc}); remove it") from exc
    holder = claim.get("holder") or {k: v for k, v in claim.items() if k in ("watcher", "run_id", "host", "pid")}
    beats = [float(n.split(BEAT_MARK, 1)[1]) for n in names if BEAT_MARK in n and _is_number(n.split(BEAT_MARK, 1)[1])]
    released = None
    if f"{generation}{RELEASED_SUFFIX}" in names:
        try:
            released = json.loads(store.get_bytes(f"{folder}/{generation}{RELEASED_SUFFIX}"))
        except (ArtifactNotFoundError, ValueError):
            released = {"outcome": "unknown"}
    timeout = float(claim.get("timeout") or default_timeout)
    return LeaseState(folder, generation, holder, acquired_at, timeout, max([acquired_at, *beats]), released)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
