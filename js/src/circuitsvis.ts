// circuitsvis' own bundled renderer, loaded into the page once (not once per widget) from the
// kernel: the first view to render asks for it with a custom message, the rest await the same
// window-level promise. No CDN, no network: the source comes over the widget's comm.

export interface CircuitsVisLib {
  render(id: string, component: unknown, props: Record<string, unknown>): void;
  AttentionHeads: unknown;
  [name: string]: unknown;
}

export const LOADER_KEY = "__circuitWidgetsCircuitsVis";
export const SCRIPT_ID = "circuit-widgets-circuitsvis";

interface LoaderState {
  promise: Promise<CircuitsVisLib>;
  loads: number; // how many times the source was fetched and evaluated (1 per page)
}

type Win = Record<string, any>;

/** The library, fetching and evaluating it only if no other view on this page already did. */
export function loadCircuitsVis(
  fetchSource: () => Promise<string>,
  evaluate: (source: string) => Promise<CircuitsVisLib> = evaluateInPage,
  win: Win = window as unknown as Win,
): Promise<CircuitsVisLib> {
  const existing = win[LOADER_KEY] as LoaderState | undefined;
  if (existing) return existing.promise;
  const state: LoaderState = { promise: Promise.resolve(null as unknown as CircuitsVisLib), loads: 0 };
  state.promise = fetchSource()
    .then((src) => {
      state.loads += 1;
      return evaluate(src);
    })
    .catch((err) => {
      // forget the failure so that the next view can try again
      if (win[LOADER_KEY] === state) delete win[LOADER_KEY];
      throw err;
    });
  win[LOADER_KEY] = state;
  return state.promise;
}

/** Wraps the IIFE so its `var CircuitsVis` stays private, then hands the library back. */
export function wrapSource(source: string, resultKey: string): string {
  return `(function(){\n${source}\n;window[${JSON.stringify(resultKey)}]=CircuitsVis;\n})();\n`;
}

/** Evaluates the source as a classic script from a Blob URL (allowed wherever anywidget's own
 * Blob-URL ES modules are), once; resolves with the library. */
export function evaluateInPage(source: string): Promise<CircuitsVisLib> {
  const resultKey = `${LOADER_KEY}Lib`;
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(new Blob([wrapSource(source, resultKey)], { type: "text/javascript" }));
    const script = document.createElement("script");
    script.id = SCRIPT_ID;
    script.src = url;
    script.onload = () => {
      URL.revokeObjectURL(url);
      const lib = (window as unknown as Win)[resultKey] as CircuitsVisLib | undefined;
      if (lib && typeof lib.render === "function") resolve(lib);
      else reject(new Error("circuitsvis loaded but defined no renderer"));
    };
    script.onerror = () => {
      URL.revokeObjectURL(url);
      script.remove();
      reject(new Error("circuitsvis' renderer could not be evaluated"));
    };
    document.head.appendChild(script);
  });
}

/** Asks the kernel for the renderer's source over the widget's comm (a custom message). */
export function requestFromKernel(
  model: { send(content: unknown, callbacks?: unknown, buffers?: unknown): void; on(e: string, cb: (...a: any[]) => void): void; off(e: string, cb: (...a: any[]) => void): void },
  timeoutMs = 60_000,
): Promise<string> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      model.off("msg:custom", onMsg);
      reject(new Error("the kernel did not send circuitsvis' renderer (is it still running?)"));
    }, timeoutMs);
    function onMsg(msg: any, buffers?: (DataView | ArrayBuffer)[]) {
      if (!msg || msg.type !== "circuitsvis") return;
      clearTimeout(timer);
      model.off("msg:custom", onMsg);
      const buf = buffers && buffers[0];
      if (!buf) {
        reject(new Error("circuitsvis message without its source"));
        return;
      }
      const bytes = buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
      resolve(new TextDecoder("utf-8").decode(bytes));
    }
    model.on("msg:custom", onMsg);
    model.send({ type: "circuitsvis" });
  });
}

/** How many times this page fetched and evaluated the renderer (for tests). */
export function loadCount(win: Win = window as unknown as Win): number {
  const s = win[LOADER_KEY] as LoaderState | undefined;
  return s ? s.loads : 0;
}
