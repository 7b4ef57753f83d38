import { describe, expect, it } from "vitest";
import { computeLayout } from "../src/layout";

const base = { rowLabelWidth: 14, colLabelWidth: 14, titleWidth: 120, subtitleWidth: 0, legendWidth: 90 };

describe("computeLayout", () => {
  it("keeps cells large enough for readable labels on 30 x 9 and 24 x 16 grids", () => {
    for (const [L, H] of [[30, 9], [24, 16], [12, 12], [80, 64]]) {
      const lay = computeLayout({ ...base, nLayers: L, nHeads: H });
      expect(lay.cellH).toBeGreaterThanOrEqual(16);
      expect(lay.cellW).toBeGreaterThanOrEqual(24);
      expect(lay.gridW).toBe(lay.cellW * H);
      expect(lay.height).toBeGreaterThanOrEqual(lay.gridTop + lay.gridH);
      expect(lay.width).toBeGreaterThan(lay.legendX);
    }
  });

  it("rotates head labels that are wider than a cell, and makes room for them", () => {
    const flat = computeLayout({ ...base, nLayers: 4, nHeads: 4 });
    const rotated = computeLayout({ ...base, nLayers: 4, nHeads: 4, colLabelWidth: 150 });
    expect(flat.rotateColLabels).toBe(false);
    expect(rotated.rotateColLabels).toBe(true);
    expect(rotated.gridTop - flat.gridTop).toBeGreaterThan(100);
  });
});

describe("legend rows", () => {
  it("a third swatch row (preview) makes room below the bar", () => {
    const small = { ...base, nLayers: 4, nHeads: 8 };
    expect(computeLayout({ ...small, swatches: 3 }).height).toBe(computeLayout(small).height + 20);
  });
});
