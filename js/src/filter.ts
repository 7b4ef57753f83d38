// Display-only filters: which cells stay bright. NaN cells (not computed) are never dimmed;
// they already have their own look.

export interface FilterOptions {
  /** Cells with |v| below this are dimmed (0 = off). */
  threshold: number;
  /** Only the k cells with the largest |v| stay bright (0 = off). */
  topK: number;
}

/** Indices of finite values ordered by |v|, largest first; ties keep index order. */
export function rankByAbs(values: ArrayLike<number>): Int32Array {
  const idx: number[] = [];
  for (let i = 0; i < values.length; i++) if (Number.isFinite(values[i])) idx.push(i);
  idx.sort((a, b) => Math.abs(values[b]) - Math.abs(values[a]) || a - b);
  return Int32Array.from(idx);
}

/**
 * 1 where the cell is shown normally, 0 where it is dimmed. Pass `ranking` (from rankByAbs)
 * to avoid sorting on every slider move.
 */
export function filterMask(values: ArrayLike<number>, opts: FilterOptions, ranking?: Int32Array): Uint8Array {
  const n = values.length;
  const mask = new Uint8Array(n).fill(1);
  const threshold = opts.threshold > 0 ? opts.threshold : 0;
  if (threshold > 0) {
    for (let i = 0; i < n; i++) {
      const v = values[i];
      if (!Number.isNaN(v) && Math.abs(v) < threshold) mask[i] = 0;
    }
  }
  const order = ranking ?? rankByAbs(values);
  if (opts.topK > 0 && opts.topK < order.length) {
    for (let r = opts.topK; r < order.length; r++) mask[order[r]] = 0;
  }
  return mask;
}
