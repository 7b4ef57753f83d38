import { describe, expect, it } from "vitest";
import { clearSelection, clickSelection, describe as describeSel, normalize, sameSelection } from "../src/selection";

describe("selection", () => {
  it("a plain click selects exactly one head", () => {
    expect(clickSelection([], [3, 1], false)).toEqual([[3, 1]]);
    expect(clickSelection([[0, 0], [5, 2]], [3, 1], false)).toEqual([[3, 1]]);
  });

  it("shift-click adds a head, and removes it when clicked again", () => {
    let sel = clickSelection([], [9, 6], false);
    sel = clickSelection(sel, [9, 9], true);
    sel = clickSelection(sel, [0, 1], true);
    expect(sel).toEqual([[0, 1], [9, 6], [9, 9]]); // sorted by layer, then head
    sel = clickSelection(sel, [9, 6], true);
    expect(sel).toEqual([[0, 1], [9, 9]]);
  });

  it("clear empties the selection", () => {
    expect(clearSelection()).toEqual([]);
  });

  it("normalize sorts and removes duplicates; sameSelection ignores order", () => {
    expect(normalize([[2, 1], [0, 3], [2, 1]])).toEqual([[0, 3], [2, 1]]);
    expect(sameSelection([[2, 1], [0, 3]], [[0, 3], [2, 1]])).toBe(true);
    expect(sameSelection([[2, 1]], [[2, 2]])).toBe(false);
    expect(describeSel([[0, 3], [2, 1]])).toBe("0.3, 2.1");
    expect(describeSel([])).toBe("(none)");
  });
});
