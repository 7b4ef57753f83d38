// PathPatchingWidget's view: receivers, position, freeze-MLPs, Run / Cancel and progress above
// the result grid (a HeadGridWidget child view) and the attention of the selected heads.
import { childViews } from "./children";
import { boundCheckbox, boundSelect, runButtons } from "./controls";
import { htmlEl } from "./dom";
import { AnyModel, listen, RenderProps } from "./model";
import { statusLine } from "./status";
import { injectStyle } from "./style";

export function renderPathPatching(model: AnyModel, el: HTMLElement): () => void {
  injectStyle();
  const root = htmlEl("div", "cw-pp");
  root.dataset.widget = "path-patching";
  const controls = htmlEl("div", "cw-hg-controls cw-pp-controls");
  const recv = boundSelect(model, "receivers", "receivers", [["logits", "logits"], ["selected", "selected heads"]], "cw-pp-receivers");
  const input = boundSelect(model, "receiver_input", "via", [["q", "query"], ["k", "key"], ["v", "value"]], "cw-pp-input");
  const posOptions = () => ((model.get("position_options") as string[]) ?? []).map((p) => [p, p] as [string, string]);
  const pos = boundSelect(model, "position", "position", posOptions(), "cw-pp-position");
  const freeze = boundCheckbox(model, "freeze_mlps", "freeze MLPs", "cw-pp-freeze");
  const preview = boundCheckbox(model, "preview", "preview", "cw-pp-preview");
  preview.node.title = "show an attribution-patching estimate at once, then exact values as they arrive";
  const buttons = runButtons(model);
  controls.append(recv.node, input.node, pos.node, freeze.node, preview.node, buttons.run, buttons.cancel);
  const note = htmlEl("div", "cw-pp-note");
  const status = statusLine(model, true);
  const gridHost = htmlEl("div", "cw-pp-grid");
  const attHost = htmlEl("div", "cw-pp-attention");
  root.append(controls, status.node, note, gridHost, attHost);
  el.appendChild(root);

  const sync = () => {
    recv.sync();
    input.sync();
    input.select.disabled = model.get("receivers") !== "selected";
    freeze.sync();
    preview.sync();
    buttons.sync();
    const r = String(model.get("run_receivers") || "");
    const phase = String(model.get("phase") || "");
    note.textContent = r
      ? `grid: senders → ${r}${phase === "preview" ? " (attribution preview)" : ""}`
      : "Choose receivers (click heads on the grid, then 'selected heads'), then Run.";
  };
  sync();
  const children = childViews(model);
  Promise.all([children.show("grid", gridHost), children.show("attention", attHost)])
    .catch((err) => {
      gridHost.textContent = `could not show the grid: ${err?.message ?? err}`;
    });
  const offs = [
    listen(model, ["change:receivers", "change:receiver_input", "change:freeze_mlps", "change:preview",
      "change:status", "change:run_receivers", "change:phase"], sync),
    listen(model, ["change:position_options"], () => pos.refill(posOptions())),
    listen(model, ["change:position"], () => pos.sync()),
  ];
  return () => {
    offs.forEach((off) => off());
    status.dispose();
    children.dispose();
  };
}

export default { render: ({ model, el }: RenderProps) => renderPathPatching(model, el) };
