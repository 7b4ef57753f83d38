// HeadGridWidget's view: a layer x head heatmap (layers are rows, top to bottom; heads are
// columns), a diverging legend, hover details, click / shift-click selection, display-only
// threshold and top-k filters, and SVG / PNG export.
import { decodeFloat32, NdArray, WireArray } from "./codec";
import {
  divergingColor, formatValue, legendTicks, maxAbs, NAN_COLOR, sequentialColor, sequentialTicks,
} from "./colors";
import {
  downloadBlob, FONT_FAMILY, htmlEl, safeFilename, svgEl, svgMarkup, svgToPng, textWidth, truncate,
} from "./dom";
import { filterMask, rankByAbs, sliderStates, SliderState } from "./filter";
import { gridSubtitle, groupLines, HeadGroup, kvLine } from "./labels";
import { AXIS_FONT, computeLayout, Layout, PAD, placeTooltip, TICK_FONT, TITLE_FONT } from "./layout";
import { AnyModel, listen, RenderProps } from "./model";
import { clickSelection, describe, normalize, Pair, sameSelection } from "./selection";
import { statusLine } from "./status";
import { injectStyle } from "./style";

const DIM_OPACITY = 0.16;
const MAX_LABEL_CHARS = 28;
let instance = 0;

interface Grid {
  values: Float32Array;
  normalized: Float32Array | null;
  pending: Float32Array | null; // 1 = the value is a preview estimate, not yet exact
  nPending: number;
  nLayers: number;
  nHeads: number;
  layerLabels: string[];
  layerNumbers: number[]; // model layer of each row: rows may be a subset of the layers
  rowOf: Map<number, number>;
  headLabels: string[];
  scale: number;
  ranking: Int32Array;
  nFinite: number;
}

function readGrid(model: AnyModel): Grid {
  const arr: NdArray | null = decodeFloat32(model.get("values") as WireArray | null);
  const shape = arr && arr.shape.length === 2 ? arr.shape : [0, 0];
  const values = (arr?.data as Float32Array) ?? new Float32Array(0);
  const [nLayers, nHeads] = shape;
  let normalized: Float32Array | null = null;
  const norm = decodeFloat32(model.get("normalized") as WireArray | null);
  if (norm && norm.data.length === values.length) normalized = norm.data as Float32Array;
  let pending: Float32Array | null = null;
  const pend = decodeFloat32(model.get("pending") as WireArray | null);
  if (pend && pend.data.length === values.length) pending = pend.data as Float32Array;
  let nPending = 0;
  if (pending) for (let i = 0; i < pending.length; i++) if (pending[i] > 0 && !Number.isNaN(values[i])) nPending++;
  const labels = (given: unknown, n: number) => {
    const list = Array.isArray(given) ? given.map(String) : [];
    return Array.from({ length: n }, (_, i) => (i < list.length ? list[i] : String(i)));
  };
  const ranking = rankByAbs(values);
  const given = model.get("layer_numbers");
  const layerNumbers = Array.from({ length: nLayers }, (_, r) =>
    Array.isArray(given) && given.length === nLayers ? Number(given[r]) : r);
  return {
    values, normalized, pending, nPending, nLayers, nHeads, layerNumbers,
    rowOf: new Map(layerNumbers.map((layer, r) => [layer, r])),
    layerLabels: labels(model.get("layers"), nLayers),
    headLabels: labels(model.get("heads"), nHeads),
    scale: maxAbs(values), ranking, nFinite: ranking.length,
  };
}

function subtitleOf(model: AnyModel, grid: Grid): string {
  const text = (name: string) => String(model.get(name) ?? "");
  const nCells = Number(model.get("n_cells") ?? 0);
  return gridSubtitle({
    kind: text("kind"), component: text("component"), position: text("position"),
    complete: Boolean(model.get("complete")), nFinite: grid.nFinite, nPending: grid.nPending,
    total: nCells > 0 ? nCells : grid.nLayers * grid.nHeads,
  });
}

function render({ model, el }: RenderProps): () => void {
  injectStyle();
  const uid = `cw-hg-${Date.now().toString(36)}-${instance++}`;
  const root = htmlEl("div", "cw-hg");
  root.dataset.widget = "head-grid";

  // ---- controls
  const controls = htmlEl("div", "cw-hg-controls");
  const thrLabel = htmlEl("label", "cw-hg-ctl cw-hg-threshold", "|value| ≥");
  const thr = htmlEl("input");
  thr.type = "range";
  thr.className = "cw-hg-threshold-input";
  thr.setAttribute("aria-label", "threshold on |value|");
  const thrOut = htmlEl("output");
  thrLabel.append(thr, thrOut);
  const topLabel = htmlEl("label", "cw-hg-ctl cw-hg-topk", "top-k");
  const top = htmlEl("input");
  top.type = "range";
  top.className = "cw-hg-topk-input";
  top.setAttribute("aria-label", "show only the k heads with the largest |value|");
  const topOut = htmlEl("output");
  topLabel.append(top, topOut);
  const selBox = htmlEl("span", "cw-hg-selection");
  const selText = htmlEl("span", "cw-hg-selection-text");
  const clearBtn = htmlEl("button", "cw-hg-clear", "clear");
  clearBtn.title = "clear the selection";
  selBox.append(selText, clearBtn);
  const svgBtn = htmlEl("button", "cw-hg-export-svg", "SVG");
  svgBtn.title = "download the figure as SVG";
  const pngBtn = htmlEl("button", "cw-hg-export-png", "PNG");
  pngBtn.title = "download the figure as PNG";
  const exportBox = htmlEl("span", "cw-hg-ctl cw-hg-export", "save");
  exportBox.append(svgBtn, pngBtn);
  controls.append(thrLabel, topLabel, selBox, exportBox);

  const figure = htmlEl("div", "cw-hg-figure");
  const tooltip = htmlEl("div", "cw-hg-tooltip");
  tooltip.hidden = true;
  tooltip.setAttribute("role", "tooltip");
  const status = statusLine(model);
  root.append(controls, figure, status.node);
  el.appendChild(root);

  // ---- state of the current drawing
  let grid: Grid = readGrid(model);
  let layout: Layout;
  let svg: SVGSVGElement;
  let cells: SVGRectElement[] = [];
  let selLayer: SVGGElement;
  let hover: SVGRectElement;
  let mask: Uint8Array = new Uint8Array(0);

  function build(): void {
    const t0 = performance.now();
    grid = readGrid(model);
    const title = String(model.get("title") ?? "");
    const subtitle = subtitleOf(model, grid);
    const metricFull = String(model.get("metric_name") || "value");
    const metric = truncate(metricFull, 24);
    const rowLabels = grid.layerLabels.map((s) => truncate(s, MAX_LABEL_CHARS));
    const colLabels = grid.headLabels.map((s) => truncate(s, MAX_LABEL_CHARS));
    const sequential = model.get("scale") === "sequential";
    const color = sequential ? sequentialColor : divergingColor;
    const ticks = sequential ? sequentialTicks(grid.scale) : legendTicks(grid.scale);
    const tickText = ticks.map((t) => formatValue(t));
    const legendWidth = Math.max(
      14 + 10 + Math.max(0, ...tickText.map((t) => textWidth(t, TICK_FONT))),
      textWidth(metric, AXIS_FONT, "bold"),
      18 + textWidth(grid.nPending ? "preview (estimate)" : "not computed", TICK_FONT),
    );
    layout = computeLayout({
      nLayers: grid.nLayers,
      nHeads: grid.nHeads,
      rowLabelWidth: Math.max(textWidth("00", TICK_FONT), ...rowLabels.map((s) => textWidth(s, TICK_FONT))),
      colLabelWidth: Math.max(0, ...colLabels.map((s) => textWidth(s, TICK_FONT))),
      titleWidth: title ? textWidth(title, TITLE_FONT, "bold") : 0,
      subtitleWidth: subtitle ? textWidth(subtitle, TICK_FONT) : 0,
      legendWidth,
      swatches: grid.nPending ? 3 : 2,
    });
    const L = layout;
    svg = svgEl("svg", {
      width: L.width, height: L.height, viewBox: `0 0 ${L.width} ${L.height}`,
      "font-family": FONT_FAMILY, "font-size": TICK_FONT, fill: "#222", role: "img",
    });
    svg.classList.add("cw-hg-svg");
    svg.appendChild(svgEl("title", {}, title || "attention heads"));

    const defs = svgEl("defs");
    const nanId = `${uid}-nan`;
    const pattern = svgEl("pattern", {
      id: nanId, patternUnits: "userSpaceOnUse", width: 6, height: 6, patternTransform: "rotate(45)",
    });
    pattern.append(
      svgEl("rect", { width: 6, height: 6, fill: NAN_COLOR }),
      svgEl("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#8a8a8a", "stroke-width": 2.5 }),
    );
    const gradId = `${uid}-scale`;
    const grad = svgEl("linearGradient", { id: gradId, x1: 0, y1: 0, x2: 0, y2: 1 });
    for (let i = 0; i <= 8; i++) {
      // the top of the bar is +scale (red), the bottom -scale (blue), or 0 (white) if sequential
      const v = sequential ? 1 - i / 8 : 1 - (2 * i) / 8;
      grad.appendChild(svgEl("stop", { offset: `${(i / 8) * 100}%`, "stop-color": color(v, 1) }));
    }
    defs.append(pattern, grad);
    svg.appendChild(defs);
    svg.appendChild(svgEl("rect", { x: 0, y: 0, width: L.width, height: L.height, fill: "#ffffff" }));

    // title, subtitle
    if (title) svg.appendChild(svgEl("text", { x: PAD, y: L.titleY, "font-size": TITLE_FONT, "font-weight": "bold", class: "cw-hg-title" }, title));
    if (subtitle) svg.appendChild(svgEl("text", { x: PAD, y: L.subtitleY, fill: "#555", class: "cw-hg-subtitle" }, subtitle));

    // axis titles
    svg.appendChild(svgEl("text", {
      x: L.gridLeft + L.gridW / 2, y: L.headAxisY, "text-anchor": "middle", "font-size": AXIS_FONT,
      "font-weight": "bold", class: "cw-hg-axis-head",
    }, "head"));
    svg.appendChild(svgEl("text", {
      x: 0, y: 0, "text-anchor": "middle", "font-size": AXIS_FONT, "font-weight": "bold", class: "cw-hg-axis-layer",
      transform: `translate(${L.layerAxisX + AXIS_FONT / 2 - 2},${L.gridTop + L.gridH / 2}) rotate(-90)`,
    }, "layer"));

    // head labels (columns) and layer labels (rows); full text in a <title> when shortened
    const colGroup = svgEl("g", { class: "cw-hg-head-labels" });
    colLabels.forEach((text, h) => {
      const cx = L.gridLeft + (h + 0.5) * L.cellW;
      const t = L.rotateColLabels
        ? svgEl("text", { x: 0, y: 0, transform: `translate(${cx + TICK_FONT / 2 - 1},${L.colLabelY}) rotate(-90)` }, text)
        : svgEl("text", { x: cx, y: L.colLabelY, "text-anchor": "middle" }, text);
      if (text !== grid.headLabels[h]) t.appendChild(svgEl("title", {}, grid.headLabels[h]));
      colGroup.appendChild(t);
    });
    const rowGroup = svgEl("g", { class: "cw-hg-layer-labels", "text-anchor": "end" });
    rowLabels.forEach((text, l) => {
      const t = svgEl("text", { x: L.rowLabelX, y: L.gridTop + (l + 0.5) * L.cellH, "dominant-baseline": "central" }, text);
      if (text !== grid.layerLabels[l]) t.appendChild(svgEl("title", {}, grid.layerLabels[l]));
      rowGroup.appendChild(t);
    });
    svg.append(colGroup, rowGroup);

    // cells
    svg.appendChild(svgEl("rect", { x: L.gridLeft, y: L.gridTop, width: L.gridW, height: L.gridH, fill: "#ececec" }));
    const cellGroup = svgEl("g", { class: "cw-hg-cells" });
    cells = new Array(grid.values.length);
    for (let l = 0; l < grid.nLayers; l++) {
      for (let h = 0; h < grid.nHeads; h++) {
        const i = l * grid.nHeads + h;
        const v = grid.values[i];
        const r = svgEl("rect", {
          x: L.gridLeft + h * L.cellW + 0.5, y: L.gridTop + l * L.cellH + 0.5,
          width: L.cellW - 1, height: L.cellH - 1,
          fill: Number.isNaN(v) ? `url(#${nanId})` : color(v, grid.scale),
          "data-layer": grid.layerNumbers[l], "data-row": l, "data-head": h, "data-i": i, class: Number.isNaN(v) ? "cw-cell cw-nan" : "cw-cell",
        });
        if (grid.pending && grid.pending[i] > 0 && !Number.isNaN(v)) {
          r.classList.add("cw-preview");
          r.setAttribute("stroke", "#666");
          r.setAttribute("stroke-width", "1");
          r.setAttribute("stroke-dasharray", "2 2");
        }
        cells[i] = r;
        cellGroup.appendChild(r);
      }
    }
    svg.appendChild(cellGroup);
    selLayer = svgEl("g", { class: "cw-hg-selected", "pointer-events": "none" });
    hover = svgEl("rect", {
      class: "cw-hg-hover", fill: "none", stroke: "#000", "stroke-width": 1.5, "pointer-events": "none",
      "data-export": "skip", visibility: "hidden", width: L.cellW, height: L.cellH,
    });
    svg.append(selLayer, hover);

    // legend: metric name, colour bar with ticks, then what hatching and outlines mean
    const lg = svgEl("g", { class: "cw-hg-legend" });
    const barX = L.legendX;
    const barY = L.legendTop + 18;
    const legendTitle = svgEl("text", { x: barX, y: L.legendTop + 10, "font-size": AXIS_FONT, "font-weight": "bold", class: "cw-hg-legend-title" }, metric);
    if (metric !== metricFull) legendTitle.appendChild(svgEl("title", {}, metricFull));
    lg.appendChild(legendTitle);
    lg.appendChild(svgEl("rect", { x: barX, y: barY, width: 14, height: L.legendBarH, fill: `url(#${gradId})`, stroke: "#999", "stroke-width": 0.5 }));
    ticks.forEach((t, k) => {
      // +scale at the top of the bar, -scale (or 0 if sequential) at the bottom
      const frac = sequential ? (grid.scale > 0 ? t / grid.scale : 0) : grid.scale > 0 ? (t + grid.scale) / (2 * grid.scale) : 0.5;
      const ty = barY + (1 - frac) * L.legendBarH;
      lg.appendChild(svgEl("line", { x1: barX + 14, x2: barX + 18, y1: ty, y2: ty, stroke: "#555" }));
      lg.appendChild(svgEl("text", { x: barX + 21, y: ty, "dominant-baseline": "central", class: "cw-hg-tick" }, tickText[k]));
    });
    let sy = barY + L.legendBarH + 16;
    lg.appendChild(svgEl("rect", { x: barX, y: sy, width: 14, height: 12, fill: `url(#${nanId})`, stroke: "#999", "stroke-width": 0.5 }));
    lg.appendChild(svgEl("text", { x: barX + 20, y: sy + 6, "dominant-baseline": "central", class: "cw-hg-nan-legend" }, "not computed"));
    sy += 20;
    lg.appendChild(svgEl("rect", { x: barX + 1, y: sy + 1, width: 12, height: 10, fill: "#fff", stroke: "#111", "stroke-width": 2 }));
    lg.appendChild(svgEl("text", { x: barX + 20, y: sy + 6, "dominant-baseline": "central" }, "selected"));
    if (grid.nPending) {
      sy += 20;
      lg.appendChild(svgEl("rect", { x: barX + 1, y: sy + 1, width: 12, height: 10, fill: "#f4a582", stroke: "#666", "stroke-width": 1, "stroke-dasharray": "2 2" }));
      lg.appendChild(svgEl("text", { x: barX + 20, y: sy + 6, "dominant-baseline": "central", class: "cw-hg-preview-legend" }, "preview (estimate)"));
    }
    svg.appendChild(lg);

    figure.replaceChildren(svg, tooltip);
    syncSliders();
    paintSelection();
    repaintFilter();
    root.dataset.buildMs = (performance.now() - t0).toFixed(2);
    root.dataset.builds = String(Number(root.dataset.builds ?? 0) + 1);
  }

  // ---- display filters (client only: they never change the data)
  function applySlider(input: HTMLInputElement, out: HTMLOutputElement, st: SliderState): void {
    input.min = String(st.min);
    input.max = String(st.max);
    input.step = String(st.step);
    input.value = String(st.value);
    input.disabled = st.disabled;
    out.value = st.label;
  }

  function sliders() {
    return sliderStates(grid.scale, grid.nFinite, Number(model.get("threshold")) || 0, Number(model.get("top_k")) || 0,
      (v) => formatValue(v));
  }

  function syncSliders(): void {
    const st = sliders();
    applySlider(thr, thrOut, st.threshold);
    applySlider(top, topOut, st.topK);
  }

  function repaintFilter(): void {
    const t0 = performance.now();
    const next = filterMask(grid.values, {
      threshold: Number(model.get("threshold")) || 0,
      topK: Number(model.get("top_k")) || 0,
    }, grid.ranking);
    let dimmed = 0;
    for (let i = 0; i < cells.length; i++) {
      if (!next[i]) dimmed++;
      if (mask.length === next.length && mask[i] === next[i]) continue;
      if (next[i]) {
        cells[i].removeAttribute("fill-opacity");
        cells[i].classList.remove("cw-dim");
      } else {
        cells[i].setAttribute("fill-opacity", String(DIM_OPACITY));
        cells[i].classList.add("cw-dim");
      }
    }
    mask = next;
    root.dataset.dimmed = String(dimmed);
    root.dataset.repaintMs = (performance.now() - t0).toFixed(3);
  }

  thr.addEventListener("input", () => {
    model.set("threshold", Number(thr.value));
    thrOut.value = formatValue(Number(thr.value));
    repaintFilter();
  });
  top.addEventListener("input", () => {
    const k = Number(top.value);
    model.set("top_k", k >= grid.nFinite ? 0 : k);
    topOut.value = k >= grid.nFinite ? "all" : String(k);
    repaintFilter();
  });
  // Persist the slider positions in the kernel once the user lets go, not on every step.
  thr.addEventListener("change", () => model.save_changes());
  top.addEventListener("change", () => model.save_changes());

  // ---- selection
  function currentSelection(): Pair[] {
    const raw = model.get("selected");
    return Array.isArray(raw) ? normalize(raw.filter((p: unknown) => Array.isArray(p) && p.length === 2) as Pair[]) : [];
  }

  function paintSelection(): void {
    const sel = currentSelection();
    selLayer.replaceChildren();
    const rows: [number, number][] = [];
    for (const [layer, h] of sel) {
      const l = grid.rowOf.get(layer);
      if (l === undefined || h >= grid.nHeads) continue;
      rows.push([l, h]);
      const x = layout.gridLeft + h * layout.cellW;
      const y = layout.gridTop + l * layout.cellH;
      selLayer.append(
        svgEl("rect", { x: x + 1, y: y + 1, width: layout.cellW - 2, height: layout.cellH - 2, fill: "none", stroke: "#111", "stroke-width": 2.5 }),
        svgEl("rect", { x: x + 2.5, y: y + 2.5, width: layout.cellW - 5, height: layout.cellH - 5, fill: "none", stroke: "#fff", "stroke-width": 1 }),
      );
    }
    cells.forEach((c) => c.removeAttribute("aria-selected"));
    for (const [l, h] of rows) cells[l * grid.nHeads + h]?.setAttribute("aria-selected", "true");
    selText.textContent = `selected: ${describe(sel)}`;
    selText.title = selText.textContent; // the whole list, when the line is cut short
    clearBtn.disabled = sel.length === 0;
  }

  function setSelection(next: Pair[]): void {
    if (sameSelection(next, currentSelection())) return;
    model.set("selected", next);
    model.save_changes();
    paintSelection();
  }

  // layer: the model's layer number; row: its row in the grid
  function cellOf(target: EventTarget | null): { layer: number; l: number; h: number; i: number } | null {
    const node = target as Element | null;
    if (!node || !node.classList || !node.classList.contains("cw-cell")) return null;
    const num = (name: string) => Number(node.getAttribute(name));
    return { layer: num("data-layer"), l: num("data-row"), h: num("data-head"), i: num("data-i") };
  }

  figure.addEventListener("click", (ev) => {
    const c = cellOf(ev.target);
    if (!c) return;
    setSelection(clickSelection(currentSelection(), [c.layer, c.h], ev.shiftKey || ev.metaKey || ev.ctrlKey));
  });
  clearBtn.addEventListener("click", () => setSelection([]));

  // ---- hover details
  function showTooltip(ev: PointerEvent, c: { layer: number; l: number; h: number; i: number }): void {
    const v = grid.values[c.i];
    const lines: [string, string][] = [["cw-tt-head", `${c.layer}.${c.h}`]];
    const ll = grid.layerLabels[c.l];
    const hl = grid.headLabels[c.h];
    if (ll !== String(c.layer) || hl !== String(c.h)) lines.push(["cw-tt-labels", `layer ${ll}, head ${hl}`]);
    lines.push(["cw-tt-value", Number.isNaN(v) ? "not computed" : `${model.get("metric_name") || "value"}: ${formatValue(v, 4)}`]);
    if (grid.normalized && !Number.isNaN(grid.normalized[c.i])) {
      lines.push(["cw-tt-norm", `normalized: ${formatValue(grid.normalized[c.i], 4)}`]);
    }
    if (grid.pending && grid.pending[c.i] > 0 && !Number.isNaN(v)) lines.push(["cw-tt-preview", "attribution preview; exact value pending"]);
    const kvGroups = (model.get("kv_groups") as number[][]) ?? [];
    const kvColumns = Boolean(model.get("kv_columns"));
    const kv = kvLine(kvGroups, kvColumns, c.h);
    if (kv) lines.push(["cw-tt-kv", kv]);
    for (const g of groupLines((model.get("groups") as HeadGroup[]) ?? [], c.layer, c.h, kvGroups, kvColumns)) {
      lines.push(["cw-tt-group", g]);
    }
    if (!mask[c.i]) lines.push(["cw-tt-dim", "(filtered out)"]);
    tooltip.replaceChildren(...lines.map(([cls, text]) => htmlEl("div", cls, text)));
    tooltip.hidden = false;
    // Inside the figure's visible box: it clips what sticks out (e.g. below the bottom rows).
    const box = figure.getBoundingClientRect();
    const at = placeTooltip(ev.clientX - box.left + figure.scrollLeft, ev.clientY - box.top,
      tooltip.offsetWidth, tooltip.offsetHeight,
      { left: figure.scrollLeft, width: figure.clientWidth, height: figure.clientHeight });
    tooltip.style.left = `${at.left}px`;
    tooltip.style.top = `${at.top}px`;
    hover.setAttribute("x", String(layout.gridLeft + c.h * layout.cellW));
    hover.setAttribute("y", String(layout.gridTop + c.l * layout.cellH));
    hover.setAttribute("visibility", "visible");
  }

  function hideTooltip(): void {
    tooltip.hidden = true;
    hover?.setAttribute("visibility", "hidden");
  }

  figure.addEventListener("pointermove", (ev) => {
    const c = cellOf(ev.target);
    if (c) showTooltip(ev, c);
    else hideTooltip();
  });
  figure.addEventListener("pointerleave", hideTooltip);

  // ---- export
  function filename(ext: string): string {
    return `${safeFilename(String(model.get("title") ?? ""), "head_grid")}.${ext}`;
  }
  svgBtn.addEventListener("click", () => {
    downloadBlob(new Blob([svgMarkup(svg)], { type: "image/svg+xml" }), filename("svg"));
  });
  pngBtn.addEventListener("click", () => {
    svgToPng(svgMarkup(svg), layout.width, layout.height, 2)
      .then((blob) => downloadBlob(blob, filename("png")))
      .catch((err) => console.error("circuit_widgets: PNG export failed", err));
  });

  build();

  // One kernel update sets several traits, one change event each: rebuild once for all.
  let buildQueued = false;
  const scheduleBuild = () => {
    if (buildQueued) return;
    buildQueued = true;
    queueMicrotask(() => {
      buildQueued = false;
      build();
    });
  };
  const offs = [
    listen(model, ["change:values", "change:normalized", "change:pending", "change:heads", "change:layers", "change:layer_numbers",
      "change:title", "change:metric_name", "change:kind", "change:component", "change:complete", "change:position",
      "change:n_cells", "change:scale"], scheduleBuild),
    listen(model, ["change:selected"], paintSelection),
    listen(model, ["change:threshold", "change:top_k"], () => {
      syncSliders();
      repaintFilter();
    }),
  ];
  return () => {
    offs.forEach((off) => off());
    status.dispose();
  };
}

export default { render };
