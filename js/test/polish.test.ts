// Issue 15: tooltips inside the visible area, subtitles that name the position and count the
// possible cells, a sequential scale for values that are never negative.
import { describe, expect, it } from "vitest";
import { divergingColor, sequentialColor, sequentialTicks, WHITE } from "../src/colors";
import { gridSubtitle } from "../src/labels";
import { placeTooltip } from "../src/layout";

describe("placeTooltip", () => {
  const area = { left: 0, width: 500, height: 800 };

  it("goes below right of the pointer where there is room", () => {
    expect(placeTooltip(100, 100, 120, 80, area)).toEqual({ left: 114, top: 114 });
  });

  it("flips above the pointer on the bottom rows, so the figure's box never clips it", () => {
    const at = placeTooltip(100, 780, 120, 80, area);
    expect(at.top + 80).toBeLessThanOrEqual(area.height);
    expect(at.top).toBe(780 - 80 - 10);
  });

  it("flips left at the right edge and stays inside a scrolled box", () => {
    const at = placeTooltip(480, 100, 120, 80, area);
    expect(at.left).toBe(480 - 120 - 10);
    const scrolled = placeTooltip(310, 100, 120, 80, { left: 300, width: 200, height: 800 });
    expect(scrolled.left).toBeGreaterThanOrEqual(300);
    expect(scrolled.left + 120).toBeLessThanOrEqual(500);
  });
});

describe("gridSubtitle", () => {
  const base = { kind: "path patching → 23.4.q", component: "z", position: "END", complete: true, nFinite: 0, nPending: 0 };

  it("names the position", () => {
    expect(gridSubtitle({ ...base, total: 270 })).toBe("path patching → 23.4.q · z @ END");
    expect(gridSubtitle({ ...base, component: "", total: 270 })).toBe("path patching → 23.4.q · @ END");
  });

  it("counts the possible cells, not every head", () => {
    expect(gridSubtitle({ ...base, complete: false, nFinite: 18, total: 207 })).toBe(
      "path patching → 23.4.q · z @ END · partial: 18 of 207 heads computed");
  });
});

describe("sequentialColor", () => {
  it("runs from white at 0 to red at the top, never blue", () => {
    expect(sequentialColor(0, 1)).toBe(WHITE);
    expect(sequentialColor(1, 1)).toBe(divergingColor(1, 1));
    expect(sequentialColor(-0.5, 1)).toBe(WHITE);
    expect(sequentialTicks(1)[0]).toBe(0);
    expect(sequentialTicks(1).every((t) => t >= 0)).toBe(true);
  });
});
