import { describe, expect, it } from "vitest";
import { filterMask, rankByAbs } from "../src/filter";

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
