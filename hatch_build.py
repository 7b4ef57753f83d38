"""Hatch build hook: build the widgets' JavaScript (js/ -> circuit_widgets/static/) for wheels and sdists.

A wheel build runs `npm ci` (when node_modules is missing or older than the lock file) and
`npm run build` whenever a bundle is missing or older than its sources; the bundles are
git-ignored and enter the wheel as artifacts (pyproject.toml). Editable installs serve
static/ from the checkout, which `bash scripts/dev setup` builds, so they are not built here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HINT = (
    "install Node.js 18+ with npm, or build the front end first: cd js && npm ci && npm run build"
)


class JSBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name not in ("wheel", "sdist"):
            return
        root = Path(self.root)
        js = root / "js"
        static = root / "circuit_widgets" / "static"
        if not (js / "package.json").is_file() or (
            not (js / "node_modules").exists() and any(static.glob("*.js"))
        ):  # an sdist: its bundles were built when it was made
            if not any(static.glob("*.js")):
                raise RuntimeError(f"no js/ sources and no built bundles in {static}")
            return
        config = json.loads((js / "package.json").read_text(encoding="utf-8"))["circuitWidgets"]
        outputs = [(js / config["outdir"] / f"{name}.js").resolve() for name in config["entries"]]
        stale = _stale(js, outputs)
        if version == "editable":
            if stale:
                self.app.display_warning(
                    "circuit_widgets: the widgets' JavaScript is missing or stale in circuit_widgets/"
                    "static/; run `bash scripts/dev setup` or `cd js && npm ci && npm run build`"
                )
            return
        if not stale:
            self.app.display_info("circuit_widgets: widget bundles are up to date")
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"building circuit_widgets' widgets needs npm, which was not found; {HINT}"
            )
        lock = js / "package-lock.json"
        marker = js / "node_modules" / ".package-lock.json"  # npm rewrites it on every install
        if not marker.is_file() or marker.stat().st_mtime < lock.stat().st_mtime:
            self._run([npm, "ci", "--no-audit", "--no-fund"], js)
        self._run([npm, "run", "build"], js)
        still = [str(p) for p in outputs if not p.is_file()]
        if still:
            raise RuntimeError(f"`npm run build` did not write {', '.join(still)}")

    def _run(self, cmd: list[str], cwd: Path) -> None:
        self.app.display_info(f"circuit_widgets: npm {' '.join(cmd[1:])} (in {cwd})")
        result = subprocess.run(
            cmd, check=False, cwd=cwd, env={**os.environ, "NO_UPDATE_NOTIFIER": "1"}
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {result.returncode}; {HINT}")


def _stale(js: Path, outputs: list[Path]) -> bool:
    """True if a bundle is missing or older than any source, config or lock file."""
    if not all(p.is_file() for p in outputs):
        return True
    sources = [p for p in (js / "src").rglob("*") if p.is_file()]
    sources += [
        js / n
        for n in ("package.json", "package-lock.json", "build.mjs", "tsconfig.json")
        if (js / n).is_file()
    ]
    newest = max(p.stat().st_mtime for p in sources)
    return newest > min(p.stat().st_mtime for p in outputs)
