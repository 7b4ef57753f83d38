// CMAPWidget's view: one toggle per circuit group, Run / Cancel, a bar chart of base / patched
// / fine-tuned accuracy per group, and the per-head CMAP grid (child view).
import { barChart } from "./chart";
import { childViews } from "./children";
import { runButtons } from "./controls";
import { decodeFloat32, WireArray } from "./codec";
import { htmlEl } from "./dom";
import { AnyModel, listen, RenderProps } from "./model";
import { statusLine } from "./status";
import { injectStyle } from "./style";

interface Group { name: string; position: string; heads: string[] }

export function renderCMAP(model: AnyModel, el: HTMLElement): () => void {
  injectStyle();
  const root = htmlEl("div", "cw-cmap");
  root.dataset.widget = "cmap";
  const toggles = htmlEl("div", "cw-hg-controls cw-cmap-groups");
  const controls = htmlEl("div", "cw-hg-controls");
  const buttons = runButtons(model);
  controls.append(buttons.run, buttons.cancel);
  const status = statusLine(model, true);
  const chartHost = htmlEl("div", "cw-cmap-chart cw-chart");
  const gridHost = htmlEl("div", "cw-cmap-grid");
  root.append(toggles, controls, status.node, chartHost, gridHost);
  el.appendChild(root);

  const drawToggles = () => {
    const groups = (model.get("groups") as Group[]) ?? [];
    const enabled = new Set((model.get("enabled") as string[]) ?? []);
    if (!groups.length) {
      toggles.replaceChildren(htmlEl("span", "cw-pp-note", "No circuit yet: select heads on a grid."));
      return;
    }
    toggles.replaceChildren(...groups.map((g) => {
      const wrap = htmlEl("label", "cw-hg-ctl");
      const box = htmlEl("input", "cw-cmap-toggle");
      box.type = "checkbox";
      box.checked = enabled.has(g.name);
      box.dataset.group = g.name;
      box.addEventListener("change", () => {
        const next = groups.map((x) => x.name).filter((n) => (n === g.name ? box.checked : enabled.has(n)));
        model.set("enabled", next);
        model.save_changes();
      });
      wrap.title = `${g.heads.length} heads at ${g.position}: ${g.heads.join(", ")}`;
      wrap.append(box, document.createTextNode(`${g.name} (${g.heads.length} @ ${g.position})`));
      return wrap;
    }));
  };
  const drawChart = () => {
    buttons.sync();
    const labels = (model.get("bar_labels") as string[]) ?? [];
    const bars = decodeFloat32(model.get("bars") as WireArray | null);
    if (!bars || !labels.length) {
      chartHost.replaceChildren(htmlEl("div", "cw-pp-note", "Press Run to patch the fine-tuned model's heads into the base model."));
      return;
    }
    chartHost.replaceChildren(barChart(bars.data as Float32Array, labels.length, labels, ["base", "patched: base + fine-tuned heads", "fine-tuned"], "accuracy per circuit group"));
  };
  drawToggles();
  drawChart();
  const children = childViews(model);
  children.show("grid", gridHost);
  const offs = [
    listen(model, ["change:groups", "change:enabled"], drawToggles),
    listen(model, ["change:bars", "change:bar_labels", "change:status"], drawChart),
  ];
  return () => {
    offs.forEach((off) => off());
    status.dispose();
    children.dispose();
  };
}

export default { render: ({ model, el }: RenderProps) => renderCMAP(model, el) };
