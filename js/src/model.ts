// anywidget's model and render-props types (a type-only import: nothing of it ships in the bundles).
import type { AnyModel as Model, RenderProps as Props } from "@anywidget/types";

/** Trait values as the views see them: unknown until checked (the kernel owns their shapes). */
export type Traits = Record<string, unknown>;
export type AnyModel = Model<Traits>;
export type RenderProps = Props<Traits>;

/** Subscribes `callback` to events and returns one function that unsubscribes all of them. */
export function listen(model: AnyModel, events: string[], callback: () => void): () => void {
  for (const e of events) model.on(e, callback);
  return () => {
    for (const e of events) model.off(e, callback);
  };
}
