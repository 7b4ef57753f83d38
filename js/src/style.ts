// Styles for the controls (the figure itself is a self-contained SVG with inline attributes,
// so that its SVG/PNG export looks the same as on screen).

const STYLE_ID = "circuit-widgets-style-v5";

const CSS = `
.cw-hg { display: flex; flex-direction: column; gap: 6px; font-family: var(--jp-ui-font-family, sans-serif);
  font-size: 12px; color: var(--jp-ui-font-color1, #222); max-width: 100%; }
.cw-hg-controls { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 14px; }
.cw-hg-ctl { display: inline-flex; align-items: center; gap: 4px; white-space: nowrap; }
.cw-hg-ctl input[type=range] { width: 100px; margin: 0 2px; }
.cw-hg-ctl output { min-width: 3.2em; font-variant-numeric: tabular-nums; }
.cw-hg-selection { display: inline-flex; align-items: center; gap: 6px; max-width: 26em; min-width: 0; white-space: nowrap; }
.cw-hg-selection-text { overflow: hidden; text-overflow: ellipsis; min-width: 0; }
.cw-hg button { font: inherit; padding: 1px 8px; cursor: pointer; border-radius: 3px;
  border: 1px solid var(--jp-border-color1, #bbb); background: var(--jp-layout-color2, #f2f2f2);
  color: var(--jp-ui-font-color1, #222); }
.cw-hg button:hover { background: var(--jp-layout-color3, #e0e0e0); }
.cw-hg-figure { position: relative; overflow-x: auto; overflow-y: hidden; max-width: 100%; }
.cw-hg-figure svg { display: block; background: #fff; }
.cw-hg-figure svg .cw-cell { cursor: pointer; }
.cw-hg-tooltip { position: absolute; z-index: 10; pointer-events: none; padding: 4px 8px; border-radius: 3px;
  background: rgba(20, 20, 20, 0.92); color: #fff; font-size: 12px; line-height: 1.35; white-space: pre;
  box-shadow: 0 1px 4px rgba(0,0,0,0.3); }
.cw-hg-tooltip .cw-tt-head { font-weight: 600; }
.cw-status { display: flex; align-items: center; gap: 8px; min-height: 20px; }
.cw-status[data-status=error] { color: var(--jp-error-color1, #c00); }
.cw-status progress { width: 160px; }
.cw-att, .cw-pp, .cw-dcm, .cw-cmap, .cw-ex { display: flex; flex-direction: column; gap: 6px; max-width: 100%;
  font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px; color: var(--jp-ui-font-color1, #222); }
.cw-att-title, .cw-pp-title { font-size: 14px; font-weight: bold; }
.cw-att-subtitle, .cw-pp-note { color: var(--jp-ui-font-color2, #555); }
.cw-att-heads, .cw-att-tokens { display: flex; flex-wrap: wrap; gap: 3px; }
.cw-att-chip { padding: 1px 6px; border-radius: 8px; background: #e8eef7; color: #1b3f6e; font-size: 11px; }
.cw-att-token { padding: 0 4px; border: 1px solid #d6d6d6; border-radius: 3px; background: #fafafa;
  font-family: var(--jp-code-font-family, monospace); font-size: 11px; white-space: pre; }
.cw-att-vis { min-height: 40px; position: relative; }
.cw-att-cv { max-width: 560px; padding: 0 0 6px 28px; }
.cw-att-empty { color: #777; font-style: italic; padding: 8px 0; }
.cw-att-empty.cw-att-loading { color: var(--jp-ui-font-color2, #555); }
.cw-att-error { color: var(--jp-error-color1, #c00); }
.cw-att select, .cw-pp select, .cw-dcm select { font: inherit; }
.cw-pp button, .cw-dcm button, .cw-cmap button, .cw-att button { font: inherit; padding: 1px 10px; cursor: pointer;
  border-radius: 3px; border: 1px solid var(--jp-border-color1, #bbb); background: var(--jp-layout-color2, #f2f2f2);
  color: var(--jp-ui-font-color1, #222); }
.cw-pp button.cw-primary, .cw-dcm button.cw-primary, .cw-cmap button.cw-primary { background: #2166ac; border-color: #1b528a; color: #fff; }
.cw-pp button:disabled, .cw-dcm button:disabled, .cw-cmap button:disabled { opacity: 0.5; cursor: default; }
.cw-pp-panes { display: flex; flex-direction: column; gap: 10px; }
.cw-section-title { font-weight: 600; margin-top: 4px; }
.cw-ex-tabs { display: flex; gap: 2px; border-bottom: 1px solid var(--jp-border-color1, #bbb); }
.cw-ex-tab { font: inherit; padding: 4px 14px; cursor: pointer; border: 1px solid transparent; border-bottom: none;
  background: transparent; color: var(--jp-ui-font-color2, #555); border-radius: 4px 4px 0 0; }
.cw-ex-tab[aria-selected=true] { border-color: var(--jp-border-color1, #bbb); background: var(--jp-layout-color0, #fff);
  color: var(--jp-ui-font-color1, #222); font-weight: 600; margin-bottom: -1px; }
.cw-ex-circuit { color: var(--jp-ui-font-color2, #555); }
.cw-chart svg { display: block; background: #fff; }
.cw-dcm-panes { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 10px 18px; }
.cw-dcm-grid { width: min-content; max-width: 100%; }
.cw-dcm-curve { flex: 1 1 260px; min-width: 240px; max-width: 360px; }
.cw-dcm-curve svg { width: 100%; height: auto; }
`;

export function injectStyle(): void {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}
