// The slice of anywidget's model API the views use (kept local: no runtime dependency).

export interface AnyModel {
  get(name: string): any;
  set(name: string, value: unknown): void;
  save_changes(): void;
  send(content: unknown, callbacks?: unknown, buffers?: unknown): void;
  on(event: string, callback: (...args: any[]) => void): void;
  off(event?: string | null, callback?: ((...args: any[]) => void) | null): void;
}

export interface RenderProps {
  model: AnyModel;
  el: HTMLElement;
}

/** Subscribes `callback` to events and returns one function that unsubscribes all of them. */
export function listen(model: AnyModel, events: string[], callback: () => void): () => void {
  for (const e of events) model.on(e, callback);
  return () => {
    for (const e of events) model.off(e, callback);
  };
}
