"""Text from data reaches the report as text: no Markdown or HTML in report.md, no mathtext or LaTeX in a chart (issue 14: 15, 17)."""

from __future__ import annotations

import html
import re

import matplotlib
import pytest
from markdown_it import MarkdownIt

from stages.report import charts
from stages.report.render import Document, Image, Section, Table, Text, to_markdown

HOSTILE = [
    "model.layers.0.<img src=x onerror=alert(1)>.weight",
    "*bold* _em_ __strong__ `code` ~~gone~~",
    "[click](http://evil.example) ![pic](http://evil.example/p.png)",
    "a|b \\| c &amp; &lt;b&gt; $x^2$ # not a heading",
    "line one\nline two\r\nline three",
]
PNG = b"\x89PNG\r\n\x1a\n"


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(markdown)


def shown(page: str) -> str:
    """The text a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_every_string_from_data_is_shown_literally_in_the_markdown():
    document = Document(
        run_id="r1",
        summary=list(HOSTILE),
        meta=[f"store {HOSTILE[0]}"],
        sections=[
            Section(
                "lineage",
                f"Lineage {HOSTILE[1]}",
                [
                    Text(HOSTILE[2]),
                    Text(HOSTILE[3], missing=True),
                    Image(b"", HOSTILE[0]),
                    Table(["name", "value"], [[h, "1.0"] for h in HOSTILE], ["mono", "num"]),
                ],
            )
        ],
    )
    markdown = to_markdown(document, "report (1).html")
    page = rendered(markdown)
    assert not re.search(r"<(img|strong|code|s|del|script|h1|h3)\b", page.split("<h1>", 1)[1].split("</h1>", 1)[1])
    assert page.count("<em>") == 2  # ours only: the missing-data line and the chart line
    assert page.count("<a ") == 1 and 'href="report%20%281%29.html"' in page  # only our link to the charts
    assert page.count("<tr>") == 1 + len(HOSTILE)  # a pipe or a newline in a name neither splits a cell nor ends the table
    text = shown(page)
    for value in HOSTILE:
        assert " ".join(value.split()) in text, value


@pytest.mark.parametrize("usetex", [False, True])
def test_charts_draw_names_with_dollar_signs_literally(monkeypatch, usetex):
    """`$\\undefined$` in a tensor name was a mathtext ValueError traceback; a matplotlibrc with usetex must not matter."""
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", usetex)
    name = r"model.layers.0.mlp.$\undefinedmacro{x}$.weight"
    heat = [charts.HeatCell(0, name, 3.0, selected=True), charts.HeatCell(1, "mlp.$x^$", 300.0, changed=True)]
    assert charts.snr_heatmap(heat, f"SNR — {name}", show_changed=True).startswith(PNG)
    curves = [charts.Curve(name, [1, 2], [2.0, 1.0], [1e-3, 1e-3]), charts.Curve("b$", [1], [1.0], [1e-3])]
    assert charts.loss_curves(curves).startswith(PNG)
    rows = [{"method": name, "step_seconds": 1.0, "heldout_perplexity": 3.0}, {"method": "full", "step_seconds": 2.0}]
    assert charts.comparison_bars(rows).startswith(PNG)
    drift = charts.DriftPanel(name, [1.0, 100.0, 1000.0], [1.0, 120.0, 900.0], [False, True, True])  # log axes: our mathtext still works
    assert charts.drift_scatter([drift]).startswith(PNG)
    assert matplotlib.rcParams["text.usetex"] is usetex  # the user's setting is left as it was


def test_literal_keeps_an_escaped_dollar_as_it_was():
    from matplotlib.text import Text as MplText

    for value in ("a\\$b$c$", "$x$", "plain", "$$"):
        shown_text, math = MplText(text=charts.literal(value))._preprocess_math(charts.literal(value))
        assert (shown_text, math) == (value, False)
