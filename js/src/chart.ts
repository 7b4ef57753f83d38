// Small SVG charts (loss curve, grouped bars): the geometry is pure and unit-tested; the
// drawing uses svgEl, so every label is text.
import { formatValue } from "./colors";
import { FONT_FAMILY, svgEl, textWidth } from "./dom";

export interface Extent { lo: number; hi: number }

/** Finite min/max of values, widened to a non-empty range. */
export function extent(values: ArrayLike<number>): Extent {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (Number.isFinite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (lo === Infinity) return { lo: 0, hi: 1 };
  if (lo === hi) return { lo: lo - Math.max(1e-6, Math.abs(lo) * 0.05), hi: hi + Math.max(1e-6, Math.abs(hi) * 0.05) };
  return { lo, hi };
}

/** SVG path through (i, values[i]) scaled into a w x h box (y up); NaN values break the line. */
export function linePath(values: ArrayLike<number>, w: number, h: number, ext: Extent = extent(values)): string {
  const n = values.length;
  if (n === 0) return "";
  const sx = n > 1 ? w / (n - 1) : 0;
  const span = ext.hi - ext.lo || 1;
  let d = "";
  let pen = false;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      pen = false;
      continue;
    }
    const x = i * sx;
    const y = h - ((v - ext.lo) / span) * h;
    d += `${pen ? "L" : "M"}${x.toFixed(2)},${y.toFixed(2)}`;
    pen = true;
  }
  return d;
}

/** x positions of bar `j` of `nSeries` in each of `nGroups` groups, over width w. */
export function barSlots(nGroups: number, nSeries: number, w: number): { x: number[][]; width: number } {
  const groupW = nGroups > 0 ? w / nGroups : w;
  const width = (groupW * 0.8) / Math.max(1, nSeries);
  const x = Array.from({ length: nGroups }, (_, g) =>
    Array.from({ length: nSeries }, (_, j) => g * groupW + groupW * 0.1 + j * width));
  return { x, width };
}

/** Labels for the two ends of an axis, with enough digits that they differ when the ends do. */
export function endLabels(lo: number, hi: number): [string, string] {
  for (let digits = 3; digits <= 10; digits++) {
    const a = formatValue(lo, digits);
    const b = formatValue(hi, digits);
    if (a !== b || lo === hi) return [a, b];
  }
  return [formatValue(lo, 10), formatValue(hi, 10)];
}

export const MIN_BAR_PX = 2;

/** Height and top of a bar of value v (clamped to [0, 1]) in a box h high: a 0 still shows a
 * thin bar on the baseline, so "0" reads as a value and not as missing. */
export function barGeometry(v: number, h: number): { height: number; y: number; zero: boolean } {
  const height = Math.max(MIN_BAR_PX, Math.max(0, Math.min(1, v)) * h);
  return { height, y: h - height, zero: !(v > 0) };
}

export function lineChart(values: ArrayLike<number>, opts: { title: string; xLabel: string; yLabel: string; width?: number; height?: number }): SVGSVGElement {
  const W = opts.width ?? 360;
  const H = opts.height ?? 200;
  const ext = extent(values);
  const [loText, hiText] = endLabels(ext.lo, ext.hi);
  // room for the longer tick label (a nearly flat curve needs many digits) and the axis title
  const m = { l: Math.max(48, 24 + Math.max(textWidth(loText, 11), textWidth(hiText, 11))), r: 12, t: 24, b: 34 };
  const w = W - m.l - m.r;
  const h = H - m.t - m.b;
  const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "font-family": FONT_FAMILY, "font-size": 11, class: "cw-line-chart" });
  svg.appendChild(svgEl("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }));
  svg.appendChild(svgEl("text", { x: 4, y: 14, "font-weight": "bold", "font-size": 12 }, opts.title));
  const g = svgEl("g", { transform: `translate(${m.l},${m.t})` });
  g.appendChild(svgEl("line", { x1: 0, y1: h, x2: w, y2: h, stroke: "#888" }));
  g.appendChild(svgEl("line", { x1: 0, y1: 0, x2: 0, y2: h, stroke: "#888" }));
  for (const [text, y] of [[hiText, 0], [loText, h]] as [string, number][]) {
    g.appendChild(svgEl("text", { x: -4, y, "text-anchor": "end", "dominant-baseline": "central", class: "cw-chart-ytick" }, text));
  }
  g.appendChild(svgEl("text", { x: 0, y: h + 14, "text-anchor": "start" }, "0"));
  g.appendChild(svgEl("text", { x: w, y: h + 14, "text-anchor": "end" }, String(Math.max(0, values.length - 1))));
  g.appendChild(svgEl("text", { x: w / 2, y: h + 28, "text-anchor": "middle" }, opts.xLabel));
  g.appendChild(svgEl("text", { x: 0, y: 0, "text-anchor": "middle", transform: `translate(${10 - m.l},${h / 2}) rotate(-90)` }, opts.yLabel));
  g.appendChild(svgEl("path", { d: linePath(values, w, h, ext), fill: "none", stroke: "#2166ac", "stroke-width": 1.8, class: "cw-chart-line" }));
  svg.appendChild(g);
  return svg;
}

export const SERIES_COLORS = ["#9e9e9e", "#b2182b", "#2166ac", "#4d9221"];

/** Grouped bars in [0, 1] (accuracies): rows = groups, columns = series. */
export function barChart(values: Float32Array, nGroups: number, groupLabels: string[], seriesLabels: string[], title: string): SVGSVGElement {
  const nSeries = seriesLabels.length;
  const legendW = seriesLabels.reduce((a, s) => a + 24 + textWidth(s, 11), 0);
  const W = Math.max(300, 60 + legendW, 90 + nGroups * (nSeries * 26 + 24));
  const H = 230;
  const m = { l: 40, r: 10, t: 44, b: 30 };
  const w = W - m.l - m.r;
  const h = H - m.t - m.b;
  const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "font-family": FONT_FAMILY, "font-size": 11, class: "cw-bar-chart" });
  svg.appendChild(svgEl("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }));
  svg.appendChild(svgEl("text", { x: 4, y: 14, "font-weight": "bold", "font-size": 12 }, title));
  // legend
  let lx = m.l;
  seriesLabels.forEach((s, j) => {
    svg.appendChild(svgEl("rect", { x: lx, y: 22, width: 10, height: 10, fill: SERIES_COLORS[j % SERIES_COLORS.length] }));
    svg.appendChild(svgEl("text", { x: lx + 14, y: 27, "dominant-baseline": "central" }, s));
    lx += 24 + textWidth(s, 11);
  });
  const g = svgEl("g", { transform: `translate(${m.l},${m.t})` });
  for (const t of [0, 0.5, 1]) {
    const y = h - t * h;
    g.appendChild(svgEl("line", { x1: 0, y1: y, x2: w, y2: y, stroke: t === 0 ? "#888" : "#e3e3e3" }));
    g.appendChild(svgEl("text", { x: -4, y, "text-anchor": "end", "dominant-baseline": "central" }, String(t)));
  }
  const { x, width } = barSlots(nGroups, nSeries, w);
  for (let gi = 0; gi < nGroups; gi++) {
    for (let j = 0; j < nSeries; j++) {
      const v = values[gi * nSeries + j];
      if (!Number.isFinite(v)) continue;
      const bar = barGeometry(v, h);
      g.appendChild(svgEl("rect", {
        x: x[gi][j], y: bar.y, width: width * 0.92, height: bar.height, fill: SERIES_COLORS[j % SERIES_COLORS.length],
        class: bar.zero ? "cw-bar cw-bar-zero" : "cw-bar", "data-group": gi, "data-series": j, "data-value": v,
      }));
      g.appendChild(svgEl("text", {
        x: x[gi][j] + width * 0.46, y: bar.y - 3, "text-anchor": "middle", "font-size": 10, fill: "#333", class: "cw-bar-value",
      }, v.toFixed(2)));
    }
    g.appendChild(svgEl("text", { x: x[gi][0] + (width * nSeries) / 2, y: h + 16, "text-anchor": "middle", class: "cw-bar-label" }, groupLabels[gi] ?? String(gi)));
  }
  const finite = Array.from(values).filter((v) => Number.isFinite(v));
  if (finite.length && finite.every((v) => v === 0)) {
    g.appendChild(svgEl("text", { x: w / 2, y: h / 2, "text-anchor": "middle", fill: "#555", class: "cw-bar-note" },
      "all values are 0 (computed, not missing)"));
  }
  svg.appendChild(g);
  return svg;
}
