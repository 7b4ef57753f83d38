// AttentionWidget's view: the tokens of one example (as text), an example slider, a clean /
// corrupt toggle, and circuitsvis' AttentionHeads for the heads shown. circuitsvis' renderer
// comes from the kernel once per page (see circuitsvis.ts).
import { headName, toNested, visibleToken } from "./attention_data";
import { loadCircuitsVis, loadCount, requestFromKernel } from "./circuitsvis";
import { decodeFloat32, WireArray } from "./codec";
import { htmlEl } from "./dom";
import { AnyModel, listen, RenderProps } from "./model";
import { statusLine } from "./status";
import { injectStyle } from "./style";

let instance = 0;

// circuitsvis sizes its charts once, when drawn: drawn inside a hidden tab they stay 0 px high.
// So draw when the host is in the page and shown (a ResizeObserver sees it appear).
function whenShown(node: HTMLElement, alive: () => boolean): Promise<boolean> {
  const shown = () => node.isConnected && node.getClientRects().length > 0;
  return new Promise((resolve) => {
    if (!alive()) return resolve(false);
    if (shown()) return resolve(true);
    const observer = new ResizeObserver(() => {
      if (!alive()) {
        observer.disconnect();
        resolve(false);
      } else if (shown()) {
        observer.disconnect();
        resolve(true);
      }
    });
    observer.observe(node);
  });
}

export function renderAttention(model: AnyModel, el: HTMLElement): () => void {
  injectStyle();
  const uid = `cw-att-${Date.now().toString(36)}-${instance++}`;
  const root = htmlEl("div", "cw-att");
  root.dataset.widget = "attention";

  const head = htmlEl("div", "cw-att-head");
  const title = htmlEl("div", "cw-att-title");
  const subtitle = htmlEl("div", "cw-att-subtitle");
  head.append(title, subtitle);

  const controls = htmlEl("div", "cw-hg-controls");
  const exLabel = htmlEl("label", "cw-hg-ctl", "example");
  const slider = htmlEl("input");
  slider.type = "range";
  slider.className = "cw-att-example";
  slider.min = "0";
  slider.step = "1";
  slider.setAttribute("aria-label", "example");
  const exOut = htmlEl("output", "cw-att-example-out");
  exLabel.append(slider, exOut);
  const promptLabel = htmlEl("label", "cw-hg-ctl", "prompt");
  const promptSel = htmlEl("select", "cw-att-prompt");
  for (const p of ["clean", "corrupt"]) promptSel.append(new Option(p, p));
  promptLabel.append(promptSel);
  controls.append(exLabel, promptLabel);

  const headsLine = htmlEl("div", "cw-att-heads");
  const tokensLine = htmlEl("div", "cw-att-tokens");
  tokensLine.setAttribute("aria-label", "tokens of the example");
  const vis = htmlEl("div", "cw-att-vis");
  const empty = htmlEl("div", "cw-att-empty");
  const EMPTY_TEXT = "Select heads (click them on a head grid) to see their attention patterns.";
  // the kernel computes the first patterns on its worker: until they arrive, say so
  function syncEmpty(): void {
    const wanted = ((model.get("heads") as number[][]) ?? []).length > 0;
    const loading = wanted && model.get("status") === "running";
    empty.textContent = loading ? "loading attention patterns…" : EMPTY_TEXT;
    empty.classList.toggle("cw-att-loading", loading);
  }
  const status = statusLine(model);
  root.append(head, controls, headsLine, tokensLine, vis, status.node);
  el.appendChild(root);

  let alive = true;
  let drawSeq = 0;
  root.dataset.draws = "0";

  function syncControls(): void {
    const n = Math.max(1, Number(model.get("n_examples")) || 1);
    slider.max = String(n - 1);
    slider.disabled = n < 2;
    slider.value = String(model.get("example") ?? 0);
    exOut.value = `${Number(model.get("example") ?? 0) + 1} / ${n}`;
    promptSel.value = String(model.get("prompt") ?? "clean");
  }

  function draw(): void {
    const tokens: string[] = (model.get("tokens") as string[]) ?? [];
    const labels: string[] = (model.get("head_labels") as string[]) ?? [];
    const shown: number[][] = (model.get("shown") as number[][]) ?? [];
    const arr = decodeFloat32(model.get("patterns") as WireArray | null);
    const text = String(model.get("title") ?? "");
    title.textContent = text;
    title.hidden = !text;
    const ex = Number(model.get("shown_example") ?? 0);
    subtitle.textContent = `example ${ex + 1} of ${model.get("n_examples")} · ${model.get("prompt")} prompt · ` +
      `${tokens.length} tokens · ${shown.length ? `heads ${shown.map(headName).join(", ")}` : "no heads"}`;
    headsLine.replaceChildren(...labels.map((l) => htmlEl("span", "cw-att-chip", l)));
    tokensLine.replaceChildren(...tokens.map((t, i) => {
      const chip = htmlEl("span", "cw-att-token", visibleToken(t));
      chip.title = `${i}: ${JSON.stringify(t)}`;
      return chip;
    }));
    const seq = ++drawSeq;
    if (!arr || arr.shape[0] === 0) {
      syncEmpty();
      vis.replaceChildren(empty);
      root.dataset.draws = String(seq);
      return;
    }
    const attention = toNested(arr.data as Float32Array, arr.shape);
    const host = htmlEl("div", "cw-att-cv");
    host.id = `${uid}-${seq}`;
    vis.replaceChildren(host);
    root.dataset.loading = "true";
    loadCircuitsVis(() => requestFromKernel(model))
      .then(async (cv) => {
        if (!(await whenShown(host, () => alive && seq === drawSeq))) return;
        cv.render(host.id, cv.AttentionHeads, {
          // short names fit circuitsvis' small head tiles; the chips above carry the full labels
          attention, tokens, attentionHeadNames: shown.map((p) => `L${p[0]}H${p[1]}`), maxValue: 1, minValue: 0, maskUpperTri: true,
        });
        root.dataset.loading = "false";
        root.dataset.draws = String(seq);
        root.dataset.cvLoads = String(loadCount());
      })
      .catch((err) => {
        root.dataset.loading = "false";
        const msg = htmlEl("div", "cw-att-error", `could not draw the attention patterns: ${err?.message ?? err}`);
        vis.replaceChildren(msg);
      });
  }

  slider.addEventListener("input", () => {
    exOut.value = `${Number(slider.value) + 1} / ${model.get("n_examples")}`;
  });
  slider.addEventListener("change", () => {
    model.set("example", Number(slider.value));
    model.save_changes();
  });
  promptSel.addEventListener("change", () => {
    model.set("prompt", promptSel.value);
    model.save_changes();
  });

  syncControls();
  draw();
  let queued = false;
  const scheduleDraw = () => {
    if (queued) return;
    queued = true;
    queueMicrotask(() => {
      queued = false;
      draw();
    });
  };
  const offs = [
    listen(model, ["change:patterns", "change:tokens", "change:head_labels", "change:shown", "change:title"], scheduleDraw),
    listen(model, ["change:example", "change:n_examples", "change:prompt"], syncControls),
    listen(model, ["change:status", "change:heads"], syncEmpty),
  ];
  return () => {
    alive = false;
    offs.forEach((off) => off());
    status.dispose();
  };
}

export default { render: ({ model, el }: RenderProps) => renderAttention(model, el) };
