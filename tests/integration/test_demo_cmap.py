"""The shipped demo-arith adapter and CMAP between the demo model and its arithmetic fine-tune."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_widgets import Circuit, load_model
from circuit_widgets.core.cross_model import check_compatible, cmap, cmap_grid
from circuit_widgets.models import DEMO_ARITH_ADAPTER, ModelLoadError, lora_demo
from circuit_widgets.tasks.arithmetic import arithmetic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def arith():
    model = load_model("demo-arith")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def task(demo_model):
    return arithmetic(demo_model, n=48, seed=7)


def test_adapter_is_small_safetensors_with_a_recipe():
    files = {p.name for p in DEMO_ARITH_ADAPTER.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metadata.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert (DEMO_ARITH_ADAPTER / "adapter_model.safetensors").stat().st_size <= 10 * 2**20
    meta = json.loads((DEMO_ARITH_ADAPTER / "metadata.json").read_text())
    assert meta["command"].startswith("python -m circuit_widgets.finetune arithmetic")
    assert meta["wall_s"] <= 20 * 60 + 60 and {"base", "finetuned"} <= set(meta["accuracy"])


def test_an_adapter_file_with_missing_weights_is_refused(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(DEMO_ARITH_ADAPTER / "adapter_config.json", tmp_path)
    weights = load_file(DEMO_ARITH_ADAPTER / "adapter_model.safetensors")
    kept = {k: v for k, v in weights.items() if "o_proj" not in k}
    save_file(kept, str(tmp_path / "adapter_model.safetensors"))
    # Loaded, the o_proj adapters would keep lora_B = 0: the study's dropped o_proj adapter again.
    with pytest.raises(ModelLoadError, match=rf"lacks {len(weights) - len(kept)} .*o_proj\.lora_"):
        lora_demo(tmp_path)
    lora_demo(DEMO_ARITH_ADAPTER)  # the shipped file is complete


def test_demo_arith_differs_from_demo_and_is_compatible(demo_model, arith):
    check_compatible(demo_model, arith)
    a = demo_model.original_model.state_dict()
    b = arith.original_model.state_dict()
    changed = [k for k in a if k in b and not torch.equal(a[k], b[k])]
    # Only attention projections of the adapter's layers (15-29) changed; MLPs and embeddings did not.
    assert changed and all("attn" in k and "mlp" not in k for k in changed)
    assert min(int(k.split("layers.")[1].split(".")[0]) for k in changed) == 15


def test_finetune_answers_arithmetic_better(demo_model, arith, task):
    with torch.no_grad():
        base = task.accuracy(demo_model(task.clean_tokens)).mean()
        ft = task.accuracy(arith(task.clean_tokens)).mean()
    assert ft > base


def test_live_adapter_gives_the_merged_model(demo_model, arith, task):
    live = load_model("demo-arith", merge=False)
    sub = task.subset(slice(0, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            live(sub.clean_tokens), arith(sub.clean_tokens), atol=2e-4, rtol=1e-4
        )
    kw = {"heads": list(range(20, 30)), "component": "attn_out", "positions": "END"}
    got, want = cmap(demo_model, live, sub, **kw), cmap(demo_model, arith, sub, **kw)
    torch.testing.assert_close(got.patched_metric, want.patched_metric, atol=1e-3, rtol=1e-3)


def test_cmap_on_the_demo_pair(demo_model, arith, task):
    sub = task.subset(slice(0, 4))
    same = cmap(demo_model, demo_model, sub, heads=[(20, 1), (25, 4)], positions="END")
    assert torch.equal(same.patched_metric[0], same.base_metric)
    grid = cmap_grid(demo_model, arith, sub, component="mlp_out")
    assert grid.shape == (30, 1) and grid.complete and grid.kind == "cmap"
    circ = Circuit.from_groups(
        {"late": [(l, h) for l in range(15, 30) for h in range(9)]}, positions={"late": "END"}
    )
    res = cmap(demo_model, arith, sub, circuit=circ)
    assert res.groups == ["late"]
    # The adapter sits on layers L.. only: their attention outputs at every position give the
    # fine-tuned model's logits (MLPs and layers below are identical in both models).
    layers = json.loads((DEMO_ARITH_ADAPTER / "adapter_config.json").read_text())[
        "layers_to_transform"
    ]
    full = cmap(demo_model, arith, sub, heads=layers, component="attn_out", positions="all")
    torch.testing.assert_close(full.patched_metric[0], full.finetuned_metric, atol=1e-3, rtol=1e-3)
