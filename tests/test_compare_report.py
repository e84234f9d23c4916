"""The report of a comparison over seeds: mean ± sd per method, the paired 95% intervals as a table and as a chart."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.base.contracts import COMPARISON_TABLE
from stages.compare import COMPARISON_SCHEMA
from stages.report import build_report
from stages.store import commit_manifest, open_store, start_manifest, write_table

from .test_report import PNG, images_of, open_in_chromium

HELDOUT = {"full": (9.8, 9.9, 10.0), "spectrum-25": (10.5, 10.6, 10.9), "spectrum-25-random": (10.0, 10.2, 10.4)}


def arm(method: str, seed: int) -> dict:
    heldout = HELDOUT[method][seed]
    full = method == "full"
    return {
        "method": method,
        "seed": seed,
        "cpt_run": f"cmp-{method}-s{seed}",
        "evaluate_run": f"cmp-{method}-s{seed}",
        "trainable_parameters": 800 if full else 240,
        "total_parameters": 800,
        "trainable_share": 1.0 if full else 0.3,
        "step_seconds": (0.5 if full else 0.3) + 0.01 * seed,
        "train_seconds": 3.0,
        "peak_memory_mib": 400.0 if full else 300.0,
        "final_loss": 2.0 + seed / 10,
        "heldout_perplexity_base": 12.0,
        "heldout_perplexity": heldout,
        "general_perplexity_base": 9.0,
        "general_perplexity": 9.5 + seed / 10,
        "time_ratio": None,
        "memory_ratio": None,
    }


@pytest.fixture
def seeded(tmp_path):
    """A comparison run of three methods over three seeds (rows as the compare stage writes them)."""
    store = open_store(str(tmp_path / "store"))
    rows = [arm(method, seed) for seed in range(3) for method in HELDOUT]
    blob = store.put_bytes("blobs/arms.bin", b"arms")
    outputs = [write_table(store, COMPARISON_TABLE, pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA), stage="compare", run_id="cmp")]
    commit_manifest(store, start_manifest("compare", "1.0", "cmp", {"seeds": 3}, [blob]).finish(outputs))
    return store


def test_a_seeded_comparison_reports_spreads_and_paired_intervals(seeded, tmp_path):
    result = build_report(seeded, "cmp", tmp_path / "cmp.html")
    assert "comparison" in result.sections and result.images == 1
    markdown = result.markdown_path.read_text()
    assert "3 methods compared over 3 seeds: full, spectrum-25, spectrum-25-random" in markdown
    # held-out: random − spectrum-25 = -0.5, -0.4, -0.5 per seed: -0.47 [-0.61, -0.32], significant
    assert r"spectrum-25-random: held-out ppl lower than spectrum-25 by -0.47 \[-0.61, -0.32\] \*" in markdown
    assert "10.67 ± 0.21" in markdown and "Difference to spectrum-25 (method − spectrum-25, paired by seed)" in markdown
    assert "| spectrum-25-random |    2 |" in markdown  # the per-seed rows keep their seed
    [chart] = images_of(result.html_path.read_text())
    assert chart.startswith(PNG)


@pytest.mark.integration
def test_the_report_of_a_seeded_comparison_loads_in_a_browser(seeded, tmp_path):
    result = build_report(seeded, "cmp", tmp_path / "report.html")
    seen = open_in_chromium(result.html_path, tmp_path / "report.png")
    assert seen["requests"] == [result.html_path.as_uri()]
    assert len(seen["images"]) == 1 and all(image["complete"] and image["width"] > 0 for image in seen["images"])
    assert "comparison" in seen["sections"] and not seen["overflow"]
