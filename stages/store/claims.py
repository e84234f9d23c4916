"""Claims on a piece of work done once (a data drop's pipeline run): a lease per attempt, done and failed markers.

A claim folder holds the lease generations of the attempts (stages.store.lease), `done.json` once
the work is finished and `failed.json` once it failed `max_attempts` times. An attempt failed when
its holder released it as failed, or died without releasing it (its lease expired, or a later
generation took over). The folder's keys are built here alone.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from ..base.errors import OutputExistsError
from .base import ArtifactStore
from .errors import ArtifactNotFoundError
from .lease import RELEASED_SUFFIX, Lease, LeaseHeldError, LeaseState, acquire_lease, generations, lease_state

DONE = "done.json"
FAILED = "failed.json"


@dataclass(frozen=True)
class WorkClaims:
    """The claims on one piece of work, in `folder` of `store`."""

    store: ArtifactStore
    folder: str
    max_attempts: int

    def try_claim(self, holder: dict[str, Any], timeout: float) -> tuple[Lease | None, str]:
        """(the lease this holder now holds, "") or (None, why not: done, failed, claimed by a live holder, lost a race)."""
        keys = self._keys()
        if self._key(DONE) in keys:
            return None, "done"
        if self._key(FAILED) in keys:
            return None, self.failed_note()
        state = lease_state(self.store, self.folder, timeout, keys)
        if state is not None and state.live:
            return None, f"claimed (generation {state.generation}) by a watcher alive {time.time() - state.last_sign_of_life:.0f} s ago"
        attempts = self._failed_attempts(keys, state)
        if len(attempts) >= self.max_attempts:
            self._record_failed(attempts)
            return None, self.failed_note()
        try:
            lease = acquire_lease(self.store, self.folder, holder, timeout)
        except LeaseHeldError:
            return None, f"another watcher claimed generation {0 if state is None else state.generation + 1} first"
        # Listed again: another holder may have claimed, finished and released between the listing above and this claim.
        keys = self._keys()
        finished = [name for name in (DONE, FAILED) if self._key(name) in keys]
        if finished:
            lease.release("skipped", f"{finished[0]} was written while this holder claimed")
            return None, "done" if finished[0] == DONE else self.failed_note()
        return lease, ""

    def mark_done(self, lease: Lease, record: dict[str, Any]) -> None:
        """The work is finished: later claims see `done`."""
        document = {**record, "generation": lease.generation, "finished_at": time.time()}
        self.store.put_bytes(self._key(DONE), json.dumps(document).encode())

    def after_failure(self, reason: str) -> str:
        """Record the work as failed once it has failed max_attempts times; what to report about this failure."""
        keys = self._keys()
        attempts = self._failed_attempts(keys, lease_state(self.store, self.folder, 0.0, keys))
        if len(attempts) >= self.max_attempts:
            self._record_failed(attempts)
            return f"failed {len(attempts)} times, recorded as failed in {self.store.uri(self._key(FAILED))}: {reason}"
        return f"failed (attempt {len(attempts)} of {self.max_attempts}; a later pass tries again): {reason}"

    def failed_note(self) -> str:
        record = self._read_json(self._key(FAILED))
        return (
            f"failed after {record.get('attempts', self.max_attempts)} attempts: {record.get('reason', 'unknown')} "
            f"(remove {self.store.uri(self._key(FAILED))} to try again)"
        )

    def _failed_attempts(self, keys: list[str], latest: LeaseState | None) -> list[dict[str, Any]]:
        """The generations that failed: released as failed, or claimed by a holder that died (never released, silent).

        `latest` is the folder's lease state, read from the same listing `keys`.
        """
        attempts = []
        for generation in sorted(generations(self.folder, keys)):
            released_key = self._key(f"{generation}{RELEASED_SUFFIX}")
            if released_key in keys:
                released = self._read_json(released_key)
                if released.get("outcome") == "failed":
                    attempts.append({"generation": generation, "reason": released.get("reason", "")})
            elif latest is None or generation < latest.generation or latest.expired:
                attempts.append({"generation": generation, "reason": "its watcher stopped without a word (killed, or its machine lost)"})
        return attempts

    def _record_failed(self, attempts: list[dict[str, Any]]) -> None:
        record = {"attempts": len(attempts), "reason": attempts[-1]["reason"], "generations": attempts, "failed_at": time.time()}
        with contextlib.suppress(OutputExistsError):  # another watcher recorded it first
            self.store.put_bytes(self._key(FAILED), json.dumps(record).encode())

    def _keys(self) -> list[str]:
        return self.store.list(f"{self.folder}/")

    def _key(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def _read_json(self, key: str) -> dict[str, Any]:
        try:
            document = json.loads(self.store.get_bytes(key))
        except (ArtifactNotFoundError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}
