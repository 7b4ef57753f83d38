import { describe, expect, it } from "vitest";
import { describeCircuit, groupLines, kvLine, lambdaLabel } from "../src/labels";

describe("hover lines", () => {
  const kv = [[0, 1, 2], [3, 4, 5]];

  it("names the key/value group of a query-head column", () => {
    expect(kvLine(kv, false, 4)).toBe("kv 1, shared by q3-5");
    expect(kvLine(kv, false, 0)).toBe("kv 0, shared by q0-2");
    expect(kvLine(kv, false, 9)).toBe("");
  });

  it("names the query heads of a key/value-head column", () => {
    expect(kvLine(kv, true, 1)).toBe("kv 1, shared by q3-5");
    expect(kvLine([[0, 2], [1, 3]], true, 0)).toBe("kv 0, shared by q0, q2");
  });

  it("says nothing where no head is shared", () => {
    expect(kvLine([], false, 0)).toBe("");
    expect(kvLine([[0], [1]], true, 1)).toBe("");
    expect(kvLine(null, false, 0)).toBe("");
  });

  it("lists the named groups holding the head", () => {
    const groups = [
      { name: "movers", position: "END", heads: [[9, 6], [9, 9]] as [number, number][] },
      { name: "inhibit", position: "all", heads: [[7, 3]] as [number, number][] },
    ];
    expect(groupLines(groups, 9, 6)).toEqual(["group movers @ END"]);
    expect(groupLines(groups, 7, 3)).toEqual(["group inhibit @ all"]);
    expect(groupLines(groups, 7, 4)).toEqual([]);
    expect(groupLines([], 9, 6)).toEqual([]);
    // a key/value column stands for its query heads
    expect(groupLines(groups, 9, 1, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], true)).toEqual([]);
    expect(groupLines(groups, 9, 2, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], true)).toEqual(["group movers @ END"]);
  });

  it("describes a grouped circuit, or falls back to its heads", () => {
    expect(describeCircuit([], "1.3, 3.0")).toBe("1.3, 3.0");
    expect(describeCircuit([{ name: "A", position: "END", heads: [[1, 1]] }, { name: "B", heads: [[2, 0], [3, 1]] }], "-"))
      .toBe("A@END: 1.1 · B@all: 2.0, 3.1");
  });
});

describe("DCM lambda label", () => {
  it("says which lambda is shown and how much of the sweep is trained", () => {
    expect(lambdaLabel([0.01, 0.3], 2, 0.01, "done")).toBe("λ = 0.01 · 2 of 2 trained");
    expect(lambdaLabel([0.01, 0.3], 1, 0.01, "running")).toBe("λ = 0.01 · 1 of 2 trained (training…)");
    expect(lambdaLabel([0.01, 0.3, 1], 1, 0.01, "cancelled")).toBe("λ = 0.01 · 1 of 3 trained (cancelled)");
    expect(lambdaLabel([0.01, 0.3], 2, 0.3, "cancelled", false)).toBe("λ = 0.3 · 2 of 2 trained (this λ stopped early)");
    expect(lambdaLabel([0.01, 0.3], 0, undefined, "idle")).toBe("λ = 0.01, 0.3 · press Train");
  });
});
