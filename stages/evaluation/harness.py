"""lm-evaluation-harness tasks, offline: task YAMLs and their data files in a local folder.

Tasks are loaded with `TaskManager(include_path=FOLDER)` and run by `lm_eval.simple_evaluate`
on the local model folder with the Hugging Face hub and datasets switched to offline, so a task
that would download anything fails, as a clear error, instead of reaching the network. A task
YAML reads its data from the folder, e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: {test: /abs/path/to/questions.jsonl}}`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..base.errors import InputError

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def require_tasks(tasks: list[str], tasks_dir: str | None) -> None:
    """Checked before any model is loaded: the folder exists and names every task."""
    if not tasks:
        return
    if tasks_dir is None or not Path(tasks_dir).is_dir():
        raise InputError(f"--task needs --tasks-dir, a folder of task YAMLs and their data (got {tasks_dir!r})")
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise InputError("--task needs lm-evaluation-harness: pip install 'spectrum-pipeline[eval]' (lm-eval 0.4.13)") from exc
    manager = _task_manager(Path(tasks_dir))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = sorted(_local_task_names(Path(tasks_dir)))
        raise InputError(f"task(s) {', '.join(unknown)} are not defined in {tasks_dir} (it defines: {', '.join(local) or 'none'})")


def run_tasks(model_dir: Path, tasks: list[str], tasks_dir: Path, device: str, batch_size: int) -> list[dict[str, Any]]:
    """(metric, dataset=task, value, tokens=samples) rows for every numeric metric of every task."""
    import lm_eval

    with _offline():
        try:
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={model_dir},dtype=float32",
                tasks=tasks,
                task_manager=_task_manager(tasks_dir),
                device=device,
                batch_size=batch_size,
                log_samples=False,
            )
        except Exception as exc:  # the harness raises many kinds for a task it cannot build offline
            raise InputError(f"lm-evaluation-harness could not run {', '.join(tasks)} offline from {tasks_dir}: {exc}") from exc
    return score_rows(results)


def score_rows(results: dict) -> list[dict]:
    """One row per task score. lm-eval keys a score `metric,filter`: the filter stays in the name unless it is `none`, so
    a task scored under two filters (gsm8k: strict-match, flexible-extract) gives two distinct metrics, not one twice."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        samples = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        for key, value in sorted(metrics.items()):
            name, _, score_filter = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                metric = name if score_filter in ("", "none") else f"{name}/{score_filter}"
                rows.append({"metric": f"lm_eval:{metric}", "dataset": task, "value": float(value), "tokens": int(samples)})
    return rows


def _task_manager(tasks_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir))


def _local_task_names(tasks_dir: Path) -> Iterator[str]:
    import yaml

    for path in tasks_dir.rglob("*.yaml"):
        with contextlib.suppress(Exception):
            name = (yaml.safe_load(path.read_text()) or {}).get("task")
            if isinstance(name, str):
                yield name


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    previous = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
