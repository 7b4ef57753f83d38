// The status line every BaseWidget shows: progress while running, the error text on failure.
import { htmlEl } from "./dom";
import { AnyModel, listen } from "./model";

export function statusLine(model: AnyModel): { node: HTMLElement; dispose: () => void } {
  const node = htmlEl("div", "cw-status");
  const bar = htmlEl("progress", "cw-status-progress");
  bar.max = 1;
  const text = htmlEl("span", "cw-status-text");
  node.append(bar, text);
  const update = () => {
    const status: string = model.get("status") ?? "idle";
    const progress: number = model.get("progress") ?? 0;
    const error: string = model.get("error") ?? "";
    node.dataset.status = status;
    bar.value = progress;
    bar.hidden = status !== "running";
    if (status === "running") text.textContent = `running… ${Math.round(progress * 100)}%`;
    else if (status === "error") text.textContent = `error: ${error}`;
    else if (status === "cancelled") text.textContent = "cancelled (partial result shown)";
    else text.textContent = "";
    node.hidden = status === "idle" || status === "done";
  };
  update();
  return { node, dispose: listen(model, ["change:status", "change:progress", "change:error"], update) };
}
