import { describe, expect, it } from "vitest";
import { filterMask, rankByAbs, sliderStates } from "../src/filter";

const values = Float32Array.from([0.1, -0.9, NaN, 0.5, -0.2, 0.9]);

describe("filters", () => {
  it("rankByAbs orders finite cells by |v|, ties by index, NaN left out", () => {
    expect(Array.from(rankByAbs(values))).toEqual([1, 5, 3, 4, 0]);
  });

  it("no filter keeps everything bright", () => {
    expect(Array.from(filterMask(values, { threshold: 0, topK: 0 }))).toEqual([1, 1, 1, 1, 1, 1]);
  });

  it("threshold dims cells with |v| below it; NaN cells are left alone", () => {
    expect(Array.from(filterMask(values, { threshold: 0.5, topK: 0 }))).toEqual([0, 1, 1, 1, 0, 1]);
  });

  it("top-k keeps the k largest |v|", () => {
    expect(Array.from(filterMask(values, { threshold: 0, topK: 2 }))).toEqual([0, 1, 1, 0, 0, 1]);
    expect(Array.from(filterMask(values, { threshold: 0, topK: 5 }))).toEqual([1, 1, 1, 1, 1, 1]);
  });

  it("both filters combine, and a precomputed ranking gives the same mask", () => {
    const ranking = rankByAbs(values);
    const a = filterMask(values, { threshold: 0.15, topK: 4 });
    const b = filterMask(values, { threshold: 0.15, topK: 4 }, ranking);
    expect(Array.from(a)).toEqual([0, 1, 1, 1, 1, 1]);
    expect(Array.from(b)).toEqual(Array.from(a));
  });
});

describe("slider states", () => {
  const fmt = (v: number) => String(v);

  it("puts the top-k knob at the right end under 'all', also with fewer than 2 finite cells", () => {
    for (const n of [0, 1]) {
      const { topK } = sliderStates(0.5, n, 0, 0, fmt);
      expect(topK.label).toBe("all");
      expect(topK.value).toBe(topK.max);
      expect(topK.min).toBeLessThan(topK.max); // min == max would draw the knob at the left
      expect(topK.disabled).toBe(true);
    }
    const full = sliderStates(2, 30, 0, 0, fmt).topK;
    expect([full.min, full.max, full.value, full.label, full.disabled]).toEqual([1, 30, 30, "all", false]);
    const k3 = sliderStates(2, 30, 0, 3, fmt).topK;
    expect([k3.value, k3.label]).toEqual([3, "3"]);
    expect(sliderStates(2, 30, 0, 30, fmt).topK.label).toBe("all");
  });

  it("stretches the threshold range so a threshold above every value shows where it is", () => {
    const above = sliderStates(2, 30, 5, 0, fmt).threshold;
    expect([above.max, above.value, above.label]).toEqual([5, 5, "5"]);
    const inside = sliderStates(2, 30, 0.5, 0, fmt).threshold;
    expect([inside.min, inside.max, inside.value]).toEqual([0, 2, 0.5]);
    const none = sliderStates(0, 0, 0, 0, fmt).threshold;
    expect([none.max, none.value, none.disabled]).toEqual([1, 0, true]);
  });
});
