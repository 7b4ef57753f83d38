import { describe, expect, it } from "vitest";
import { decodeArray, decodeFloat32 } from "../src/codec";

describe("decodeArray", () => {
  it("reads a float32 DataView as a typed array of the given shape", () => {
    const src = new Float32Array([0, 1.5, -2, 3.25, NaN, 6]);
    const out = decodeArray({ view: new DataView(src.buffer), dtype: "float32", shape: [2, 3] });
    expect(out.data).toBeInstanceOf(Float32Array);
    expect(out.shape).toEqual([2, 3]);
    expect(Array.from(out.data).slice(0, 4)).toEqual([0, 1.5, -2, 3.25]);
    expect(Number.isNaN(out.data[4])).toBe(true);
  });

  it("accepts `buffer` as well as `view`, and ArrayBuffers and typed arrays", () => {
    const src = new Float64Array([1, 2, 3, 4]);
    expect(Array.from(decodeArray({ buffer: src.buffer, dtype: "float64", shape: [4] }).data)).toEqual([1, 2, 3, 4]);
    const ints = new Int32Array([7, -8]);
    expect(Array.from(decodeArray({ view: ints, dtype: "int32", shape: [2] }).data)).toEqual([7, -8]);
  });

  it("does not copy aligned views, and copies unaligned ones correctly", () => {
    const src = new Float32Array([9, 8, 7]);
    const aligned = decodeArray({ view: new DataView(src.buffer, 4, 8), dtype: "float32", shape: [2] });
    expect(aligned.data.buffer).toBe(src.buffer);
    expect(Array.from(aligned.data)).toEqual([8, 7]);

    const bytes = new Uint8Array(1 + 8);
    new DataView(bytes.buffer).setFloat32(1, 0.5, true);
    new DataView(bytes.buffer).setFloat32(5, -4, true);
    const unaligned = decodeArray({ view: new DataView(bytes.buffer, 1, 8), dtype: "float32", shape: [1, 2] });
    expect(Array.from(unaligned.data)).toEqual([0.5, -4]);
  });

  it("rejects wrong sizes and unknown dtypes with a clear message", () => {
    const src = new Float32Array(5);
    expect(() => decodeArray({ view: new DataView(src.buffer), dtype: "float32", shape: [2, 3] })).toThrow(/needs 24 bytes, got 20/);
    expect(() => decodeArray({ view: new DataView(src.buffer), dtype: "complex64", shape: [5] })).toThrow(/unsupported dtype/);
  });

  it("decodeFloat32 passes null through and converts other dtypes", () => {
    expect(decodeFloat32(null)).toBeNull();
    const out = decodeFloat32({ view: new Float64Array([1, 2]), dtype: "float64", shape: [2] })!;
    expect(out.data).toBeInstanceOf(Float32Array);
    expect(Array.from(out.data)).toEqual([1, 2]);
  });
});
