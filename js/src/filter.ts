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

export interface SliderState { min: number; max: number; step: number; value: number; disabled: boolean; label: string }

/**
 * Ranges, positions and labels of the threshold and top-k sliders. The knob always agrees with
 * the label: "all" sits at the right end (also with fewer than 2 finite cells), and a threshold
 * above every |value| stretches the range so the knob shows it.
 */
export function sliderStates(scale: number, nFinite: number, threshold: number, topK: number,
  format: (v: number) => string): { threshold: SliderState; topK: SliderState } {
  const t = threshold > 0 ? threshold : 0;
  const thrMax = Math.max(scale > 0 ? scale : 0, t) || 1;
  const thr: SliderState = {
    min: 0, max: thrMax, step: (scale > 0 ? scale : thrMax) / 200, value: t, disabled: !(scale > 0), label: format(t),
  };
  const filtered = topK > 0 && topK < nFinite;
  const top: SliderState = nFinite < 2
    ? { min: 0, max: 1, step: 1, value: 1, disabled: true, label: "all" }
    : { min: 1, max: nFinite, step: 1, value: filtered ? topK : nFinite, disabled: false, label: filtered ? String(topK) : "all" };
  return { threshold: thr, topK: top };
}
