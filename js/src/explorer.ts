// CircuitExplorer's view: tabs around one shared circuit; each tab is a child widget's view.
import { childViews } from "./children";
import { htmlEl } from "./dom";
import { AnyModel, listen, RenderProps } from "./model";
import { describeCircuit, HeadGroup } from "./labels";
import { describe, Pair } from "./selection";
import { injectStyle } from "./style";

export function renderExplorer(model: AnyModel, el: HTMLElement): () => void {
  injectStyle();
  const root = htmlEl("div", "cw-ex");
  root.dataset.widget = "explorer";
  const circuit = htmlEl("div", "cw-ex-circuit");
  const bar = htmlEl("div", "cw-ex-tabs");
  bar.setAttribute("role", "tablist");
  const panes = htmlEl("div", "cw-ex-panes");
  root.append(circuit, bar, panes);
  el.appendChild(root);

  const names = (model.get("tab_names") as string[]) ?? [];
  const traits = (model.get("tab_traits") as string[]) ?? [];
  const buttons: HTMLButtonElement[] = [];
  const hosts: HTMLElement[] = [];
  names.forEach((name, i) => {
    const b = htmlEl("button", "cw-ex-tab", name);
    b.setAttribute("role", "tab");
    b.addEventListener("click", () => {
      model.set("tab", i);
      model.save_changes();
      show();
    });
    const host = htmlEl("div", "cw-ex-pane");
    host.setAttribute("role", "tabpanel");
    buttons.push(b);
    hosts.push(host);
  });
  bar.append(...buttons);
  panes.append(...hosts);

  function show(): void {
    const t = Number(model.get("tab") ?? 0);
    buttons.forEach((b, i) => b.setAttribute("aria-selected", String(i === t)));
    hosts.forEach((h, i) => (h.hidden = i !== t));
  }
  const syncCircuit = () => {
    const sel = ((model.get("selected") as Pair[]) ?? []);
    const groups = (model.get("groups") as HeadGroup[]) ?? [];
    circuit.textContent = `circuit (shared by every tab): ${describeCircuit(groups, describe(sel))}`;
  };
  show();
  syncCircuit();
  const children = childViews(model);
  traits.forEach((trait, i) => {
    children.show(trait, hosts[i]);
  });
  const offs = [listen(model, ["change:tab"], show), listen(model, ["change:selected", "change:groups"], syncCircuit)];
  return () => {
    offs.forEach((off) => off());
    children.dispose();
  };
}

export default { render: ({ model, el }: RenderProps) => renderExplorer(model, el) };
