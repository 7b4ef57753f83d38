// Pure helpers of the attention view (unit-tested).

/** [n, s, s] float32 -> nested arrays for circuitsvis (n x query x key). */
export function toNested(data: Float32Array, shape: readonly number[]): number[][][] {
  if (shape.length !== 3) throw new Error(`patterns must be 3-D, got shape [${shape}]`);
  const [n, q, k] = shape;
  if (data.length !== n * q * k) throw new Error(`patterns of shape [${shape}] need ${n * q * k} values, got ${data.length}`);
  const out: number[][][] = [];
  for (let h = 0; h < n; h++) {
    const rows: number[][] = [];
    for (let i = 0; i < q; i++) {
      const base = (h * q + i) * k;
      rows.push(Array.from(data.subarray(base, base + k)));
    }
    out.push(rows);
  }
  return out;
}

/** A token as it reads on screen: leading/trailing spaces and line breaks made visible. */
export function visibleToken(token: string): string {
  return token.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "·").replace(/ $/, "·") || "∅";
}

/** Short label of a head pair. */
export function headName(pair: readonly number[]): string {
  return `${pair[0]}.${pair[1]}`;
}
