import { describe, expect, it } from "vitest";
import { headName, toNested, visibleToken } from "../src/attention_data";

describe("attention data", () => {
  it("unpacks [n, q, k] float32 into head x query x key arrays", () => {
    const data = Float32Array.from({ length: 2 * 2 * 3 }, (_, i) => i);
    expect(toNested(data, [2, 2, 3])).toEqual([
      [[0, 1, 2], [3, 4, 5]],
      [[6, 7, 8], [9, 10, 11]],
    ]);
    expect(toNested(new Float32Array(0), [0, 5, 5])).toEqual([]);
    expect(() => toNested(new Float32Array(3), [1, 2, 2])).toThrow("need 4 values, got 3");
    expect(() => toNested(new Float32Array(4), [2, 2])).toThrow("must be 3-D");
  });

  it("makes edge spaces and line breaks visible, and keeps markup as plain characters", () => {
    expect(visibleToken(" Mary")).toBe("·Mary");
    expect(visibleToken("a\nb")).toBe("a↵b");
    expect(visibleToken("")).toBe("∅");
    expect(visibleToken("<script>")).toBe("<script>");
    expect(headName([9, 6])).toBe("9.6");
  });
});
