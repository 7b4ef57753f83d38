"""Shared test set-up: offline, seeded, and a private model cache unless one is given."""

from __future__ import annotations

import os

# Tests never touch the network; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
