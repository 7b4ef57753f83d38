// Styles for the controls (the figure itself is a self-contained SVG with inline attributes,
// so that its SVG/PNG export looks the same as on screen).

const STYLE_ID = "circuit-widgets-style-v1";

const CSS = `
.cw-hg { display: flex; flex-direction: column; gap: 6px; font-family: var(--jp-ui-font-family, sans-serif);
  font-size: 12px; color: var(--jp-ui-font-color1, #222); max-width: 100%; }
.cw-hg-controls { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 14px; }
.cw-hg-ctl { display: inline-flex; align-items: center; gap: 4px; white-space: nowrap; }
.cw-hg-ctl input[type=range] { width: 100px; margin: 0 2px; }
.cw-hg-ctl output { min-width: 3.2em; font-variant-numeric: tabular-nums; }
.cw-hg-selection { display: inline-flex; align-items: center; gap: 6px; max-width: 26em; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
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
.cw-status { display: flex; align-items: center; gap: 8px; }
.cw-status[data-status=error] { color: var(--jp-error-color1, #c00); }
.cw-status progress { width: 160px; }
`;

export function injectStyle(): void {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}
