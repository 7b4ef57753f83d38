// Geometry of the head-grid figure: pure arithmetic, so it can be unit-tested.

export const TICK_FONT = 11;
export const AXIS_FONT = 12;
export const TITLE_FONT = 14;
export const PAD = 10;

export interface LayoutInput {
  nLayers: number;
  nHeads: number;
  rowLabelWidth: number; // widest layer label, px
  colLabelWidth: number; // widest head label, px
  titleWidth: number; // 0 = no title
  subtitleWidth: number; // 0 = no subtitle
  legendWidth: number;
  swatches?: number; // legend rows under the bar (default 2: not computed, selected)
}

export interface Layout {
  cellW: number;
  cellH: number;
  gridLeft: number;
  gridTop: number;
  gridW: number;
  gridH: number;
  titleY: number;
  subtitleY: number;
  headAxisY: number;
  colLabelY: number; // baseline of horizontal head labels, or the foot of rotated ones
  rotateColLabels: boolean;
  layerAxisX: number;
  rowLabelX: number; // right edge of the layer labels
  legendX: number;
  legendTop: number;
  legendBarH: number;
  width: number;
  height: number;
}

const clamp = (x: number, lo: number, hi: number) => Math.max(lo, Math.min(hi, x));

/**
 * Where a tooltip of size `w` x `h` goes near the pointer (x, y), all in the coordinates of
 * the visible area [left, left + width] x [0, height] that clips it: below right of the
 * pointer, flipped to the left / above where it would run out (the grid's bottom rows).
 */
export function placeTooltip(x: number, y: number, w: number, h: number,
  area: { left: number; width: number; height: number }): { left: number; top: number } {
  let left = x + 14;
  if (left + w > area.left + area.width) left = x - w - 10;
  let top = y + 14;
  if (top + h > area.height) top = y - h - 10;
  return {
    left: clamp(left, area.left, Math.max(area.left, area.left + area.width - w)),
    top: clamp(top, 0, Math.max(0, area.height - h)),
  };
}

export function computeLayout(inp: LayoutInput): Layout {
  // Cells shrink with the grid but never below what keeps 11px labels legible.
  const cellW = Math.round(clamp(560 / Math.max(1, inp.nHeads), 24, 46));
  const cellH = Math.round(clamp(560 / Math.max(1, inp.nLayers), 16, 26));
  const rotateColLabels = inp.colLabelWidth > cellW - 4;

  let y = PAD;
  const titleY = inp.titleWidth > 0 ? y + TITLE_FONT : 0;
  if (inp.titleWidth > 0) y += TITLE_FONT + 8;
  const subtitleY = inp.subtitleWidth > 0 ? y + TICK_FONT : 0;
  if (inp.subtitleWidth > 0) y += TICK_FONT + 8;
  const headAxisY = y + AXIS_FONT;
  y += AXIS_FONT + 6;
  const colLabelY = rotateColLabels ? y + inp.colLabelWidth : y + TICK_FONT;
  y = colLabelY + 5;
  const gridTop = Math.round(y);

  const layerAxisX = PAD + AXIS_FONT / 2 + 2;
  const rowLabelX = Math.round(PAD + AXIS_FONT + 8 + inp.rowLabelWidth);
  const gridLeft = rowLabelX + 6;
  const gridW = cellW * inp.nHeads;
  const gridH = cellH * inp.nLayers;

  const legendX = gridLeft + gridW + 24;
  const legendTop = gridTop;
  const legendBarH = Math.round(clamp(gridH - 70, 120, 260));
  // Legend: title, bar, then two swatch rows (not computed, selected).
  const legendBottom = legendTop + 18 + legendBarH + 16 + (inp.swatches ?? 2) * 20;
  const width = Math.ceil(
    Math.max(legendX + inp.legendWidth + PAD, PAD + inp.titleWidth + PAD, PAD + inp.subtitleWidth + PAD),
  );
  const height = Math.ceil(Math.max(gridTop + gridH, legendBottom) + PAD);
  return {
    cellW, cellH, gridLeft, gridTop, gridW, gridH, titleY, subtitleY, headAxisY, colLabelY,
    rotateColLabels, layerAxisX, rowLabelX, legendX, legendTop, legendBarH, width, height,
  };
}
