import { describe, expect, it } from "vitest";
import { barSlots, extent, linePath } from "../src/chart";
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

  it("reads widget references", () => {
    expect(modelId("IPY_MODEL_abc123")).toBe("abc123");
    expect(modelId(null)).toBeNull();
    expect(modelId("abc")).toBeNull();
  });
});
