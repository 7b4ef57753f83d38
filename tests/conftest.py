"""Shared test set-up: offline, seeded, and a private model cache unless one is given."""

from __future__ import annotations

import os

# Tests never touch the network; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _private_model_cache() -> None:
    """Point CIRCUIT_WIDGETS_CACHE at a session temp dir unless one is given: tests never write
    to the user's cache. Models already dequantised there are linked in (read, never written),
    so the demo model is not dequantised again; anything new lands in the temp dir."""
    if os.environ.get("CIRCUIT_WIDGETS_CACHE"):
        return
    import platformdirs

    user = Path(platformdirs.user_cache_dir("circuit_widgets"))
    private = Path(tempfile.mkdtemp(prefix="circuit-widgets-test-cache-"))
    for kind in ("models", "tokenizers"):
        (private / kind).mkdir()
        for entry in sorted((user / kind).glob("*")) if (user / kind).is_dir() else []:
            if entry.is_dir():
                (private / kind / entry.name).symlink_to(entry, target_is_directory=True)
    if (user / "hashes.json").is_file():  # rewritten when a GGUF is hashed: a copy, not a link
        shutil.copy(user / "hashes.json", private / "hashes.json")
    os.environ["CIRCUIT_WIDGETS_CACHE"] = str(private)
    atexit.register(shutil.rmtree, private, True)  # removes the links, never what they point to


_private_model_cache()


def pytest_configure(config):
    # peft reads transformers' deprecated is_gradient_checkpointing in every get_peft_model call
    # (the package wraps it in models.peft_wrap; some tests call peft directly)
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_gpt2():
    from circuit_widgets import tiny_model

    return tiny_model("gpt2", n_layers=2, n_heads=4, d_model=32, seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    from circuit_widgets import tiny_model

    return tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3():
    """Gemma 3's block: one key/value head, q/k norms, a 4-token sliding-window layer, soft-capping."""
    from circuit_widgets import tiny_model

    return tiny_model("gemma3", n_layers=2, n_heads=4, n_kv_heads=1, d_model=32, seed=0)


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model (SmolLM2-135M), loaded once; tests must not modify it."""
    from circuit_widgets import load_model

    model = load_model("demo")
    for p in model.parameters():
        p.requires_grad_(False)
    return model
