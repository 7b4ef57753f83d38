// Binary ndarray codec: the Python side sends {view: memoryview, dtype, shape}; ipywidgets
// hands the view to us as a DataView. We turn it into a typed array without copying when
// the bytes are aligned.

export type NumericArray =
  | Float32Array
  | Float64Array
  | Int8Array
  | Int16Array
  | Int32Array
  | Uint8Array
  | Uint16Array
  | Uint32Array;

type BufferLike = DataView | ArrayBuffer | ArrayBufferView;

/** What arrives from the kernel; `buffer` is accepted as an alias of `view`. */
export interface WireArray {
  view?: BufferLike;
  buffer?: BufferLike;
  dtype: string;
  shape: number[];
}

export interface NdArray {
  data: NumericArray;
  dtype: string;
  shape: number[];
}

const CTORS: Record<string, { new (b: ArrayBuffer, o: number, n: number): NumericArray; BYTES_PER_ELEMENT: number }> = {
  float32: Float32Array,
  float64: Float64Array,
  int8: Int8Array,
  int16: Int16Array,
  int32: Int32Array,
  uint8: Uint8Array,
  uint16: Uint16Array,
  uint32: Uint32Array,
};

export function size(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

export function decodeArray(wire: WireArray): NdArray {
  const source = wire.view ?? wire.buffer;
  const Ctor = CTORS[wire.dtype];
  if (!Ctor) throw new Error(`unsupported dtype ${JSON.stringify(wire.dtype)}`);
  if (source == null) throw new Error("array message has no `view`");
  let buffer: ArrayBuffer;
  let offset = 0;
  let bytes: number;
  if (source instanceof ArrayBuffer) {
    buffer = source;
    bytes = source.byteLength;
  } else {
    buffer = source.buffer as ArrayBuffer;
    offset = source.byteOffset;
    bytes = source.byteLength;
  }
  const n = size(wire.shape);
  if (bytes !== n * Ctor.BYTES_PER_ELEMENT) {
    throw new Error(
      `array of shape [${wire.shape}] and dtype ${wire.dtype} needs ${n * Ctor.BYTES_PER_ELEMENT} bytes, got ${bytes}`,
    );
  }
  if (offset % Ctor.BYTES_PER_ELEMENT !== 0) {
    // Typed arrays need aligned offsets; copy the bytes once.
    buffer = buffer.slice(offset, offset + bytes);
    offset = 0;
  }
  return { data: new Ctor(buffer, offset, n), dtype: wire.dtype, shape: [...wire.shape] };
}

/** Float32 view of a value that may be absent (null/undefined -> null). */
export function decodeFloat32(wire: WireArray | null | undefined): NdArray | null {
  if (wire == null) return null;
  const arr = decodeArray(wire);
  if (!(arr.data instanceof Float32Array)) arr.data = Float32Array.from(arr.data);
  arr.dtype = "float32";
  return arr;
}
