// Diverging blue-white-red scale, symmetric around 0 (ColorBrewer RdBu end points).

export const BLUE = "#2166ac";
export const RED = "#b2182b";
export const WHITE = "#ffffff";
export const NAN_COLOR = "#c8c8c8";

// Stops at -1, -0.5, 0, 0.5, 1 of the normalised value.
const STOPS: [number, number, number][] = [
  [0x21, 0x66, 0xac],
  [0x92, 0xc5, 0xde],
  [0xff, 0xff, 0xff],
  [0xf4, 0xa5, 0x82],
  [0xb2, 0x18, 0x2b],
];

function hex(r: number, g: number, b: number): string {
  return "#" + [r, g, b].map((c) => Math.round(c).toString(16).padStart(2, "0")).join("");
}

/** Largest |v| over finite values (0 when there are none). */
export function maxAbs(values: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < values.length; i++) {
    const a = Math.abs(values[i]);
    if (a > m && Number.isFinite(a)) m = a;
  }
  return m;
}

/** Colour of `v` on a scale from -scale (blue) through 0 (white) to +scale (red). */
export function divergingColor(v: number, scale: number): string {
  if (Number.isNaN(v)) return NAN_COLOR;
  if (!(scale > 0)) return WHITE;
  const t = Math.max(-1, Math.min(1, v / scale)); // -1..1, clamped (also +-Infinity)
  const x = (t + 1) * 2; // 0..4 over the stops
  const i = Math.min(3, Math.floor(x));
  const f = x - i;
  const a = STOPS[i];
  const b = STOPS[i + 1];
  return hex(a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f);
}

/** Colour of `v` on a sequential scale from 0 (white) to `scale` (red), for values that are
 * never negative (e.g. a DCM mask's 1 - m in [0, 1]); negatives clamp to white. */
export function sequentialColor(v: number, scale: number): string {
  if (Number.isNaN(v)) return NAN_COLOR;
  if (!(scale > 0)) return WHITE;
  return divergingColor(Math.max(0, v), scale);
}

/** Legend ticks of a sequential scale, ascending: 0, round numbers, the top end. */
export function sequentialTicks(scale: number): number[] {
  return legendTicks(scale).filter((t) => t >= 0);
}

/** Smallest 1, 2 or 5 x 10^n that is >= x. */
export function niceCeil(x: number): number {
  const base = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (m * base >= x * (1 - 1e-9)) return m * base;
  return 10 * base;
}

/**
 * Legend ticks, ascending: the ends of the scale (+-scale, the largest |value|), 0, and round
 * numbers in between (at most 3 on each side, none crowding an end).
 */
export function legendTicks(scale: number): number[] {
  if (!(scale > 0)) return [0];
  const step = niceCeil(scale / 3.5);
  const inner: number[] = [];
  for (let k = 1; k * step < scale * 0.85; k++) inner.push(Number((k * step).toPrecision(12)));
  return [-scale, ...inner.map((t) => -t).reverse(), 0, ...inner, scale];
}

/** Short, readable number: 3 significant digits, exponent for very small or large values. */
export function formatValue(v: number, digits = 3): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === 0) return "0";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(digits - 1).replace("e+", "e");
  return String(Number(v.toPrecision(digits)));
}
