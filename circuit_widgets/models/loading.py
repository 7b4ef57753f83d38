"""``load_model``: one entry point for every spec (offline demo weights, shipped adapters, tiny
models, local folders, hub names, loaded models), and ``model_shape``."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from circuit_widgets.models._boot import _boot_hub, _boot_local, _refuse_unused, _wrap_hf_model
from circuit_widgets.models._common import (
    ModelLoadError,
    _valid_specs_text,
    _write_dir_atomically,
    cache_dir,
)
from circuit_widgets.models.adapters import DEMO_ADAPTERS, lora_demo
from circuit_widgets.models.gguf import (
    _file_sha256,
    _gemma_gguf_path,
    cached_gguf_checkpoint,
    demo_gguf_path,
)
from circuit_widgets.models.tiny import tiny_model
from circuit_widgets.types import ModelShape


def load_model(
    spec: Any = "demo",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    merge: bool | None = None,
    backend: str = "transformer_lens",
    remote: bool | str = False,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge``, offline where possible.

    ``spec`` is one of ``"demo"``, ``"demo-arith"``, ``"gemma-3-270m"``, ``"tiny-gpt2"``, ``"tiny-llama"``,
    ``"tiny-gemma3"``, a local checkpoint folder, a Hugging Face model name, a ``TransformerBridge`` (returned as
    is), a ``transformers`` model (wrapped; pass ``tokenizer=`` if it has no local one) or a peft
    ``PeftModel`` (its base model wrapped with the adapter live; ``merge=True`` merges it first,
    in place, with peft's ``merge_and_unload``). ``merge=`` applies to "demo-arith" and peft
    models only. ``device_map`` / ``n_devices`` spread a large model over several GPUs.
    ``backend="nnsight"`` returns an nnsight-served model instead (``remote=False`` in-process,
    ``"local"`` NDIF's local simulation, ``True`` NDIF); see ``circuit_widgets.nnsight_model``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if backend == "nnsight":
        from circuit_widgets.nnsight_model import load_nnsight

        return load_nnsight(
            spec,
            remote=remote,
            device=device,
            dtype=dtype,
            device_map=device_map,
            n_devices=n_devices,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
            **boot_kwargs,
        )
    if backend != "transformer_lens" or remote is not False:
        raise ValueError(
            f"backend must be 'transformer_lens' or 'nnsight' (remote= needs 'nnsight'), "
            f"got backend={backend!r}, remote={remote!r}"
        )

    if merge is not None and not isinstance(merge, bool):
        raise TypeError(f"merge must be True or False, got {merge!r}")
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft was imported
    is_peft = peft is not None and isinstance(spec, peft.PeftModel)
    is_arith = isinstance(spec, str) and spec.strip().lower() in DEMO_ADAPTERS
    if merge is not None and not (is_peft or is_arith):
        raise TypeError(
            f"merge= applies to 'demo-arith', 'demo-boxes' and to peft models only; {_spec_text(spec)} "
            "has no adapter to merge"
        )
    if isinstance(spec, TransformerBridge):
        if device is not None:
            spec = spec.to(device)
        return spec
    if isinstance(spec, torch.nn.Module):
        _refuse_unused(
            f"an already-loaded {type(spec).__name__}",
            "place it before wrapping, or load it from a folder or hub name",
            device_map=device_map,
            n_devices=n_devices,
            **boot_kwargs,
        )
        if is_peft:
            # The adapter modules stay in the base model: wrapping it keeps them live.
            peft_model: Any = spec  # a peft.PeftModel, whose type mypy cannot see here
            spec = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
        return _wrap_hf_model(spec, tokenizer=tokenizer, device=device, dtype=dtype)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(
            f"cannot load a model from {spec!r}. Valid specs:\n{_valid_specs_text()}"
        )

    placement = {"device": device, "dtype": dtype, "device_map": device_map, "n_devices": n_devices}
    key = spec.strip().lower()
    if key == "demo":
        folder = cached_gguf_checkpoint("smollm2-135m-instruct", demo_gguf_path)
        return _boot_local(folder, **placement, **boot_kwargs)
    if key in DEMO_ADAPTERS:
        return _demo_arith(placement, boot_kwargs, merge=True if merge is None else merge, name=key)
    if key in ("gemma-3-270m", "gemma3-270m", "gemma"):
        folder = cached_gguf_checkpoint("gemma-3-270m", _gemma_gguf_path)
        return _boot_local(folder, **placement, **boot_kwargs)
    if key in ("tiny-gpt2", "tiny-llama", "tiny-gemma3"):
        arch = key.split("-", 1)[1]
        model = tiny_model(arch, n_kv_heads={"gpt2": None, "llama": 2, "gemma3": 1}[arch])
        return model.to(device) if device is not None else model
    if Path(spec).expanduser().is_dir():
        return _boot_local(
            Path(spec).expanduser(), trust_remote_code=trust_remote_code, **placement, **boot_kwargs
        )
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec):
        raise ModelLoadError(
            f"{spec!r} is neither a known model nor a folder. Valid specs:\n{_valid_specs_text()}"
        )
    return _boot_hub(spec, trust_remote_code=trust_remote_code, **placement, **boot_kwargs)


def _spec_text(spec: Any) -> str:
    return repr(spec) if isinstance(spec, (str, os.PathLike)) else f"a {type(spec).__name__}"


def _demo_arith(
    placement: dict, boot_kwargs: dict, *, merge: bool = True, name: str = "demo-arith"
):
    """demo-arith / demo-boxes: merged into a cached checkpoint (keyed by both hashes), or
    live (merge=False)."""
    adapter, suffix = DEMO_ADAPTERS[name]
    if not (adapter / "adapter_model.safetensors").exists():
        raise ModelLoadError(
            f"the {name} adapter is missing from {adapter}; reinstall circuit-widgets"
        )
    if not merge:
        _refuse_unused(
            f"{name!r} and merge=False (a live adapter)",
            "the default merge=True takes them",
            device_map=placement["device_map"],
            n_devices=placement["n_devices"],
            **boot_kwargs,
        )
        from transformers import AutoTokenizer

        folder, peft_model = lora_demo(adapter)
        model = _wrap_hf_model(
            peft_model.get_base_model(),
            tokenizer=AutoTokenizer.from_pretrained(folder),
            device=placement["device"],
            dtype=placement["dtype"],
        )
        return model
    _, demo_digest = demo_gguf_path()
    digest = hashlib.sha256(
        (demo_digest + _file_sha256(adapter / "adapter_model.safetensors")).encode()
    )
    folder = cache_dir() / "models" / f"smollm2-135m-instruct-{suffix}-{digest.hexdigest()[:16]}"
    if not ((folder / "model.safetensors").exists() and (folder / "config.json").exists()):
        from safetensors.torch import save_model
        from transformers import AutoTokenizer

        base_folder, peft_model = lora_demo(adapter)
        hf = peft_model.merge_and_unload()

        def write(tmp: Path) -> None:
            hf.config.save_pretrained(tmp)
            save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            AutoTokenizer.from_pretrained(base_folder).save_pretrained(tmp)

        _write_dir_atomically(folder, write)
    return _boot_local(folder, **placement, **boot_kwargs)


def model_shape(model) -> ModelShape:
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    return ModelShape(
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
    )
