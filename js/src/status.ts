// The status line every BaseWidget shows: progress while running, the error text on failure.
import { htmlEl } from "./dom";
import { AnyModel, listen } from "./model";

/** `reserve`: keep the line's height while it has nothing to say, so that the widget below it
 * does not jump when a run starts (for widgets with a Run button). */
export function statusLine(model: AnyModel, reserve = false): { node: HTMLElement; dispose: () => void } {
  const node = htmlEl("div", "cw-status");
  const bar = htmlEl("progress", "cw-status-progress");
  bar.max = 1;
  const text = htmlEl("span", "cw-status-text");
  node.append(bar, text);
  const update = () => {
    const status = String(model.get("status") ?? "idle");
    const progress = Number(model.get("progress") ?? 0);
    const error = String(model.get("error") ?? "");
    const message = String(model.get("message") ?? "");
    node.dataset.status = status;
    bar.value = progress;
    bar.hidden = status !== "running";
    let line = "";
    if (status === "running") line = `running… ${Math.round(progress * 100)}%`;
    else if (status === "error") line = `error: ${error}`;
    else if (status === "cancelled") line = "cancelled (partial result shown)";
    text.textContent = [line, message].filter(Boolean).join(" · ");
    const quiet = (status === "idle" || status === "done") && !message;
    if (reserve) node.style.visibility = quiet ? "hidden" : "";
    else node.hidden = quiet;
  };
  update();
  return { node, dispose: listen(model, ["change:status", "change:progress", "change:error", "change:message"], update) };
}
