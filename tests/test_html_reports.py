"""HTML reports opened in headless Chromium: no console error, no network request, the DOM says what the CSVs say.

Needs Debian's ``chromium`` (installed by .ci/run) and websocket-client (test extra); skipped only where no
Chromium binary can be found.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import Browser, dump_dom, find_chromium, screenshot
from tiny_models import EXPERTS, LINES
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.render.html import ablate_html, balance_html, compare_html, write_html
from moe_inspect.render.html.page import expert_colours

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (apt-get install chromium, or set MOE_INSPECT_CHROMIUM): "
    "HTML reports are checked in a real browser",
)
runner = CliRunner()
TEXT = "def add(a, b):\n    return a + b\nThe fox sends tokens to experts, and load balance matters."


@pytest.fixture(scope="module")
def browser() -> Browser:
    pytest.importorskip("websocket", reason="websocket-client (test extra) drives Chromium's DevTools protocol")
    assert CHROMIUM is not None
    b = Browser(CHROMIUM)
    yield b
    b.close()


@pytest.fixture(scope="module")
def mixtral_dir(tiny_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_dir("mixtral")


def _rgb(colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(colour[i : i + 2], 16) for i in (1, 3, 5)))


def _assert_clean(browser: Browser) -> None:
    assert browser.console_errors() == []
    assert browser.requests() == []


def _assert_not_blank(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "screenshot is (nearly) one colour"
    assert max(count for count, _ in colours) < 0.97 * image.width * image.height


class _Spans(HTMLParser):
    """The static (no-script) classes of the coloured text's token spans."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "span" and "t" in a.get("class", "").split():
            self.spans.append(a)


def test_route_report_colours_match_the_csv(mixtral_dir: Path, tmp_path: Path, browser: Browser) -> None:
    csv, page = tmp_path / "route.csv", tmp_path / "route.html"
    result = runner.invoke(
        app, ["route", TEXT, "-m", str(mixtral_dir), "--device", "cpu", "-q", "--csv", str(csv), "--html", str(page)]
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(csv, keep_default_na=False)
    first = rows[rows["rank"] == 0]
    layers = sorted(first.layer.unique())
    palette = expert_colours(EXPERTS)
    # Without script: the first layer's colours are in the markup itself.
    parser = _Spans()
    parser.feed(page.read_text(encoding="utf-8"))
    want0 = first[first.layer == layers[0]].sort_values("position").expert.tolist()
    assert [int(re.search(r"\bx(\d+)\b", s["class"]).group(1)) for s in parser.spans] == want0
    browser.open(page)
    _assert_clean(browser)
    for layer in layers:
        got = browser.evaluate(
            f"(()=>{{const s=document.getElementById('layer');s.value='{layer}';"
            "s.dispatchEvent(new Event('change'));"
            "return [...document.querySelectorAll('.text .t')].map(e=>[+e.dataset.expert,"
            "getComputedStyle(e).backgroundColor, e.textContent]);})()"
        )
        want = first[first.layer == layer].sort_values("position")
        assert [g[0] for g in got] == want.expert.tolist()
        assert [g[1] for g in got] == [_rgb(palette[e]) for e in want.expert]
        assert "".join(g[2] for g in got) == "".join(want.token)
    # The focus card lists all k experts of the focused token at the chosen layer.
    card = browser.evaluate(
        "(()=>{const t=document.querySelectorAll('.text .t')[3];t.focus();"
        "return [...document.querySelectorAll('#card tr')].slice(1).map(r=>+r.cells[1].textContent.trim());})()"
    )
    last = rows[(rows.layer == layers[-1]) & (rows.position == 3)].sort_values("rank")
    assert card == last.expert.tolist()
    # The grid: one row per token, one cell per layer, each the first-choice expert.
    grid = browser.evaluate(
        "[...document.querySelectorAll('#grid tbody tr')].map(r=>[...r.querySelectorAll('td')].map(c=>+c.textContent))"
    )
    pivot = first.pivot(index="position", columns="layer", values="expert")
    assert grid == pivot.to_numpy().tolist()
    _assert_not_blank(browser.screenshot(tmp_path / "route.png"))
    _assert_clean(browser)


def test_balance_report_heatmap_has_one_cell_per_layer_and_expert(
    mixtral_dir: Path, tmp_path: Path, browser: Browser
) -> None:
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(LINES * 3) + "\n", encoding="utf-8")
    page, out = tmp_path / "balance.html", tmp_path / "run"
    result = runner.invoke(
        app,
        ["balance", str(corpus), "-m", str(mixtral_dir), "--device", "cpu", "--lines", "--top-tokens", "3",
         "--min-count", "1", "--out", str(out), "--html", str(page)],
    )
    assert result.exit_code == 0, result.output
    experts = pd.read_csv(out / "experts.csv")
    dom = dump_dom(CHROMIUM, page.resolve().as_uri())
    heat = re.search(r'<table class="heat" id="heatmap".*?</table>', dom, re.S).group(0)
    rows = re.findall(r'<tr data-layer="(\d+)">(.*?)</tr>', heat, re.S)
    assert [int(r[0]) for r in rows] == sorted(experts.layer.unique())
    assert sum(r[1].count("<td") for r in rows) == len(experts)
    browser.open(page)
    _assert_clean(browser)
    cells = browser.evaluate(
        "[...document.querySelectorAll('#heatmap tr[data-layer]')].map(r=>r.querySelectorAll('td').length)"
    )
    assert cells == experts.groupby("layer").size().tolist()
    assert browser.evaluate("document.querySelectorAll('table.tokens').length") == experts.layer.nunique()
    _assert_not_blank(browser.screenshot(tmp_path / "balance.png"))


def test_info_report(tmp_path: Path, browser: Browser) -> None:
    page = tmp_path / "info.html"
    result = runner.invoke(app, ["info", "--html", str(page)])
    assert result.exit_code == 0, result.output
    browser.open(page)
    _assert_clean(browser)
    text = browser.evaluate("document.body.innerText")
    assert "Routing rule" in text and "top-2 chosen" in text and "4,396,160" in text
    _assert_not_blank(browser.screenshot(tmp_path / "info.png"))
    _assert_not_blank(screenshot(CHROMIUM, page.resolve().as_uri(), tmp_path / "info-cli.png"))


def _synthetic_balance(layers: int, experts: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    counts = rng.gamma(2.0, size=(layers, experts)) * 1000
    counts[0, :3] = 0  # dead experts
    share = counts / counts.sum(1, keepdims=True)
    experts_df = pd.DataFrame(
        {"layer": np.repeat(np.arange(layers), experts), "expert": np.tile(np.arange(experts), layers),
         "count": counts.reshape(-1).astype(int), "share": share.reshape(-1), "router": "mlp"}
    )
    layers_df = pd.DataFrame(
        {"layer": np.arange(layers), "router": "mlp", "tokens": 100_000, "experts": experts, "top_k": 8,
         "load_entropy": rng.uniform(0.8, 1, layers), "router_entropy": rng.uniform(0.5, 1, layers),
         "max_over_mean": rng.uniform(1, 4, layers), "dead_experts": (counts == 0).sum(1),
         "drop_rate_cf1": rng.uniform(0, 0.3, layers), "drop_rate_cf2": rng.uniform(0, 0.05, layers)}
    )
    return layers_df, experts_df


def test_large_balance_report_size_and_cells(tmp_path: Path, browser: Browser) -> None:
    """256 experts x 61 layers (DeepSeek-V3's shape): the README states this file size."""
    layers_df, experts_df = _synthetic_balance(61, 256)
    page = write_html(balance_html(layers_df, experts_df, {"model": "synthetic 256x61"}), tmp_path / "big.html")
    size = page.stat().st_size
    assert size < 1_000_000, f"{size} bytes"
    browser.open(page, settle=1.0)
    _assert_clean(browser)
    cells = browser.evaluate("document.querySelectorAll('#heatmap td').length")
    assert cells == 61 * 256
    assert browser.evaluate("document.querySelectorAll('#heatmap td.hd').length") == 3
    # Hover spells out which cell it is (the markup alone carries only the value).
    titles = browser.evaluate(
        "[[0,1],[5,200]].map(([l,e])=>{const c=document.querySelectorAll('#heatmap tr')[l].querySelectorAll('td')[e];"
        "c.dispatchEvent(new MouseEvent('mouseover',{bubbles:true}));return c.title;})"
    )
    share = experts_df.set_index(["layer", "expert"]).share
    assert titles[0] == "layer 0 expert 1: dead (never chosen)"
    assert titles[1] == f"layer 5 expert 200: {share[(5, 200)] * 256:.3g} × uniform"
    print(f"\n256 experts x 61 layers: {size:,} bytes")


def test_compare_report_from_synthetic_frames(tmp_path: Path, browser: Browser) -> None:
    rng = np.random.default_rng(1)
    layers_df = pd.DataFrame(
        {"layer": [0, 1, 2], "tokens": 500, "first_choice_agreement": [0.9, 0.7, 0.95],
         "topk_overlap": [0.92, 0.8, 0.97], "topk_jaccard": [0.88, 0.7, 0.95], "exact_set_agreement": [0.85, 0.6, 0.93],
         "weight_overlap": [0.9, 0.75, 0.96],
         "routing_js": [0.02, 0.08, 0.01], "load_tv": [0.03, 0.1, 0.02], "load_js": [0.01, 0.04, 0.005],
         "margin_changed": [0.05, 0.04, 0.06], "margin_kept": [0.3, 0.25, 0.35]}
    )
    count_a = rng.integers(10, 300, size=(3, 8))
    count_b = count_a + rng.integers(-5, 50, size=(3, 8))
    count_b[1, 2] = 0
    share_a, share_b = count_a / count_a.sum(1, keepdims=True), count_b / count_b.sum(1, keepdims=True)
    experts_df = pd.DataFrame(
        {"layer": np.repeat([0, 1, 2], 8), "expert": np.tile(np.arange(8), 3), "count_a": count_a.reshape(-1),
         "count_b": count_b.reshape(-1), "share_a": share_a.reshape(-1), "share_b": share_b.reshape(-1),
         "share_diff": (share_b - share_a).reshape(-1),
         "log2_ratio": np.log2(np.maximum(share_b, 1e-9) / share_a).reshape(-1)}
    )
    summary = {"next_token_top1_agreement": 0.97, "mean_kl_a_b": 0.012, "kl_support": "top-64 + rest"}
    page = write_html(compare_html(layers_df, experts_df, summary), tmp_path / "compare.html")
    browser.open(page)
    _assert_clean(browser)
    for table_id in ("heatmap-a", "heatmap-b", "heatmap-diff"):
        assert browser.evaluate(f"document.querySelectorAll('#{table_id} td').length") == 24
    assert browser.evaluate("document.querySelectorAll('#heatmap-b td.hd').length") == 1
    text = browser.evaluate("document.body.innerText")
    assert "Lowest first-choice agreement: layer 1" in text and "top-64 + rest" in text
    _assert_not_blank(browser.screenshot(tmp_path / "compare.png"))


# Every y-axis label of every chart: its box, its svg's box, the label and its tooltip (if cut).
_Y_LABELS = """[...document.querySelectorAll('svg text.ytick')].map(function(t){
  var l=t.getBoundingClientRect(), s=t.ownerSVGElement.getBoundingClientRect(), tip=t.querySelector('title');
  var shown=[...t.childNodes].filter(function(n){return n.nodeType===3;}).map(function(n){return n.data;});
  return {text: shown.join(''), tip: tip ? tip.textContent : null, left: l.left, right: l.right,
          svg_left: s.left, svg_right: s.right, width: l.width};})"""


def _assert_y_labels_inside(browser: Browser) -> list[dict]:
    labels = browser.evaluate(_Y_LABELS)
    assert labels
    for label in labels:
        assert label["width"] > 0, label
        assert label["svg_left"] <= label["left"] and label["right"] <= label["svg_right"], label
    return labels


def test_compare_divergence_chart_fits_long_y_labels(tmp_path: Path, browser: Browser) -> None:
    """Small divergences print as long labels (0.000184): each lies inside its svg (caught: the fixed 44 px
    left margin, which clipped them)."""
    layers_df = pd.DataFrame(
        {"layer": [0, 1, 2], "first_choice_agreement": [0.9999, 0.9998, 0.99995],
         "routing_js": [1.23e-05, 0.000184, 2.5e-06], "load_tv": [0.000123, 4.56e-05, 0.000101],
         "load_js": [-1.2e-07, 3.3e-06, 7.7e-07]}
    )
    page = write_html(compare_html(layers_df, pd.DataFrame()), tmp_path / "compare.html")
    browser.open(page)
    _assert_clean(browser)
    labels = _assert_y_labels_inside(browser)
    assert {"0.000184", "-1.2e-07"} <= {label["text"] for label in labels}


def test_line_chart_cuts_labels_past_a_sane_width_with_a_tooltip(tmp_path: Path, browser: Browser) -> None:
    from moe_inspect.render.html.charts import line_chart
    from moe_inspect.render.html.page import document

    chart = line_chart(
        [0, 1, 2], {"rate": [1.0, 25000.0, 123456.0]}, "Throughput", y_format="{:,.0f} tokens per second".format
    )
    page = tmp_path / "chart.html"
    page.write_text(document("chart", chart), encoding="utf-8")
    browser.open(page)
    _assert_clean(browser)
    labels = _assert_y_labels_inside(browser)
    assert [(label["text"], label["tip"]) for label in labels] == [
        ("123,456 tok…", "123,456 tokens per second"), ("1 tokens pe…", "1 tokens per second")
    ]


def test_ablate_report_from_synthetic_frames(tmp_path: Path, browser: Browser) -> None:
    ablation = pd.DataFrame(
        {"setting": ["baseline", "top-k=1", "drop-experts=*:3", "capacity-factor=1.0"], "layers": ["", "*", "*", "*"],
         "loss": [3.0, 3.4, 3.1, 3.05], "perplexity": np.exp([3.0, 3.4, 3.1, 3.05]),
         "delta_loss": [0.0, 0.4, 0.1, 0.05], "rel_delta": [0.0, 0.133, 0.033, 0.0167], "tokens": 1000,
         "drop_rate": [0.0, 0.0, 0.0, 0.12]}
    )
    importance = pd.DataFrame(
        {"layer": np.repeat([0, 1], 4), "expert": np.tile(np.arange(4), 2),
         "delta_loss": [0.3, 0.1, 0.2, 0.05, 0.02, 0.4, 0.1, 0.0], "rank": [1, 3, 2, 4, 3, 1, 2, 4],
         "frequency": 0.25, "mean_weight": 0.5, "output_norm_saliency": 1.0}
    )
    for imp in (importance, None):
        page = write_html(ablate_html(ablation, imp), tmp_path / "ablate.html")
        browser.open(page)
        _assert_clean(browser)
        assert browser.evaluate("document.querySelectorAll('svg rect').length") == 3
        assert browser.evaluate("document.querySelectorAll('#importance td').length") == (8 if imp is not None else 0)


def test_the_harness_sees_requests_and_console_errors(tmp_path: Path, browser: Browser) -> None:
    """The checks above could pass vacuously if the browser hid these events: prove they are seen."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script>'
        "</body></html>",
        encoding="utf-8",
    )
    browser.open(page)
    assert any("127.0.0.1:9/x.png" in u for u in browser.requests())
    assert any("boom" in m for m in browser.console_errors())


def test_reports_read_without_javascript(mixtral_dir: Path, tmp_path: Path, browser: Browser) -> None:
    """Scripts off: the route text is coloured by the first layer, the grid and the heatmap are all there."""
    csv, page = tmp_path / "route.csv", tmp_path / "route.html"
    args = ["route", TEXT, "-m", str(mixtral_dir), "--device", "cpu", "-q", "--csv", str(csv), "--html", str(page)]
    assert runner.invoke(app, args).exit_code == 0
    first = pd.read_csv(csv, keep_default_na=False).query("rank == 0")
    layer0 = first[first.layer == first.layer.min()].sort_values("position").expert
    palette = expert_colours(EXPERTS)
    browser.call("Emulation.setScriptExecutionDisabled", session=True, value=True)
    try:
        browser.open(page)
        card = browser.evaluate(
            "(()=>{document.querySelectorAll('.text .t')[2].focus();"
            "return document.getElementById('card').textContent})()"
        )
        assert card.startswith("Hover or focus")  # the page's script really is off
        colours = browser.evaluate(
            "[...document.querySelectorAll('.text .t')].map(e=>getComputedStyle(e).backgroundColor)"
        )
        assert colours == [_rgb(palette[e]) for e in layer0]
        assert browser.evaluate("document.querySelectorAll('#grid tbody tr').length") == first.position.nunique()
        layers_df, experts_df = _synthetic_balance(3, 8)
        browser.open(write_html(balance_html(layers_df, experts_df), tmp_path / "b.html"))
        assert browser.evaluate("document.querySelectorAll('#heatmap td').length") == 24
        assert browser.evaluate("document.querySelectorAll('svg polyline').length") >= 4
        _assert_clean(browser)
    finally:
        browser.call("Emulation.setScriptExecutionDisabled", session=True, value=False)


def test_compare_and_ablate_write_their_reports_from_the_cli(
    mixtral_dir: Path, tmp_path: Path, browser: Browser
) -> None:
    """`compare --html` and `ablate --html` on a tiny model: the pages hold the very tables the run wrote."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES * 3))
    model = str(mixtral_dir)
    compare = runner.invoke(
        app,
        ["compare", str(corpus), "-m", model, "--against-dtype", "bfloat16", "--seq-len", "16", "-q",
         "--out", str(tmp_path / "cmp"), "--html", str(tmp_path / "compare.html")],
    )
    assert compare.exit_code == 0, compare.output
    layers = pd.read_csv(tmp_path / "cmp" / "compare_layers.csv")
    browser.open(tmp_path / "compare.html")
    _assert_clean(browser)
    for table_id in ("heatmap-a", "heatmap-b", "heatmap-diff"):
        cells = browser.evaluate(f"document.querySelectorAll('#{table_id} td').length")
        assert cells == len(layers) * EXPERTS
    worst = int(layers.sort_values("first_choice_agreement").iloc[0]["layer"])
    assert f"Lowest first-choice agreement: layer {worst}" in browser.evaluate("document.body.innerText")

    ablate = runner.invoke(
        app,
        ["ablate", str(corpus), "-m", model, "--top-k", "1", "--drop-experts", "*:3", "--seq-len", "16", "-q",
         "--out", str(tmp_path / "abl"), "--html", str(tmp_path / "ablate.html")],
    )
    assert ablate.exit_code == 0, ablate.output
    settings = pd.read_csv(tmp_path / "abl" / "ablation.csv", keep_default_na=False)["setting"].tolist()
    assert settings == ["baseline", "top-k=1", "drop-experts=*:3"]
    browser.open(tmp_path / "ablate.html")
    _assert_clean(browser)
    text = browser.evaluate("document.body.innerText")
    assert all(setting in text for setting in settings)
    assert browser.evaluate("document.querySelectorAll('svg rect').length") == len(settings) - 1
