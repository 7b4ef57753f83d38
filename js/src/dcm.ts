// DCMWidget's view: Train / Cancel, the lambda slider, the learned mask on a head grid (child
// view), the loss curve of the lambda shown and its accuracies.
import { lineChart } from "./chart";
import { childViews } from "./children";
import { runButtons } from "./controls";
import { decodeFloat32, WireArray } from "./codec";
import { formatValue } from "./colors";
import { htmlEl } from "./dom";
import { lambdaLabel } from "./labels";
import { AnyModel, listen, RenderProps } from "./model";
import { statusLine } from "./status";
import { injectStyle } from "./style";

const pct = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(2) : "–");

export function renderDCM(model: AnyModel, el: HTMLElement): () => void {
  injectStyle();
  const root = htmlEl("div", "cw-dcm");
  root.dataset.widget = "dcm";
  const controls = htmlEl("div", "cw-hg-controls");
  const buttons = runButtons(model, "Train");
  const lamLabel = htmlEl("label", "cw-hg-ctl", "sparsity");
  const slider = htmlEl("input", "cw-dcm-lambda");
  slider.type = "range";
  slider.min = "0";
  slider.step = "1";
  slider.setAttribute("aria-label", "sparsity weight lambda");
  const lamOut = htmlEl("output", "cw-dcm-lambda-out");
  lamLabel.append(slider, lamOut);
  controls.append(buttons.run, buttons.cancel, lamLabel);
  const status = statusLine(model, true);
  const summary = htmlEl("div", "cw-pp-note cw-dcm-summary");
  // the mask's grid (only as wide as its figure) and the loss chart side by side, wrapping when narrow
  const panes = htmlEl("div", "cw-dcm-panes");
  const gridHost = htmlEl("div", "cw-dcm-grid");
  const curveHost = htmlEl("div", "cw-dcm-curve cw-chart");
  panes.append(gridHost, curveHost);
  root.append(controls, status.node, summary, panes);
  el.appendChild(root);

  const sync = () => {
    buttons.sync();
    const lams = (model.get("lams") as number[]) ?? [];
    const nDone = Number(model.get("n_done") ?? 0);
    const i = Number(model.get("lam_index") ?? 0);
    slider.max = String(Math.max(0, nDone - 1));
    slider.disabled = nDone < 2;
    slider.value = String(i);
    const s = (model.get("summary") as Record<string, unknown>) ?? {};
    const shownLam = typeof s.lam === "number" ? s.lam : lams[i];
    lamOut.value = lambdaLabel(lams, nDone, shownLam, String(model.get("status") ?? ""), s.complete !== false);
    summary.textContent = nDone
      ? `${model.get("desideratum")} @ ${model.get("position")}: ${s.n_selected} of ${s.n_heads} heads selected · accuracy ` +
        `train ${pct(s.train_accuracy)}, val ${pct(s.val_accuracy)}, test ${pct(s.test_accuracy)} ` +
        `(no patch ${pct(s.baseline_accuracy)}, every head patched ${pct(s.full_patch_accuracy)})`
      : model.get("status") === "cancelled"
        ? `${model.get("desideratum")} @ ${model.get("position")}: no result (cancelled before the first λ finished)`
        : `${model.get("desideratum")} @ ${model.get("position")}: not trained yet`;
    const loss = decodeFloat32(model.get("loss") as WireArray | null);
    curveHost.replaceChildren(lineChart(loss ? (loss.data as Float32Array) : new Float32Array(0), {
      title: nDone ? `training loss, λ = ${formatValue(shownLam)}` : "training loss", xLabel: "step", yLabel: "loss",
    }));
  };
  slider.addEventListener("input", () => {
    model.set("lam_index", Number(slider.value));
    model.save_changes();
  });
  sync();
  const children = childViews(model);
  children.show("grid", gridHost);
  const offs = [listen(model, ["change:status", "change:n_done", "change:lam_index", "change:summary", "change:loss", "change:lams"], sync)];
  return () => {
    offs.forEach((off) => off());
    status.dispose();
    children.dispose();
  };
}

export default { render: ({ model, el }: RenderProps) => renderDCM(model, el) };
