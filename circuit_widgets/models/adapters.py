"""LoRA adapters: the shipped demo adapters (demo-arith, demo-boxes), peft wrapping, and the
check that a bridge really runs a live adapter."""

from __future__ import annotations

import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from circuit_widgets.models._common import ModelLoadError
from circuit_widgets.models.gguf import cached_gguf_checkpoint, demo_gguf_path

DEMO_ARITH_ADAPTER = Path(__file__).parents[1] / "data" / "demo_arith"


DEMO_BOXES_ADAPTER = Path(__file__).parents[1] / "data" / "demo_boxes"


# Shipped LoRA adapters on the demo model: spec -> (folder, cache name suffix).
DEMO_ADAPTERS = {
    "demo-arith": (DEMO_ARITH_ADAPTER, "arith"),
    "demo-boxes": (DEMO_BOXES_ADAPTER, "boxes"),
}


def peft_wrap(hf: Any, cfg: Any) -> Any:
    """``peft.get_peft_model(hf, cfg)``, without the FutureWarning it triggers on every call
    (peft reads transformers' deprecated ``is_gradient_checkpointing``): nothing for our users
    to act on."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(hf, cfg)


def lora_demo(adapter: Path):
    """The demo HF model with the adapter live; its weights load from safetensors, never pickle."""
    from peft import (
        LoraConfig,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = cached_gguf_checkpoint("smollm2-135m-instruct", demo_gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig.from_pretrained(str(adapter))
    cfg.inference_mode = True
    cfg.base_model_name_or_path = (
        hf.name_or_path
    )  # peft warns when it renames the base it was trained on
    peft_model = peft_wrap(hf, cfg)
    state = load_file(adapter / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"adapter {adapter} does not fit the demo model: {unexpected[:3]}")
    # A key left out would keep its fresh init (lora_B = 0): that adapter would silently do nothing.
    missing = sorted(set(get_peft_model_state_dict(peft_model)) - set(state))
    if missing:
        raise ModelLoadError(
            f"adapter {adapter} lacks {len(missing)} of the demo model's adapter weights "
            f"(e.g. {', '.join(missing[:3])}); the file is incomplete, reinstall or retrain it"
        )
    return folder, peft_model


# A verdict per model object: which modules are LoRA layers does not change after wrapping.
_ADAPTER_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hf_modules(module, prefix: str = ""):
    """(HF name, module) pairs; a bridge component is entered only through the HF module it wraps."""
    yield prefix, module
    if type(module).__module__.startswith("transformer_lens.model_bridge"):
        inner = getattr(module, "_original_component", None)
        children = [("", inner)] if isinstance(inner, torch.nn.Module) else []
    else:
        children = list(module.named_children())
    for name, child in children:
        yield from _hf_modules(child, f"{prefix}.{name}".strip(".") if name else prefix)


def _lora_layers(model) -> list[tuple[str, Any]]:
    """The peft LoRA modules with an active, unmerged adapter, under their HF names."""
    if "peft" not in sys.modules:  # a peft adapter exists only once peft was imported
        return []
    from peft.tuners.lora import LoraLayer

    out, seen = [], set()
    for name, m in _hf_modules(model.original_model):
        if not isinstance(m, LoraLayer) or id(m) in seen or m.merged or m.disable_adapters:
            continue
        seen.add(id(m))
        if any(a in m.lora_A or a in m.lora_embedding_A for a in m.active_adapters):
            out.append((name, m))
    return out


def check_adapters(model, label: str = "model") -> None:
    """Raise ValueError if the bridge's forward skips a live peft LoRA adapter in its HF model.

    The bridge swaps the HF modules for its own in place, so ``original_model(tokens)`` runs
    the bridge too and cannot serve as a reference; instead a short probe records which
    adapter modules the bridge's forward calls (GPT-2's fused c_attn is never called: the
    bridge uses split copies of its weight). Checked once per model object.
    """
    if model in _ADAPTER_VERDICTS:
        missed = _ADAPTER_VERDICTS[model]
    else:
        layers = _lora_layers(model)
        missed = []
        if layers:
            called: set[int] = set()
            handles = [
                m.register_forward_hook(lambda mod, args, out: called.add(id(mod)))
                for _, m in layers
            ]
            device = next(model.original_model.parameters()).device
            probe = (torch.arange(1, 9, device=device) % int(model.cfg.d_vocab))[None]
            try:
                with torch.no_grad():
                    model(probe)
            finally:
                for h in handles:
                    h.remove()
            missed = [name for name, m in layers if id(m) not in called]
        _ADAPTER_VERDICTS[model] = missed
    if missed:
        shown = ", ".join(missed[:4]) + (f" (+{len(missed) - 4} more)" if len(missed) > 4 else "")
        raise ValueError(
            f"{label} model: the TransformerBridge never runs the peft LoRA adapter on {shown}; it "
            "computes those projections from its own copies of the base weights, so the adapter "
            "would be silently ignored. Merge the adapter into the weights before wrapping: "
            "load_model(peft_model.merge_and_unload(), tokenizer=...) or load_model(peft_model, merge=True)."
        )
