// Selected heads as sorted, unique [layer, head] pairs (what the `selected` trait holds).

export type Pair = [number, number];

function key(p: Pair): number {
  return p[0] * 1_000_000 + p[1];
}

export function normalize(pairs: readonly Pair[]): Pair[] {
  const seen = new Map<number, Pair>();
  for (const p of pairs) seen.set(key(p), [p[0], p[1]]);
  return [...seen.values()].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
}

export function isSelected(selected: readonly Pair[], cell: Pair): boolean {
  return selected.some((p) => p[0] === cell[0] && p[1] === cell[1]);
}

/** A plain click selects only `cell`; an additive (shift) click toggles it in the selection. */
export function clickSelection(selected: readonly Pair[], cell: Pair, additive: boolean): Pair[] {
  if (!additive) return [[cell[0], cell[1]]];
  if (isSelected(selected, cell)) return normalize(selected.filter((p) => p[0] !== cell[0] || p[1] !== cell[1]));
  return normalize([...selected, cell]);
}

export function clearSelection(): Pair[] {
  return [];
}

export function sameSelection(a: readonly Pair[], b: readonly Pair[]): boolean {
  if (a.length !== b.length) return false;
  const na = normalize(a);
  const nb = normalize(b);
  return na.every((p, i) => p[0] === nb[i][0] && p[1] === nb[i][1]);
}

export function describe(selected: readonly Pair[]): string {
  return selected.length ? selected.map((p) => `${p[0]}.${p[1]}`).join(", ") : "(none)";
}
