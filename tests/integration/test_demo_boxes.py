"""The shipped demo-boxes adapter: complete, loadable offline, and able to track entities on
objects and box labels it never saw in training."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_widgets import load_model
from circuit_widgets.core.cross_model import check_compatible
from circuit_widgets.models import DEMO_BOXES_ADAPTER, lora_demo
from circuit_widgets.tasks import entity_tracking

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def boxes():
    model = load_model("demo-boxes")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_adapter_is_small_complete_safetensors_with_its_recipe():
    from safetensors.torch import load_file

    files = {p.name for p in DEMO_BOXES_ADAPTER.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metadata.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert (DEMO_BOXES_ADAPTER / "adapter_model.safetensors").stat().st_size <= 10 * 2**20
    meta = json.loads((DEMO_BOXES_ADAPTER / "metadata.json").read_text())
    assert meta["command"].startswith("python -m circuit_widgets.finetune entity_tracking")
    assert meta["task"] == "entity_tracking" and meta["steps_done"] >= 1
    acc = meta["accuracy"]
    assert acc["task"] == "entity_tracking" and acc["split"] == "test"
    assert {"boxes3_vocab", "boxes7_objects"} <= set(acc["finetuned"])
    # Every adapted layer has A and B for each target module: nothing left at its init.
    weights = load_file(DEMO_BOXES_ADAPTER / "adapter_model.safetensors")
    recipe = meta["recipe"]
    layers = 30 - recipe["first_layer"]
    assert len(weights) == layers * len(recipe["target_modules"]) * 2
    lora_demo(DEMO_BOXES_ADAPTER)  # raises if any adapter weight is missing


def test_demo_boxes_loads_offline_differs_from_demo_and_is_compatible(demo_model, boxes):
    check_compatible(demo_model, boxes)
    a = demo_model.original_model.state_dict()
    b = boxes.original_model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k in b)


def test_demo_boxes_tracks_entities_on_held_out_objects_and_labels(demo_model, boxes):
    task = entity_tracking(boxes, 16, seed=11, n_boxes=7, split="test")
    with torch.no_grad():
        tuned = task.candidate_accuracy(boxes(task.clean_tokens)).mean().item()
        plain = task.candidate_accuracy(demo_model(task.clean_tokens)).mean().item()
    # Chance among 7 objects is 1/7; the plain demo model is near it.
    assert tuned >= 0.6 and tuned > plain + 0.3, (tuned, plain)
