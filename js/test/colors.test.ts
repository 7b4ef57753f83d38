import { describe, expect, it } from "vitest";
import { BLUE, divergingColor, formatValue, legendTicks, maxAbs, NAN_COLOR, RED, WHITE } from "../src/colors";

const rgb = (hex: string) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));

describe("divergingColor", () => {
  it("maps 0 to white and the ends of the scale to blue and red", () => {
    expect(divergingColor(0, 2)).toBe(WHITE);
    expect(divergingColor(2, 2)).toBe(RED);
    expect(divergingColor(-2, 2)).toBe(BLUE);
  });

  it("clamps beyond the scale and maps NaN to the NaN colour", () => {
    expect(divergingColor(10, 2)).toBe(RED);
    expect(divergingColor(-Infinity, 2)).toBe(BLUE);
    expect(divergingColor(NaN, 2)).toBe(NAN_COLOR);
    expect(divergingColor(1, 0)).toBe(WHITE); // all-zero grid
  });

  it("is symmetric: +v and -v are equally far from white, red-ish vs blue-ish", () => {
    for (const v of [0.1, 0.5, 1, 1.7]) {
      const pos = rgb(divergingColor(v, 2));
      const neg = rgb(divergingColor(-v, 2));
      expect(pos[0]).toBeGreaterThan(pos[2]); // red dominates
      expect(neg[2]).toBeGreaterThan(neg[0]); // blue dominates
      const dist = (c: number[]) => Math.hypot(255 - c[0], 255 - c[1], 255 - c[2]);
      expect(Math.abs(dist(pos) - dist(neg)) / dist(pos)).toBeLessThan(0.25);
    }
  });

  it("gets darker monotonically away from 0", () => {
    const lum = (c: number[]) => 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2];
    let prevPos = 256;
    let prevNeg = 256;
    for (let v = 0; v <= 1; v += 0.1) {
      const p = lum(rgb(divergingColor(v, 1)));
      const n = lum(rgb(divergingColor(-v, 1)));
      expect(p).toBeLessThanOrEqual(prevPos + 1e-9);
      expect(n).toBeLessThanOrEqual(prevNeg + 1e-9);
      prevPos = p;
      prevNeg = n;
    }
  });
});

describe("scale helpers", () => {
  it("maxAbs ignores NaN and infinities", () => {
    expect(maxAbs([1, -3, NaN, 2, Infinity])).toBe(3);
    expect(maxAbs([NaN])).toBe(0);
  });

  it("legendTicks: the ends of the scale, 0, and round numbers between, symmetric", () => {
    expect(legendTicks(4)).toEqual([-4, -2, 0, 2, 4]);
    expect(legendTicks(2)).toEqual([-2, -1, 0, 1, 2]);
    expect(legendTicks(3.3308)).toEqual([-3.3308, -2, -1, 0, 1, 2, 3.3308]); // 3 would crowd 3.33
    expect(legendTicks(9.9)).toEqual([-9.9, -5, 0, 5, 9.9]);
    expect(legendTicks(0.0347)).toEqual([-0.0347, -0.02, -0.01, 0, 0.01, 0.02, 0.0347]);
    expect(legendTicks(0)).toEqual([0]);
    for (const s of [0.013, 0.5, 1, 1.7, 7, 123]) {
      const t = legendTicks(s);
      expect(t.length).toBeLessThanOrEqual(9);
      expect(t).toEqual([...t].sort((a, b) => a - b));
      expect(t.map((x) => 0 - x + 0).reverse()).toEqual(t);
    }
  });

  it("formatValue is short and readable", () => {
    expect(formatValue(0.123456)).toBe("0.123");
    expect(formatValue(-2)).toBe("-2");
    expect(formatValue(12345.6)).toBe("12300");
    expect(formatValue(0.00001234)).toBe("1.23e-5");
    expect(formatValue(NaN)).toBe("NaN");
  });
});
