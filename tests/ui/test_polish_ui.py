"""Issue 15's widget polish in a real JupyterLab, driven by headless Chromium: tooltips on the
bottom rows, no layout jump when a run starts, the DCM grid's scale and selection line, what the
grids' titles and subtitles say. Screenshots of the fixed states go to test-output/ui/polish_*.png.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ui

NOTEBOOK = "polish.ipynb"

CELLS = [
    # 0: tiny random models and tasks
    """\
import json, math
import torch
torch.set_num_threads(1)
import circuit_widgets as cw
from circuit_widgets.tasks import desiderata
from circuit_widgets.widgets import DCMWidget, HeadGridWidget, PathPatchingWidget

model = cw.tiny_model("llama", n_layers=4, n_heads=8, n_kv_heads=2, d_model=64, seed=0)
task = cw.tasks.ioi(model, n=8, seed=0)
des = desiderata(model, 12, seed=0, n_boxes=3)["positional"]""",
    # 1: the demo's shape, 30 layers x 9 heads, its strongest heads in the bottom rows
    """\
values = 0.1 * torch.randn(30, 9, generator=torch.Generator().manual_seed(0))
values[27, 4], values[29, 8] = 2.0, -1.5
HeadGridWidget(values, title="30 layers x 9 heads: hover the bottom rows")""",
    # 2: a run long enough to see the progress line appear
    """\
big = cw.tiny_model("gpt2", n_layers=16, n_heads=8, d_model=128, seed=0)
big_task = cw.tasks.ioi(big, n=64, seed=0)
slow = PathPatchingWidget(big, big_task, title="A run to watch: nothing below the controls moves")
slow""",
    # 3: DCM trained in the kernel, a long selection on its grid
    """\
dcm = DCMWidget(model, des, position="query_label", lams=[0.01, 0.3], title="DCM")
dcm.train(); dcm.wait(120)
dcm.grid.selected = [[l, h] for l in range(4) for h in range(8) if (l + h) % 2 == 0]
dcm""",
    # 4: an activation-patching grid as the README shows it
    """\
HeadGridWidget(cw.activation_patch(model, task, component="z", positions="END"))""",
    # 5: path patching into a layer-2 head, cancelled after the first sender layer: 8 of 16 senders
    """\
pp = PathPatchingWidget(model, task, position="END", title="Path patching into 2.1, cancelled")
pp.grid.selected = [[2, 1]]
pp.receivers = "selected"
pp.grid.observe(lambda c: pp.cancel(), names="values")
pp.run(); pp.wait(60)
pp""",
    # 6: path patching to the logits at S2
    """\
zero = PathPatchingWidget(model, task, position="S2", preview=False, title="Path patching at S2 → logits")
zero.run(); zero.wait(60)
zero""",
    'print("POLISH_READY", dcm.status, pp.status, zero.status)',
]


@pytest.fixture(scope="module")
def lab(jupyter_lab, browser, output_dir, open_notebook, write_notebook):
    from playwright.sync_api import expect

    base, root = jupyter_lab
    write_notebook(root / NOTEBOOK, CELLS)
    t0 = time.monotonic()
    page, console, _dialogs = open_notebook(browser, base, NOTEBOOK, viewport=(1280, 1300))
    try:
        panel = page.locator(".jp-NotebookPanel")
        last = panel.locator(".jp-Notebook .jp-Cell").last
        expect(last.locator(".jp-OutputArea-output")).to_have_text(
            "POLISH_READY done cancelled done", timeout=180_000
        )
        print(f"\n[ui] polish notebook open + Run All: {time.monotonic() - t0:.1f} s")
        yield page, panel, console
    except Exception:
        page.screenshot(path=str(output_dir / "polish_failure.png"), full_page=True)
        raise
    finally:
        errors = [c for c in console if c.startswith(("pageerror", "console.error"))]
        print(
            f"[ui] browser console: {len(console)} messages, {len(errors)} errors",
            *errors[:20],
            sep="\n  ",
        )
        page.close()


def cell(panel, i):
    return panel.locator(".jp-Notebook .jp-Cell").nth(i)


def test_tooltips_on_the_bottom_rows_stay_in_view(lab, output_dir):
    from playwright.sync_api import expect

    page, panel, _ = lab
    widget = cell(panel, 1).locator(".cw-hg")
    figure = widget.locator(".cw-hg-figure")
    widget.scroll_into_view_if_needed()
    for layer, head in [(29, 8), (27, 4), (29, 0)]:
        widget.locator(f'rect.cw-cell[data-layer="{layer}"][data-head="{head}"]').hover()
        tooltip = widget.locator(".cw-hg-tooltip")
        expect(tooltip.locator(".cw-tt-head")).to_have_text(f"{layer}.{head}")
        tip, box = tooltip.bounding_box(), figure.bounding_box()
        # the figure clips what sticks out of it: the whole tooltip must be inside
        assert (
            box["y"] <= tip["y"] and tip["y"] + tip["height"] <= box["y"] + box["height"] + 0.5
        ), (tip, box)
        assert box["x"] <= tip["x"] and tip["x"] + tip["width"] <= box["x"] + box["width"] + 0.5, (
            tip,
            box,
        )
    page.screenshot(path=str(output_dir / "polish_tooltip_bottom_row.png"), clip=_around(box, tip))


def _around(box, tip):
    x0, y0 = min(box["x"], tip["x"]) - 10, min(box["y"] + box["height"] - 300, tip["y"]) - 10
    x1 = max(box["x"] + box["width"], tip["x"] + tip["width"]) + 10
    y1 = max(box["y"] + box["height"], tip["y"] + tip["height"]) + 10
    return {"x": max(0, x0), "y": max(0, y0), "width": x1 - max(0, x0), "height": y1 - max(0, y0)}


def test_the_layout_does_not_jump_when_a_run_starts(lab, output_dir):
    from playwright.sync_api import expect

    _page, panel, _ = lab
    slow = cell(panel, 2).locator(".cw-pp")
    slow.scroll_into_view_if_needed()
    figure = slow.locator(".cw-hg-figure")
    before = figure.bounding_box()
    slow.locator(".cw-run").click()
    expect(slow.locator(":scope > .cw-status")).to_contain_text("running")
    during = figure.bounding_box()
    slow.screenshot(path=str(output_dir / "polish_running_no_jump.png"))
    slow.locator(".cw-cancel").click()
    expect(slow.locator(":scope > .cw-status")).to_contain_text("cancelled", timeout=60_000)
    after = figure.bounding_box()
    assert during["y"] == before["y"] == after["y"], (before, during, after)


def test_dcm_mask_scale_and_selection_line(lab, output_dir):
    from playwright.sync_api import expect

    _page, panel, _ = lab
    dcm = cell(panel, 3).locator(".cw-dcm")
    dcm.scroll_into_view_if_needed()
    grid = dcm.locator(".cw-hg")
    # 1 - mask lies in [0, 1]: a white-red scale starting at 0, no blue half
    ticks = grid.locator(".cw-hg-tick").all_text_contents()
    assert ticks[0] == "0" and not any(t.startswith("-") for t in ticks), ticks
    expect(grid.locator(".cw-hg-subtitle")).to_contain_text("@ query_label")
    sel, save = grid.locator(".cw-hg-selection"), grid.locator(".cw-hg-export")
    a, b = sel.bounding_box(), save.bounding_box()
    text = grid.locator(".cw-hg-selection-text").bounding_box()
    overlap_x = min(text["x"] + text["width"], b["x"] + b["width"]) - max(text["x"], b["x"])
    overlap_y = min(text["y"] + text["height"], b["y"] + b["height"]) - max(text["y"], b["y"])
    assert overlap_x <= 0 or overlap_y <= 0, (a, text, b)  # the list never runs under "save"
    assert text["x"] + text["width"] <= a["x"] + a["width"] + 0.5
    dcm.screenshot(path=str(output_dir / "polish_dcm_sequential_selection.png"))


def test_dcm_loss_chart_beside_the_grid(lab, output_dir):
    """Item 8's empty space right of the grids: the DCM grid is as wide as its figure (its
    controls wrap within it) and the loss chart sits to its right, not under it."""
    _page, panel, _ = lab
    dcm = cell(panel, 3).locator(".cw-dcm")
    dcm.scroll_into_view_if_needed()
    host = dcm.locator(".cw-dcm-grid").bounding_box()
    figure = dcm.locator(".cw-hg-figure svg").first.bounding_box()
    chart = dcm.locator(".cw-dcm-curve svg").bounding_box()
    assert host["width"] <= figure["width"] + 30, (host, figure)
    assert chart["x"] >= figure["x"] + figure["width"], (figure, chart)
    assert chart["y"] < figure["y"] + figure["height"], (figure, chart)
    assert chart["width"] >= 240, chart
    dcm.screenshot(path=str(output_dir / "polish_dcm_chart_beside_grid.png"))


def test_grids_say_what_where_and_out_of_how_many(lab, output_dir):
    from playwright.sync_api import expect

    _page, panel, _ = lab
    act = cell(panel, 4).locator(".cw-hg")
    expect(act.locator(".cw-hg-title")).to_have_text("Activation patching · logit_diff")
    expect(act.locator(".cw-hg-subtitle")).to_have_text("activation · z @ END")
    act.scroll_into_view_if_needed()
    act.screenshot(path=str(output_dir / "polish_activation_title.png"))

    pp = cell(panel, 5).locator(".cw-pp")
    expect(pp.locator(".cw-hg-subtitle")).to_contain_text(
        "z @ END · partial: 8 of 16 heads computed"
    )
    pp.scroll_into_view_if_needed()
    pp.screenshot(path=str(output_dir / "polish_path_patching_count.png"))

    zero = cell(panel, 6).locator(".cw-pp")
    expect(zero.locator(":scope > .cw-status")).to_contain_text(
        "senders patched at S2 reach the logits (read at END) only through later heads"
    )
    expect(zero.locator(".cw-hg-subtitle")).to_contain_text("@ S2")
    zero.scroll_into_view_if_needed()
    zero.screenshot(path=str(output_dir / "polish_logits_at_s2.png"))
