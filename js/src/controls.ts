// Small form controls shared by the composite views; every label goes in as text.
import { htmlEl } from "./dom";
import { AnyModel } from "./model";

/** A <select> bound to a string trait; `options` are [value, label] pairs. */
export function boundSelect(model: AnyModel, trait: string, label: string, options: [string, string][], cls: string) {
  const wrap = htmlEl("label", "cw-hg-ctl", label);
  const sel = htmlEl("select", cls);
  const fill = (opts: [string, string][]) => {
    sel.replaceChildren(...opts.map(([v, l]) => new Option(l, v)));
    sel.value = String(model.get(trait) ?? "");
  };
  fill(options);
  wrap.append(sel);
  sel.addEventListener("change", () => {
    model.set(trait, sel.value);
    model.save_changes();
  });
  return { node: wrap, select: sel, refill: fill, sync: () => { sel.value = String(model.get(trait) ?? ""); } };
}

/** A checkbox bound to a bool trait. */
export function boundCheckbox(model: AnyModel, trait: string, label: string, cls: string) {
  const wrap = htmlEl("label", "cw-hg-ctl");
  const box = htmlEl("input", cls);
  box.type = "checkbox";
  box.checked = Boolean(model.get(trait));
  wrap.append(box, document.createTextNode(label));
  box.addEventListener("change", () => {
    model.set(trait, box.checked);
    model.save_changes();
  });
  return { node: wrap, input: box, sync: () => { box.checked = Boolean(model.get(trait)); } };
}

/** Run / Cancel buttons that send {type: "run"} / {type: "cancel"} and follow `status`. */
export function runButtons(model: AnyModel, runLabel = "Run") {
  const run = htmlEl("button", "cw-run cw-primary", runLabel);
  const cancel = htmlEl("button", "cw-cancel", "Cancel");
  run.addEventListener("click", () => model.send({ type: "run" }));
  cancel.addEventListener("click", () => model.send({ type: "cancel" }));
  const sync = () => {
    const running = model.get("status") === "running";
    run.disabled = running;
    cancel.disabled = !running;
  };
  sync();
  return { run, cancel, sync };
}
