// Composite views show child widgets (a HeadGridWidget inside PathPatchingWidget, ...): the
// kernel sends "IPY_MODEL_<id>" references; we ask the widget manager for each child's view.
import { AnyModel } from "./model";

export interface ChildView {
  el: HTMLElement;
  remove(): void;
}

export function modelId(ref: unknown): string | null {
  return typeof ref === "string" && ref.startsWith("IPY_MODEL_") ? ref.slice("IPY_MODEL_".length) : null;
}

/**
 * The child views of one composite view: `show(trait, host)` renders one, `dispose()` (from the
 * view's cleanup) removes them all, including any that finishes rendering after it.
 */
export function childViews(model: AnyModel) {
  const views: ChildView[] = [];
  let alive = true;
  return {
    show(name: string, host: HTMLElement): Promise<ChildView | null> {
      return renderChild(model, name, host).then((v) => {
        if (v && alive) views.push(v);
        else v?.remove();
        return v;
      });
    },
    dispose(): void {
      alive = false;
      views.splice(0).forEach((v) => v.remove());
    },
  };
}

/** Renders the widget referenced by trait `name` into `host`; returns its view (or null). */
export async function renderChild(model: AnyModel, name: string, host: HTMLElement): Promise<ChildView | null> {
  const id = modelId(model.get(name));
  const manager = (model as any).widget_manager;
  if (!id || !manager) return null;
  const child = await manager.get_model(id);
  const view = (await manager.create_view(child, {})) as ChildView;
  host.replaceChildren(view.el);
  // Lumino-based managers (JupyterLab) expect these messages for layout; harmless elsewhere.
  (view as any).trigger?.("displayed");
  return view;
}
