import { describe, expect, it } from "vitest";
import { barGeometry, barSlots, endLabels, extent, linePath, MIN_BAR_PX } from "../src/chart";
import { modelId } from "../src/children";

describe("charts", () => {
  it("extent skips non-finite values and widens a flat range", () => {
    expect(extent([3, NaN, -1, Infinity])).toEqual({ lo: -1, hi: 3 });
    expect(extent([])).toEqual({ lo: 0, hi: 1 });
    const flat = extent([2, 2]);
    expect(flat.lo).toBeLessThan(2);
    expect(flat.hi).toBeGreaterThan(2);
  });

  it("linePath scales into the box with y up and breaks at NaN", () => {
    expect(linePath([0, 1, 2], 100, 50)).toBe("M0.00,50.00L50.00,25.00L100.00,0.00");
    expect(linePath([0, NaN, 2], 100, 50)).toBe("M0.00,50.00M100.00,0.00");
    expect(linePath([], 100, 50)).toBe("");
  });

  it("barSlots places each series side by side inside its group", () => {
    const { x, width } = barSlots(2, 3, 300);
    expect(width).toBeCloseTo(40);
    expect(x[0]).toEqual([15, 55, 95]);
    expect(x[1][0]).toBeCloseTo(165);
  });

  it("labels the ends of a nearly flat curve so that they differ", () => {
    const [lo, hi] = endLabels(-0.06231, -0.06198);
    expect(lo).not.toBe(hi);
    expect([lo, hi]).toEqual(["-0.0623", "-0.062"]);
    expect(endLabels(0, 1)).toEqual(["0", "1"]);
    expect(endLabels(-1.5e-6, 2e-6)).toEqual(["-1.50e-6", "2.00e-6"]);
    const [a, b] = endLabels(2, 2);
    expect(a).toBe(b);
  });

  it("draws a zero bar as a thin bar on the baseline, not as nothing", () => {
    expect(barGeometry(0, 150)).toEqual({ height: MIN_BAR_PX, y: 150 - MIN_BAR_PX, zero: true });
    expect(barGeometry(0.5, 150)).toEqual({ height: 75, y: 75, zero: false });
    expect(barGeometry(2, 150).height).toBe(150);
    expect(barGeometry(-1, 150).zero).toBe(true);
  });

  it("reads widget references", () => {
    expect(modelId("IPY_MODEL_abc123")).toBe("abc123");
    expect(modelId(null)).toBeNull();
    expect(modelId("abc")).toBeNull();
  });
});
