"""The resumable scan's journal: finished rows survive a killed scan and are reused by the next one."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ScanJournal:
    """Rows finished so far, one JSON line each after a header line naming what was scanned."""

    def __init__(self, path: Path, fingerprint: str, settings: dict):
        self.path = path
        self.header = {"fingerprint": fingerprint, "settings": settings}

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            self.path.unlink()  # made from other weights or settings: start over
            return {}
        rows: dict[str, dict] = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # The last line of a killed scan may be cut short: keep the good rows only, so the
                # next append starts on a fresh line.
                self._rewrite(rows.values())
                break
            rows[row["tensor_name"]] = row
        return rows

    def _rewrite(self, rows) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in [self.header, *rows]))
        os.replace(temporary, self.path)

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        with self.path.open("a") as handle:
            if fresh:
                handle.write(json.dumps(self.header) + "\n")
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
