// Text of hover lines and control labels, pure (unit-tested); the views put it in as text.
import { formatValue } from "./colors";

export interface HeadGroup { name: string; position?: string; heads: [number, number][] }

function span(qs: number[]): string {
  if (!qs.length) return "";
  const sorted = [...qs].sort((a, b) => a - b);
  const run = sorted.every((q, i) => i === 0 || q === sorted[i - 1] + 1);
  return run && sorted.length > 1 ? `q${sorted[0]}-${sorted[sorted.length - 1]}` : sorted.map((q) => `q${q}`).join(", ");
}

/** "kv 1, shared by q3-5" for column `col` of a grouped-query grid; "" where nothing is shared. */
export function kvLine(kvGroups: readonly number[][] | null | undefined, kvColumns: boolean, col: number): string {
  if (!kvGroups || !kvGroups.length || !kvGroups.some((g) => g.length > 1)) return "";
  const kv = kvColumns ? col : kvGroups.findIndex((g) => g.includes(col));
  if (kv < 0 || kv >= kvGroups.length) return "";
  return `kv ${kv}, shared by ${span(kvGroups[kv])}`;
}

/** One "group <name> @ <position>" line per named group that holds the head in this cell. On a
 * key/value-head grid a cell stands for its whole group of query heads. */
export function groupLines(groups: readonly HeadGroup[] | null | undefined, layer: number, col: number,
  kvGroups?: readonly number[][] | null, kvColumns = false): string[] {
  if (!groups || !groups.length) return [];
  const heads = kvColumns && kvGroups && col < kvGroups.length ? kvGroups[col] : [col];
  return groups
    .filter((g) => Array.isArray(g.heads) && g.heads.some((p) => p[0] === layer && heads.includes(p[1])))
    .map((g) => `group ${g.name} @ ${g.position || "all"}`);
}

/** The circuit as text: "1.3, 3.0", or per named group "A@END: 1.1 · B@all: 2.0". */
export function describeCircuit(groups: readonly HeadGroup[] | null | undefined, fallback: string): string {
  if (!groups || !groups.length) return fallback;
  return groups.map((g) => `${g.name}@${g.position || "all"}: ${g.heads.map((p) => `${p[0]}.${p[1]}`).join(", ")}`).join(" · ");
}

export interface SubtitleInput {
  kind: string;
  component: string;
  position: string;
  complete: boolean;
  nFinite: number;
  nPending: number;
  total: number; // cells that can hold a value (e.g. only the possible senders of path patching)
}

/** The grid's subtitle: what was measured, where, and how much of it is computed. */
export function gridSubtitle(s: SubtitleInput): string {
  const where = s.component && s.position ? `${s.component} @ ${s.position}` : s.component || (s.position ? `@ ${s.position}` : "");
  const parts = [s.kind, where].filter(Boolean);
  if (!s.complete) {
    parts.push(s.nPending
      ? `exact: ${s.nFinite - s.nPending} of ${s.total} heads, the rest a preview`
      : `partial: ${s.nFinite} of ${s.total} heads computed`);
  }
  return parts.join(" · ");
}

/** The DCM lambda slider's label: which lambda is shown and how much of the sweep is trained. */
export function lambdaLabel(lams: readonly number[], nDone: number, shownLam: number | undefined,
  status: string, shownComplete = true): string {
  if (!nDone) return `λ = ${lams.map((l) => formatValue(l)).join(", ")} · press Train`;
  const lam = typeof shownLam === "number" ? shownLam : lams[0];
  let text = `λ = ${formatValue(lam)} · ${nDone} of ${lams.length} trained`;
  if (status === "running") text += " (training…)";
  else if (!shownComplete) text += " (this λ stopped early)";
  else if (status === "cancelled" && nDone < lams.length) text += " (cancelled)";
  return text;
}
