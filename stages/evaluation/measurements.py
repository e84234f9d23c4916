"""A model's loss on a token sequence, measured once per store: a step of the evaluate stage, cached like any stage.

A model line measures the same models again and again: generation N+1's base is generation N's
trained model, measured on the same held-out data and forgetting probe; evaluate.sft's base is the
cpt model evaluate measured. Each (model, tokens) measurement is therefore its own step of the
evaluating run (`evaluate.measure_<label>_<dataset>`, or `evaluate.<step>_measure_…`), keyed by the
model's file hashes, the sha256 of the exact token ids and the settings that change the number
(what is measured, seq_len, batch size, device type). A later evaluation of the same model on the
same tokens reuses the committed number (recorded as reused in its run, like any stage) and does
not even load the model. The stored number is the summed NLL and the token count, exact through
JSON, so a reused row equals a computed one to the bit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..base.contracts import EVALUATE
from ..core.execution import execute_stage
from ..core.stage import StageContext
from ..store import read_output
from .perplexity import Likelihood

MEASUREMENT_FILE = "measurement.json"


def step_slug(name: str) -> str:
    """A dataset name as part of a step name: `domain:plant-test.jsonl` -> `domain-plant-test-jsonl` (at most 64 characters)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64] or "data"


def tokens_digest(tokens: Any) -> str:
    """sha256 of the canonical JSON of token ids (a stream, or chat rows of ids and labels)."""
    return hashlib.sha256(json.dumps(tokens, separators=(",", ":")).encode()).hexdigest()


def measured_once(
    context: StageContext,
    qualifier: str,
    model_inputs: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    compute: Callable[[], Likelihood],
) -> Likelihood:
    """`compute()`, committed as the step `evaluate.<qualifier>` of the context's run; or the same measurement made before.

    `settings` must name everything besides the model's files that decides the number (what is
    measured, the tokens' digest, seq_len, …): they are the step's cache parameters.
    """

    def produce(stage) -> list:
        measured = compute()
        return [stage.put_bytes(MEASUREMENT_FILE, json.dumps({"nll": measured.nll, "tokens": measured.tokens}).encode())]

    own = "_".join(filter(None, (context.step, "measure", qualifier)))
    step = replace(context.as_step(own), tracking=None)  # the tracker shows the evaluation's numbers, logged by evaluate itself
    outcome = execute_stage(EVALUATE, step, {"measurement": dict(settings)}, list(model_inputs), produce)
    data, _ = read_output(context.store, outcome.manifest, MEASUREMENT_FILE)
    return Likelihood(**json.loads(data))
