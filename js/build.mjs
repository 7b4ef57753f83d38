// Bundles each widget's view into one self-contained ESM file in circuit_widgets/static/.
// One file per widget, no shared chunks: anywidget loads `_esm` from a Blob URL, where a
// relative import of a shared chunk could not be resolved. The list of widgets lives in
// package.json ("circuitWidgets"), which hatch_build.py reads too.
import { build } from "esbuild";
import { mkdirSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const { entries, outdir: out } = JSON.parse(readFileSync(resolve(here, "package.json"), "utf8")).circuitWidgets;
const outdir = resolve(here, out);

mkdirSync(outdir, { recursive: true });
await build({
  entryPoints: Object.fromEntries(entries.map((w) => [w, resolve(here, "src", `${w}.ts`)])),
  outdir,
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: process.argv.includes("--minify"),
  legalComments: "none",
  logLevel: "info",
});
