"""spectrum report --line: a model line over its generations (issue 16), on a 3-generation line built by hand in a file store."""

from __future__ import annotations

import html
import re

import pytest

from stages.base.contracts import EVALUATION_TABLE, TRAINED_TENSORS_TABLE
from stages.base.errors import InputError, OutputExistsError
from stages.report.line import build_line_report, compose_line, gather_line, trained_counts
from stages.report.render import Table
from stages.store import lines as L
from stages.store import open_store

from .test_report import PNG, commit, images_of, open_in_chromium
from .test_report_escaping import HOSTILE, rendered, shown

LINE = "acme"
TYPES = ("self_attn.q_proj", "mlp.down_proj")
BASE_MODEL = {"uri": "/models/base", "sha256": "a" * 64}
GENERAL = "general:general.txt"
FAILED = {
    "rule": "heldout_perplexity.max_relative_change=-0.01",
    "metric": "heldout_perplexity",
    "measured": 0.0333,
    "passed": False,
    "reason": "held-out perplexity rose 3.3% (300 -> 310); at most -1.0% is allowed",
    "base": 300.0,
    "trained": 310.0,
}
PASSED = {**FAILED, "measured": -0.4, "passed": True, "reason": "held-out perplexity fell 40.0%"}


def tensor(layer: int | None, module_type: str) -> str:
    return f"model.layers.{layer}.{module_type}.weight" if layer is not None else f"{module_type}.weight"


TENSORS = [tensor(layer, kind) for layer in range(3) for kind in TYPES] + [
    "model.layers.0.input_layernorm.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
]
# what each generation's cpt changed: generation 2 (rejected) trained layer 2's down_proj, nobody else did
CHANGED = {
    1: {tensor(0, "self_attn.q_proj"), tensor(1, "self_attn.q_proj"), "lm_head.weight"},
    2: {tensor(0, "self_attn.q_proj"), tensor(2, "mlp.down_proj")},
    3: {tensor(0, "self_attn.q_proj"), tensor(1, "mlp.down_proj")},
}
EXPECTED_COUNTS = {(layer, kind): 0 for layer in range(3) for kind in TYPES} | {
    (0, "input_layernorm"): 0,
    (None, "model.embed_tokens"): 0,
    (None, "model.norm"): 0,
    (None, "lm_head"): 1,
    (0, "self_attn.q_proj"): 3,
    (1, "self_attn.q_proj"): 1,
    (2, "mlp.down_proj"): 1,
    (1, "mlp.down_proj"): 1,
}
# (held-out base, trained), (general base, trained): generation 2 started from generation 1's model and got worse
PERPLEXITY = {1: ((500.0, 300.0), (400.0, 410.0)), 2: ((300.0, 310.0), (410.0, 500.0)), 3: ((300.0, 250.0), (410.0, 420.0))}


def evaluation_rows(heldout: tuple[float, float], general: tuple[float, float], general_name: str = GENERAL) -> list[dict]:
    rows = []
    for role, dataset, (base, trained) in (("domain", "heldout", heldout), ("general", general_name, general)):
        for model, value in (("base", base), ("trained", trained), ("delta", trained - base)):
            rows.append({"model": model, "metric": "perplexity", "dataset": dataset, "value": value, "tokens": 512, "role": role,
                         "dataset_sha256": "b" * 64})  # fmt: skip
        rows.append({"model": "trained", "metric": "nll_per_token", "dataset": dataset, "value": 5.0, "tokens": 512, "role": role,
                     "dataset_sha256": "b" * 64})  # fmt: skip
    return rows


def audit_rows(changed: set[str]) -> list[dict]:
    return [
        {"tensor_name": name, "trainable": name in changed, "parameter_count": 100, "dtype": "F32", "sha256_before": "c" * 64,
         "sha256_after": ("d" if name in changed else "c") * 64, "changed": name in changed, "relative_change": 0.01 * (name in changed)}
        for name in TENSORS
    ]  # fmt: skip


def model_uri(store, run: str) -> str:
    return store.uri(f"runs/{run}/cpt/model")


def add_generation(store, n: int, decision: str, reasons: list[dict], starting_model: dict, general_name: str = GENERAL):
    """What a line's pipeline run leaves: its cpt step's tensor audit, its evaluate step's table, then the line's decision."""
    run = f"g{n}"
    trained = commit(store, run, "cpt", {TRAINED_TENSORS_TABLE: audit_rows(CHANGED[n])})
    commit(store, run, "evaluate", {EVALUATION_TABLE: evaluation_rows(*PERPLEXITY[n], general_name)}, inputs=trained)
    record, _ = L.record_decision(
        store, LINE, drop=f"drop-{n}", run_id=run, starting_model=starting_model, model=model_uri(store, run), decision=decision,
        reasons=reasons,
    )  # fmt: skip
    return record


@pytest.fixture
def line_store(tmp_path):
    """Generations 1 (promoted), 2 (rejected by its gate, from 1's model), 3 (promoted, from 1's model again)."""
    store = open_store(str(tmp_path / "store"))
    first = add_generation(store, 1, L.PROMOTED, [PASSED], BASE_MODEL)
    from_first = {"uri": first.model, "sha256": "e" * 64}
    add_generation(store, 2, L.REJECTED, [PASSED | {"rule": "general_perplexity.max_relative_change=0.05"}, FAILED], from_first)
    add_generation(store, 3, L.PROMOTED, [PASSED], from_first)
    return store


def table_rows(page: str, section: str) -> list[list[str]]:
    """The body rows of the tables of one section of the page, as the text of their cells."""
    body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
    return [
        [shown(cell.replace("<wbr>", "")) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body)
        if "<td" in row
    ]


def decision(row: list[str]) -> str:
    """The decision cell without the time it was decided (which it ends with)."""
    assert re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d$", row[3]), row[3]
    return row[3][: -len(" 2026-01-01 00:00")]


def test_the_line_report_names_each_generation_marks_the_rejected_one_and_counts_the_map(line_store, tmp_path):
    result = build_line_report(line_store, LINE, tmp_path / "line.html")

    assert result.sections == ("generations", "production", "tensors") and result.images == 2
    assert result.markdown_path == tmp_path / "line.md" and result.markdown_path.is_file()
    page = result.html_path.read_text()
    assert all(image.startswith(PNG) for image in images_of(page))
    assert "<title>Spectrum line report: acme</title>" in page

    generations = table_rows(page, "generations")
    assert [[*row[:3], decision(row)] for row in generations] == [
        ["1", "drop-1", "g1", "promoted"],
        ["2", "drop-2", "g2", "rejected"],
        ["3", "drop-3", "g3", "promoted production now"],
    ]
    assert [row[4] for row in generations] == [f"/models/base sha256 {'a' * 12}", "generation 1", "generation 1"]
    assert [row[5] for row in generations] == ["500.0 → 300.0 -40.0%", "300.0 → 310.0 +3.3%", "300.0 → 250.0 -16.7%"]
    assert [row[6] for row in generations] == ["400.0 → 410.0 +2.5%", "410.0 → 500.0 +22.0%", "410.0 → 420.0 +2.4%"]
    assert [row[7] for row in generations] == [f"{len(CHANGED[n])} of {len(TENSORS)}" for n in (1, 2, 3)]
    assert generations[1][8] == f"FAIL {FAILED['rule']}: {FAILED['reason']}"  # the failed rule only, as the gate wrote it
    assert generations[0][8] == generations[2][8] == "passed (1 check)"

    pointers = table_rows(page, "production")
    assert [row[:4] for row in pointers] == [["1", "1", "g1", "gate"], ["2", "3", "g3", "gate"]]

    data = gather_line(line_store, LINE)
    assert trained_counts(data) == EXPECTED_COUNTS
    [grid] = [block for block in compose_line(data).sections[2].blocks if isinstance(block, Table)]
    assert grid.headers == ["layer", *TYPES, "input_layernorm", "model.embed_tokens", "model.norm", "lm_head"]
    shown_counts = {
        (None if row[0] == "no layer" else int(row[0].split()[1]), kind): int(cell)
        for row in table_rows(page, "tensors")
        for kind, cell in zip(grid.headers[1:], row[1:], strict=True)
        if cell != "—"
    }
    assert shown_counts == EXPECTED_COUNTS

    markdown = result.markdown_path.read_text()
    assert markdown.startswith("# Spectrum line report: line `acme`\n")
    assert re.search(r"^\|\s+2 \| drop-2 \| g2\s+\| rejected<br>\S+ \S+\s+\| generation 1\s+\| 300\.0 → 310\.0<br>\+3\.3%", markdown, re.M)


def test_a_rollback_and_a_generation_without_tables_are_shown_as_they_are(line_store, tmp_path):
    L.rollback(line_store, LINE, 1, "regression reported by the legal team")
    L.record_decision(line_store, LINE, drop="drop-4", run_id="g4", starting_model={"uri": "/models/x", "sha256": "f" * 64},
                      model=model_uri(line_store, "g4"), decision=L.REJECTED, reasons=[])  # fmt: skip
    page = build_line_report(line_store, LINE, tmp_path / "line.html").html_path.read_text()

    generations = table_rows(page, "generations")
    assert decision(generations[0]) == "promoted production now" and decision(generations[2]) == "promoted"
    row = generations[3]
    assert [*row[1:3], decision(row), *row[4:]] == ["drop-4", "g4", "rejected", f"/models/x sha256 {'f' * 12}", "—", "—", "—", "—"]
    assert table_rows(page, "production")[-1][:5] == ["3", "1", "g1", "rollback", "regression reported by the legal team"]
    assert "Generation(s) 4 have no tensor audit and are not counted." in page
    assert trained_counts(gather_line(line_store, LINE)) == EXPECTED_COUNTS


def test_text_from_data_is_escaped_in_the_page_the_markdown_and_the_charts(tmp_path):
    hostile = " ".join(HOSTILE[:4])
    mathtext = r"general $\foo$ {x}"  # two general datasets: the chart's legend draws both names (mathtext would fail on \foo)
    store = open_store(str(tmp_path / "hostile"))
    add_generation(store, 1, L.PROMOTED, [PASSED], BASE_MODEL, general_name=hostile)
    add_generation(store, 2, L.REJECTED, [FAILED | {"reason": hostile}], {"uri": HOSTILE[0], "sha256": "e" * 64}, general_name=mathtext)
    L.manual_promote(store, LINE, "g2", why=HOSTILE[4])

    result = build_line_report(store, LINE, tmp_path / "line.html")
    page = result.html_path.read_text()
    assert "<img src=x" not in page and "<script" not in page
    text = shown(page.replace("<wbr>", ""))
    for value in (hostile, mathtext, HOSTILE[0], " ".join(HOSTILE[4].split())):
        assert value in text, value
    assert images_of(page) and all(image.startswith(PNG) for image in images_of(page))  # the chart drew the name literally
    markdown = rendered(result.markdown_path.read_text())
    assert not re.search(r"<(img|strong|code|s|del|script|h3)\b", markdown.split("</h1>", 1)[1])
    assert hostile.replace("\n", " ").split("$")[0].strip() in " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markdown)).split())


def test_an_unknown_line_or_one_without_generations_is_one_clear_error(line_store, tmp_path):
    with pytest.raises(InputError, match=r"no line 'nope' in .*\(its lines: acme\)"):
        build_line_report(line_store, "nope", tmp_path / "line.html")
    L.record_skipped_drop(line_store, "empty", "drop-0", "older than the last processed drop")
    with pytest.raises(InputError, match=r"line 'empty' has no generations yet in .*lines/empty, so there is nothing to report"):
        build_line_report(line_store, "empty", tmp_path / "line.html")
    with pytest.raises(InputError, match="invalid line name"):
        build_line_report(line_store, "../x", tmp_path / "line.html")
    with pytest.raises(InputError, match=r"must be an \.html file"):
        build_line_report(line_store, LINE, tmp_path / "line.txt")
    assert not list(tmp_path.glob("line.*")), "nothing is written for a refused report"

    build_line_report(line_store, LINE, tmp_path / "line.html")
    with pytest.raises(OutputExistsError):
        build_line_report(line_store, LINE, tmp_path / "line.html")
    build_line_report(line_store, LINE, tmp_path / "line.html", overwrite=True)


def test_spectrum_report_line_writes_the_page_and_refuses_a_run_with_a_line(line_store, tmp_path, capsys):
    from spectrum_cli.main import main

    out = tmp_path / "line.html"
    assert main(["report", "--line", LINE, "--store", line_store.root_uri, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"report of line acme: {out} (2 charts; generations, production, tensors) and {tmp_path / 'line.md'}" in said
    for argv in (["report", "--store", line_store.root_uri], ["report", "g1", "--line", LINE, "--store", line_store.root_uri]):
        assert main([*argv, "--out", str(tmp_path / "other.html")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "a RUN or --line LINE" in err and "Traceback" not in err
    assert main(["report", "--line", "nope", "--store", line_store.root_uri, "--out", str(tmp_path / "other.html")]) == 2
    assert "error: no line 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "other.html").exists()


@pytest.mark.integration
def test_the_line_report_loads_in_a_browser_with_its_charts_and_tables(line_store, tmp_path):
    result = build_line_report(line_store, LINE, tmp_path / "line.html")
    seen = open_in_chromium(result.html_path, tmp_path / "line.png")

    assert seen["requests"] == [result.html_path.as_uri()], "the page requests nothing but itself"
    assert seen["title"] == "Spectrum line report: acme"
    assert seen["sections"] == ["generations", "production", "tensors"]
    assert len(seen["images"]) == 2 and all(image["complete"] and image["width"] > 0 for image in seen["images"])
    assert seen["tables"] == [3, 2, 4]  # generations, production pointers, the map's rows (layers 0-2 and no layer)
    assert not seen["overflow"], "the page fits a laptop screen without scrolling sideways"
    assert (tmp_path / "line.png").read_bytes().startswith(PNG)
