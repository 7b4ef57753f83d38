"""AttentionWidget, PathPatchingWidget, DCMWidget, CMAPWidget and CircuitExplorer in a real
JupyterLab, driven by headless Chromium, on tiny random models.

Screenshots go to test-output/ui/. Timings (click -> kernel, grid rebuilds) are printed, not
asserted: run with `-s` to see them.
"""

from __future__ import annotations

import re
import statistics
import time
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.ui

NOTEBOOK = "widgets.ipynb"
EVIL = "<script>alert(1)</script>"

CELLS = [
    # 0: models and tasks (tiny, random weights); the prompt carries markup that must stay text
    f"""\
import json, math, time
import torch
torch.set_num_threads(1)
import ipywidgets as ipw
from IPython.display import display
import circuit_widgets as cw
from circuit_widgets.tasks import Task, desiderata
from circuit_widgets.types import Circuit
from circuit_widgets.widgets import AttentionWidget, PathPatchingWidget, CircuitExplorer, HeadGridWidget

model = cw.tiny_model("llama", n_layers=4, n_heads=8, n_kv_heads=2, d_model=64, seed=0)
finetuned = cw.tiny_model("llama", n_layers=4, n_heads=8, n_kv_heads=2, d_model=64, seed=1)
task = cw.tasks.ioi(model, n=8, seed=0)
EVIL = {EVIL!r}
evil = Task.from_pairs(model, ["When Mary and John went to " + EVIL + " the store, John gave a drink to"],
                       ["When Anna and John went to " + EVIL + " the store, John gave a drink to"],
                       [" Mary"], [" John"])
des = desiderata(model, 12, seed=0, n_boxes=3)["positional"]""",
    # 1: two attention widgets: the renderer must load once for the whole page
    """\
att = AttentionWidget(model, evil, ["1.2", "3.5", "0.0"], title="Attention " + EVIL)
display(att)""",
    """\
att2 = AttentionWidget(model, task, ["2.1"], example=1)
att2""",
    # 3: path patching; a kernel-side observer reports what the kernel sees
    """\
pp = PathPatchingWidget(model, task, title="Path patching (tiny Llama, GQA)")
seen = ipw.Label("kernel saw: (nothing yet)")
pp.grid.observe(lambda change: setattr(seen, "value", f"kernel saw: {pp.circuit}"), names="selected")
display(pp, seen)""",
    # 4: a long run to cancel: a bigger (still random) model, exact values only
    """\
big = cw.tiny_model("gpt2", n_layers=24, n_heads=8, d_model=256, seed=0)
big_task = cw.tasks.ioi(big, n=96, seed=0)
slow = PathPatchingWidget(big, big_task, title="A long run: exact values replace the preview layer by layer")
slow""",
    # 5: the explorer: path patching, attention, DCM and CMAP around one circuit
    """\
ex = CircuitExplorer(model, task, desideratum=des, dcm_position="query_label", dcm_lams=[0.01, 0.3],
                     finetuned=finetuned, title="Explorer")
ex""",
    # 6: asked while a run is going
    'print("KERNEL_ANSWER", 6 * 7, slow.status)',
    # 7: what the kernel holds
    """\
print("KERNEL_STATE=" + json.dumps({
    "pp_selected": pp.grid.selected, "pp_finite": int(pp.grid.values.size - torch.isnan(torch.tensor(pp.grid.values)).sum()),
    "pp_status": pp.status, "slow_status": slow.status,
    "slow_rows": int((torch.tensor(slow.grid.pending) == 0).all(1).sum()) if slow.grid.pending is not None else -1,
    "slow_pending": int(slow.grid.pending.sum()) if slow.grid.pending is not None else -1,
    "ex_circuit": str(ex.circuit), "dcm_done": ex.dcm.n_done, "cmap_rows": ex.cmap.bar_labels}))""",
    # 8: one finite value and a threshold above it: the sliders' knobs must agree with their labels
    """\
few = HeadGridWidget(torch.tensor([[0.5, math.nan], [math.nan, math.nan]]), threshold=3.0, title="One value")
few""",
    # 9: a grouped circuit for the explorer; Run All leaves it alone, the explorer test runs it again
    """\
STEP = globals().get("STEP", -1) + 1
if STEP:
    ex.circuit = Circuit.from_groups({"movers": ["1.3"], "inhibit": ["3.0", "2.4"]}, positions={"movers": "END"})
print("GROUPED", STEP, ex.circuit)""",
    # 10: a CMAP widget whose per-head grid pauses after 12 heads (one head per pass) until the
    # test releases it: the browser sees the grid half filled, deterministically
    """\
import threading
import circuit_widgets.core.cross_model as cmap_module
from circuit_widgets.widgets import CMAPWidget
cm_gate, cm_shown, cm_real = threading.Event(), [], cmap_module.cmap_grid
def cm_paused_grid(*args, on_partial=None, **kwargs):
    def show(grid):
        on_partial(grid)
        cm_shown.append(int(grid.done.sum()))
        if len(cm_shown) == 12:
            cm_gate.wait(300)
    return cm_real(*args, on_partial=show, **{**kwargs, "batch_size": 1})
class GatedCMAP(CMAPWidget):  # only this widget's runs pause: the explorer's CMAP must not
    def _work(self, *args, **kwargs):
        cmap_module.cmap_grid = cm_paused_grid
        try:
            return super()._work(*args, **kwargs)
        finally:
            cmap_module.cmap_grid = cm_real
cm = GatedCMAP(model, finetuned, task, ["1.3", "3.0"], title="CMAP: each head patched alone")
cm""",
    # 11: release the paused CMAP grid (Run All, before any run, leaves the gate shut)
    """\
if cm_shown:
    cm_gate.set()
print("RELEASED" if cm_gate.is_set() else "GATE SHUT", cm_shown)""",
]
STATE_CELL = 7
GROUPED_CELL = 9
CMAP_CELL = 10


def run_cell(page, panel, index: int) -> None:
    cell = panel.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")


def kernel_state(page, panel) -> dict:
    import json

    from playwright.sync_api import expect

    out = panel.locator(".jp-Notebook .jp-Cell").nth(STATE_CELL).locator(".jp-OutputArea-output")
    before = out.inner_text() if out.count() else ""
    run_cell(page, panel, STATE_CELL)
    expect(out).to_contain_text("KERNEL_STATE=")
    deadline = time.monotonic() + 20
    while out.inner_text() == before and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    return json.loads(out.inner_text().split("KERNEL_STATE=", 1)[1])


@pytest.fixture(scope="module")
def lab(jupyter_lab, browser, output_dir, open_notebook, write_notebook):
    from playwright.sync_api import expect

    base, root = jupyter_lab
    write_notebook(root / NOTEBOOK, CELLS)
    t0 = time.monotonic()
    page, console, dialogs = open_notebook(browser, base, NOTEBOOK, viewport=(1280, 1300))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    try:
        panel = page.locator(".jp-NotebookPanel")
        expect(panel.locator(".cw-ex")).to_have_count(1, timeout=120_000)
        state_cell = panel.locator(".jp-Notebook .jp-Cell").nth(STATE_CELL)
        expect(state_cell.locator(".jp-OutputArea-output")).to_contain_text(
            "KERNEL_STATE=", timeout=60_000
        )
        expect(
            panel.locator(".jp-Notebook .jp-Cell")
            .nth(GROUPED_CELL)
            .locator(".jp-OutputArea-output")
        ).to_contain_text("GROUPED 0")
        print(f"\n[ui] notebook open + Run All + widgets rendered: {time.monotonic() - t0:.1f} s")
        yield page, panel, console, dialogs, requests
    except Exception:
        page.screenshot(path=str(output_dir / "widgets_failure.png"), full_page=True)
        raise
    finally:
        errors = [c for c in console if c.startswith(("pageerror", "console.error"))]
        print(
            f"[ui] browser console: {len(console)} messages, {len(errors)} errors",
            *errors[:20],
            sep="\n  ",
        )
        page.close()


def test_attention_draws_offline_once_per_page_and_tokens_are_text(lab, output_dir):
    from playwright.sync_api import expect

    page, panel, console, dialogs, requests = lab
    att = panel.locator(".jp-Cell").nth(1).locator(".cw-att")
    expect(att).to_have_count(1)
    # circuitsvis drew: its head selector and a painted canvas
    expect(att.locator(".cw-att-cv")).to_contain_text("Head Selector", timeout=30_000)
    expect(att.locator(".cw-att-cv canvas").first).to_be_visible()
    painted = att.locator(".cw-att-cv canvas").first.evaluate(
        """(c) => { const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    assert painted > 200, f"the attention canvas is (nearly) blank: {painted} painted pixels"
    # per-query-head patterns, GQA labels say which kv head is shared
    expect(att.locator(".cw-att-chip")).to_have_text(
        [
            "L0H0 (kv 0, shared by q0-3)",
            "L1H2 (kv 0, shared by q0-3)",
            "L3H5 (kv 1, shared by q4-7)",
        ]
    )
    expect(att.locator(".cw-att-title")).to_have_text("Attention " + EVIL)
    # the prompt's markup is text: the tiny tokenizer turns it into '<unk>', '<', '>' pieces
    # textContent: innerText is empty for cells JupyterLab skips drawing (content-visibility)
    att.scroll_into_view_if_needed()
    tokens = att.locator(".cw-att-token").all_text_contents()
    assert "<unk>" in tokens and ">" in tokens, tokens
    assert att.locator("script, unk, img").count() == 0
    # the renderer was fetched from the kernel and evaluated exactly once for all views
    expect(panel.locator(".cw-att .cw-att-cv").filter(has_text="Head Selector")).to_have_count(
        2, timeout=30_000
    )
    loads = page.evaluate(
        "window.__circuitWidgetsCircuitsVis && window.__circuitWidgetsCircuitsVis.loads"
    )
    assert loads == 1
    assert page.locator("script#circuit-widgets-circuitsvis").count() == 1
    # no request left localhost (blob: URLs are the page's own memory)
    outside = [
        u
        for u in requests
        if urlparse(u).scheme not in ("blob", "data")
        and urlparse(u).hostname not in ("127.0.0.1", "localhost")
    ]
    assert not outside, outside
    att.scroll_into_view_if_needed()
    att.screenshot(path=str(output_dir / "attention.png"))
    # nothing of circuitsvis' layout (its rows have negative margins) sticks out left of the widget
    overhang = att.evaluate("""(root) => { const l = root.getBoundingClientRect().left;
        return Math.min(...[...root.querySelectorAll('.cw-att-cv *')].map(e => e.getBoundingClientRect().left - l)); }""")
    assert overhang >= 0, (
        f"the attention view starts {-overhang:.0f} px left of the widget, where it is clipped"
    )

    # the example slider recomputes in the kernel and redraws
    att2 = panel.locator(".jp-Cell").nth(2).locator(".cw-att")
    expect(att2.locator(".cw-att-subtitle")).to_contain_text("example 2 of 8")
    first_tokens = att2.locator(".cw-att-token").all_inner_texts()
    slider = att2.locator(".cw-att-example")
    slider.evaluate(
        "(s) => { s.value = '4'; s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change')); }"
    )
    expect(att2.locator(".cw-att-subtitle")).to_contain_text("example 5 of 8")
    assert att2.locator(".cw-att-token").all_inner_texts() != first_tokens
    att2.locator(".cw-att-prompt").select_option("corrupt")
    expect(att2.locator(".cw-att-subtitle")).to_contain_text("corrupt prompt")
    page.wait_for_timeout(200)
    assert dialogs == [], f"markup ran: {dialogs}"
    assert not [c for c in console if c.startswith("pageerror")]


def test_path_patching_runs_selects_and_shows_attention(lab, output_dir):
    from playwright.sync_api import expect

    page, panel, console, _, _ = lab
    pp = panel.locator(".jp-Cell").nth(3).locator(".cw-pp")
    grid = pp.locator(".cw-hg")
    expect(grid.locator("rect.cw-cell")).to_have_count(32)
    expect(grid.locator("rect.cw-nan")).to_have_count(32)  # nothing computed yet
    expect(pp.locator(".cw-pp-position")).to_have_value("END")
    # nothing computed: the top-k knob sits at the right end, under its label "all"
    knob = grid.locator(".cw-hg-topk-input").evaluate(
        "(s) => [Number(s.min), Number(s.max), Number(s.value)]"
    )
    assert knob[2] == knob[1] > knob[0], knob
    expect(grid.locator(".cw-hg-topk output")).to_have_text("all")
    builds0 = int(grid.get_attribute("data-builds"))
    pp.locator(".cw-run").click()
    expect(pp.locator(".cw-pp-note")).to_contain_text("senders → logits")
    expect(grid.locator("rect.cw-nan")).to_have_count(0, timeout=60_000)
    expect(grid.locator("rect.cw-preview")).to_have_count(
        0
    )  # every preview replaced by an exact value
    expect(grid.locator(".cw-hg-subtitle")).to_have_text("path patching → logits · z @ END")
    builds = int(grid.get_attribute("data-builds")) - builds0
    build_ms = float(grid.get_attribute("data-build-ms"))
    state = kernel_state(page, panel)
    assert state["pp_finite"] == 32 and state["pp_status"] == "done"
    pp.scroll_into_view_if_needed()
    pp.screenshot(path=str(output_dir / "path_patching_done.png"))
    # hover on a grouped-query model: which key/value head the query head shares
    grid.locator('rect.cw-cell[data-layer="3"][data-head="5"]').hover()
    expect(grid.locator(".cw-tt-kv")).to_have_text("kv 1, shared by q4-7")
    expect(grid.locator(".cw-tt-head")).to_have_text("3.5")
    page.mouse.move(0, 0)

    # click a head, shift-click another: the kernel sees the Circuit; attention shows them
    seen = panel.locator(".widget-label").filter(has_text="kernel saw")
    page.evaluate(
        """([root, label]) => {
             window.__cwPP = { clicks: [], labels: [] };
             root.addEventListener("click", () => window.__cwPP.clicks.push(performance.now()), true);
             new MutationObserver(() => window.__cwPP.labels.push([performance.now(), label.textContent]))
               .observe(label, { subtree: true, childList: true, characterData: true });
           }""",
        [grid.element_handle(), seen.element_handle()],
    )
    grid.locator('rect.cw-cell[data-layer="3"][data-head="5"]').click()
    expect(seen).to_have_text("kernel saw: Circuit(heads@all: 3.5)")
    grid.locator('rect.cw-cell[data-layer="2"][data-head="1"]').click(modifiers=["Shift"])
    expect(seen).to_have_text("kernel saw: Circuit(heads@all: 2.1, 3.5)")
    att = pp.locator(".cw-att")
    expect(att.locator(".cw-att-chip")).to_have_text(
        ["L2H1 (kv 0, shared by q0-3)", "L3H5 (kv 1, shared by q4-7)"]
    )
    expect(att.locator(".cw-att-cv")).to_contain_text("Head Selector", timeout=30_000)
    timing = page.evaluate("window.__cwPP")
    round_trips = [
        next(t for t, text in timing["labels"] if t > click and text.count(".") == n) - click
        for click, n in zip(timing["clicks"], (1, 2))
    ]

    # receivers = the selected heads' values: senders only below layer 2
    pp.locator(".cw-pp-receivers").select_option("selected")
    pp.locator(".cw-pp-input").select_option("v")
    pp.locator(".cw-run").click()
    expect(pp.locator(".cw-pp-note")).to_contain_text("senders → 2.1.v, 3.5.v")
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text(
        "path patching → 2.1.v, 3.5.v", timeout=60_000
    )
    expect(grid.locator("rect.cw-cell:not(.cw-nan)")).to_have_count(16)  # layers 0-1 only
    expect(grid.locator("rect.cw-cell[aria-selected=true]")).to_have_count(2)
    # no estimate of a receiver-head path exists: the status line says so, no cell is a preview
    expect(pp.locator(":scope > .cw-status")).to_contain_text(
        "no preview for receiver heads: exact values only"
    )
    expect(grid.locator("rect.cw-preview")).to_have_count(0)
    pp.scroll_into_view_if_needed()
    pp.screenshot(path=str(output_dir / "path_patching_receivers.png"))

    # an impossible request is reported inside the widget
    grid.locator('rect.cw-cell[data-layer="0"][data-head="0"]').click()
    pp.locator(".cw-run").click()
    expect(pp.locator(":scope > .cw-status")).to_contain_text("layer 0 have no earlier heads")
    expect(pp.locator(":scope > .cw-status")).not_to_contain_text(
        "no preview"
    )  # the old run's note is gone
    pp.locator(":scope > .cw-status").screenshot(path=str(output_dir / "path_patching_error.png"))
    print(
        f"[ui] path patching: {builds} grid rebuilds during the run (preview + exact layers), last "
        f"rebuild {build_ms:.1f} ms"
    )
    print(
        f"[ui] path-patching grid click -> kernel observer -> label back: "
        f"{', '.join(f'{t:.0f} ms' for t in round_trips)}"
    )
    assert not [c for c in console if c.startswith("pageerror")]


def test_cancel_stops_a_long_run_and_the_kernel_answers_meanwhile(lab, output_dir):
    from playwright.sync_api import expect

    page, panel, console, _, _ = lab
    slow = panel.locator(".jp-Cell").nth(4).locator(".cw-pp")
    grid = slow.locator(".cw-hg")
    expect(grid.locator("rect.cw-cell")).to_have_count(24 * 8)
    slow.locator(".cw-run").click()
    expect(slow.locator(":scope > .cw-status")).to_contain_text("running")
    # the attribution preview first (every cell dashed), then exact layers replace it
    expect(grid.locator("rect.cw-preview")).to_have_count(24 * 8, timeout=60_000)
    slow.scroll_into_view_if_needed()
    slow.screenshot(path=str(output_dir / "path_patching_preview.png"))
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text(
        re.compile(r"exact: [1-9]\d* of 192 heads"), timeout=60_000
    )
    # the kernel answers a cell while the run goes on
    t0 = time.monotonic()
    run_cell(page, panel, 6)
    out = panel.locator(".jp-Notebook .jp-Cell").nth(6).locator(".jp-OutputArea-output")
    expect(out).to_have_text("KERNEL_ANSWER 42 running")
    answer_s = time.monotonic() - t0
    exact_rows = 24 - grid.locator("rect.cw-preview").count() // 8
    slow.locator(".cw-cancel").click()
    expect(slow.locator(":scope > .cw-status")).to_contain_text(
        "cancelled (partial result shown)", timeout=30_000
    )
    state = kernel_state(page, panel)
    assert state["slow_status"] == "cancelled"
    assert 0 < state["slow_rows"] < 24
    assert (
        state["slow_rows"] <= exact_rows + 2
    )  # stopped within one batch (one sender layer) of the click
    # partial results stay on screen: exact rows, the rest still the preview (none blank)
    expect(grid.locator("rect.cw-preview")).to_have_count(state["slow_pending"])
    expect(grid.locator("rect.cw-nan")).to_have_count(0)
    slow.scroll_into_view_if_needed()
    slow.screenshot(path=str(output_dir / "path_patching_cancelled.png"))
    print(
        f"[ui] long run: the kernel answered a cell in {answer_s:.2f} s while running; cancelled after "
        f"{state['slow_rows']} of 24 layers ({exact_rows} shown at the click)"
    )
    assert not [c for c in console if c.startswith("pageerror")]


def test_explorer_tabs_share_the_circuit_and_run_dcm_and_cmap(lab, output_dir):
    from playwright.sync_api import expect

    page, panel, console, _, _ = lab
    ex = panel.locator(".cw-ex")
    expect(ex.locator(".cw-ex-tab")).to_have_text(["Path patching", "Attention", "DCM", "CMAP"])
    panes = ex.locator(".cw-ex-pane")
    # select on the path-patching tab: the explorer, the DCM grid and CMAP see it
    pp_grid = panes.nth(0).locator(".cw-hg")
    pp_grid.locator('rect.cw-cell[data-layer="1"][data-head="3"]').click()
    pp_grid.locator('rect.cw-cell[data-layer="3"][data-head="0"]').click(modifiers=["Shift"])
    expect(ex.locator(".cw-ex-circuit")).to_have_text("circuit (shared by every tab): 1.3, 3.0")
    ex.scroll_into_view_if_needed()
    ex.screenshot(path=str(output_dir / "explorer_path_patching.png"))

    ex.locator(".cw-ex-tab").nth(1).click()
    expect(panes.nth(1)).to_be_visible()
    expect(panes.nth(0)).to_be_hidden()
    expect(panes.nth(1).locator(".cw-att-chip")).to_have_count(2)
    expect(panes.nth(1).locator(".cw-att-cv")).to_contain_text("Head Selector", timeout=30_000)
    # drawn while its tab was hidden: the zoomed pattern must size itself once the tab is shown
    page.wait_for_function(
        "(el) => Math.max(...[...el.querySelectorAll('canvas')].map(c => c.getBoundingClientRect().height)) > 150",
        arg=panes.nth(1).element_handle(),
        timeout=10_000,
    )
    ex.screenshot(path=str(output_dir / "explorer_attention.png"))

    ex.locator(".cw-ex-tab").nth(2).click()
    dcm = panes.nth(2).locator(".cw-dcm")
    expect(dcm.locator("rect.cw-cell[aria-selected=true]")).to_have_count(2)  # the shared circuit
    dcm.locator(".cw-run").click()
    expect(dcm.locator(".cw-dcm-summary")).to_contain_text("heads selected", timeout=60_000)
    expect(dcm.locator(":scope > .cw-status")).to_be_hidden(timeout=60_000)  # done
    expect(dcm.locator(".cw-dcm-lambda-out")).to_contain_text("of 2 trained")
    d = dcm.locator("path.cw-chart-line").get_attribute("d")
    assert d and d.startswith("M") and "L" in d, d
    dcm.locator(".cw-dcm-lambda").evaluate(
        "(s) => { s.value = '0'; s.dispatchEvent(new Event('input')); }"
    )
    expect(dcm.locator(".cw-dcm-lambda-out")).to_have_text("λ = 0.01 · 2 of 2 trained")
    ticks = dcm.locator(".cw-chart-ytick").all_text_contents()
    assert len(ticks) == 2 and ticks[0] != ticks[1], f"the loss axis' ends read the same: {ticks}"
    inside = dcm.locator(
        ".cw-line-chart"
    ).evaluate("""(svg) => { const l = svg.getBoundingClientRect().left;
        return Math.min(...[...svg.querySelectorAll('.cw-chart-ytick')].map(t => t.getBoundingClientRect().left - l)); }""")
    assert inside >= 0, f"a loss tick label is cut off at the chart's left edge ({inside:.0f} px)"
    expect(dcm.locator(".cw-hg-subtitle")).to_contain_text("λ = 0.01")  # the kernel sent that mask
    ex.screenshot(path=str(output_dir / "explorer_dcm.png"))

    ex.locator(".cw-ex-tab").nth(3).click()
    cm = panes.nth(3).locator(".cw-cmap")
    # CMAP patches the shared circuit as one group
    expect(cm.locator(".cw-cmap-toggle")).to_have_count(1)
    cm.locator(".cw-run").click()
    expect(cm.locator("rect.cw-bar")).to_have_count(
        3, timeout=60_000
    )  # one group x (base, patched, ft)
    expect(cm.locator(".cw-bar-label")).to_have_text(["heads"])
    # a bar of 0 is drawn (a thin bar on the baseline) so that 0 does not look like "missing"
    bars = cm.locator("rect.cw-bar").evaluate_all(
        "ns => ns.map(n => [Number(n.getAttribute('data-value')), Number(n.getAttribute('height')), n.classList.contains('cw-bar-zero')])"
    )
    assert all(h >= 2 for _, h, _ in bars) and all(zero == (v <= 0) for v, _, zero in bars), bars
    if all(v == 0 for v, _, _ in bars):
        expect(cm.locator(".cw-bar-note")).to_have_text("all values are 0 (computed, not missing)")
    expect(cm.locator(".cw-hg rect.cw-nan")).to_have_count(0, timeout=60_000)
    expect(cm.locator(".cw-hg rect.cw-cell[aria-selected=true]")).to_have_count(2)
    state = kernel_state(page, panel)
    assert state["cmap_rows"] == ["heads"] and state["dcm_done"] == 2
    ex.screenshot(path=str(output_dir / "explorer_cmap.png"))
    # with every group switched off, Run explains itself inside the widget
    cm.locator(".cw-cmap-toggle").uncheck()
    cm.locator(".cw-run").click()
    expect(cm.locator(":scope > .cw-status")).to_contain_text("no circuit group is enabled")
    assert state["ex_circuit"] == "Circuit(heads@all: 1.3, 3.0)"

    # a grouped circuit: its groups reach every tab, survive clicks, and name themselves on hover
    run_cell(page, panel, GROUPED_CELL)
    expect(
        panel.locator(".jp-Notebook .jp-Cell").nth(GROUPED_CELL).locator(".jp-OutputArea-output")
    ).to_contain_text("GROUPED 1")
    expect(ex.locator(".cw-ex-circuit")).to_have_text(
        "circuit (shared by every tab): movers@END: 1.3 · inhibit@all: 2.4, 3.0"
    )
    expect(cm.locator(".cw-cmap-toggle")).to_have_count(2)
    cm.locator('.cw-cmap-toggle[data-group="inhibit"]').uncheck()
    ex.locator(".cw-ex-tab").nth(0).click()
    pp_grid.locator('rect.cw-cell[data-layer="0"][data-head="1"]').click(modifiers=["Shift"])
    expect(ex.locator(".cw-ex-circuit")).to_have_text(
        "circuit (shared by every tab): movers@END: 1.3 · inhibit@all: 2.4, 3.0 · heads@all: 0.1"
    )
    pp_grid.locator('rect.cw-cell[data-layer="1"][data-head="3"]').hover()
    expect(pp_grid.locator(".cw-tt-group")).to_have_text("group movers @ END")
    expect(pp_grid.locator(".cw-tt-kv")).to_have_text("kv 0, shared by q0-3")
    page.screenshot(path=str(output_dir / "explorer_group_hover.png"))
    page.mouse.move(0, 0)
    ex.locator(".cw-ex-tab").nth(3).click()
    expect(cm.locator(".cw-cmap-toggle")).to_have_count(3)
    checked = cm.locator(".cw-cmap-toggle").evaluate_all(
        "ns => ns.map(n => [n.dataset.group, n.checked])"
    )
    assert checked == [["movers", True], ["inhibit", False], ["heads", True]], (
        checked
    )  # toggles kept
    ex.screenshot(path=str(output_dir / "explorer_cmap_groups.png"))
    assert not [c for c in console if c.startswith("pageerror")]
    errors = [c for c in console if c.startswith("console.error")]
    print(
        f"[ui] explorer: console errors {len(errors)}; grid build times are per widget in data-build-ms"
    )
    _ = statistics  # timings above are printed per test


def test_slider_knobs_agree_with_their_labels(lab, output_dir):
    from playwright.sync_api import expect

    _, panel, _, _, _ = lab
    few = panel.locator(".jp-Cell").nth(8).locator(".cw-hg")
    expect(few.locator("rect.cw-cell")).to_have_count(4)
    top = few.locator(".cw-hg-topk-input").evaluate(
        "(s) => [Number(s.min), Number(s.max), Number(s.value)]"
    )
    assert top[2] == top[1] > top[0], f"top-k knob not at the 'all' end: {top}"
    expect(few.locator(".cw-hg-topk output")).to_have_text("all")
    thr = few.locator(".cw-hg-threshold-input").evaluate(
        "(s) => [Number(s.min), Number(s.max), Number(s.value)]"
    )
    assert thr[2] == thr[1] == 3.0, f"threshold knob does not show the threshold 3: {thr}"
    expect(few.locator(".cw-hg-threshold output")).to_have_text("3")
    expect(few.locator("rect.cw-cell.cw-dim")).to_have_count(
        1
    )  # the one value is below the threshold
    few.scroll_into_view_if_needed()
    few.screenshot(path=str(output_dir / "head_grid_sliders_few.png"))


def test_cmap_grid_fills_progressively(lab, output_dir):
    """The CMAP grid shows heads as they finish, its subtitle says what runs; the kernel holds
    the run after 12 of 32 heads until the test lets it go on."""
    from playwright.sync_api import expect

    page, panel, console, _, _ = lab
    cell = panel.locator(".jp-Cell").nth(CMAP_CELL)
    cell.scroll_into_view_if_needed()
    cm = cell.locator(".cw-cmap")
    grid = cm.locator(".cw-hg")
    try:
        expect(grid.locator("rect.cw-cell")).to_have_count(32)
    except AssertionError:
        page.screenshot(path=str(output_dir / "cmap_failure.png"), full_page=True)
        print("CELL OUTPUT:", cell.inner_text()[-3000:])
        raise
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text("not run yet")
    cm.locator(".cw-run").click()
    # paused mid-run: 12 heads computed, 20 still empty, and the subtitle says what is running
    expect(grid.locator("rect.cw-nan")).to_have_count(20, timeout=120_000)
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text("running: each head patched alone")
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text("partial: 12 of 32 heads computed")
    expect(cm.locator("rect.cw-bar")).to_have_count(3)  # the group's bars came first
    cm.scroll_into_view_if_needed()
    cm.screenshot(path=str(output_dir / "cmap_mid_run.png"))
    run_cell(page, panel, CMAP_CELL + 1)
    expect(grid.locator("rect.cw-nan")).to_have_count(0, timeout=120_000)
    expect(grid.locator(".cw-hg-subtitle")).to_have_text("cmap · z @ END")
    cm.screenshot(path=str(output_dir / "cmap_done.png"))
    assert not [c for c in console if c.startswith("pageerror")]
