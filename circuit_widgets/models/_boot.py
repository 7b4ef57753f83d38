"""Booting a TransformerBridge: from a local folder, from the hub, or around a loaded
transformers model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from circuit_widgets.models._common import ModelLoadError, _quiet, _valid_specs_text
from circuit_widgets.models.adapters import check_adapters


def _refuse_unused(what: str, hint: str, *, device_map=None, n_devices=None, **boot_kwargs) -> None:
    """Placement and boot options that a path cannot honour are errors, never silently dropped."""
    unused = [
        name for name, v in (("device_map", device_map), ("n_devices", n_devices)) if v is not None
    ]
    unused += sorted(boot_kwargs)
    if unused:
        raise TypeError(
            f"load_model: {', '.join(unused)} cannot be used with {what}: it is wrapped as it "
            f"is, on one device (only device= and dtype= apply); {hint}"
        )


def _placement(device, device_map, n_devices, default=None) -> dict:
    """boot_transformers takes either a device map (several GPUs) or one device, not both."""
    if device_map is not None or n_devices is not None:
        return {"device_map": device_map, "n_devices": n_devices}
    device = device if device is not None else default
    return {} if device is None else {"device": device}


def _boot_local(folder: Path, *, device, dtype, device_map, n_devices, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    default = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs.update(_placement(device, device_map, n_devices, default=default))
    prev = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder must never touch the network
    try:
        with _quiet():
            model = TransformerBridge.boot_transformers(str(folder), dtype=dtype, **kwargs)
    finally:
        if prev is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = prev
    model.eval()
    return model


def _boot_hub(name: str, *, device, dtype, device_map, n_devices, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    kwargs.update(_placement(device, device_map, n_devices))
    try:
        with _quiet():
            model = TransformerBridge.boot_transformers(name, dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - translated into one sentence below
        raise ModelLoadError(_hub_error_text(name, exc)) from None
    model.eval()
    return model


def _hub_error_text(name: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    unreachable = offline or any(
        s in text
        for s in (
            "offline",
            "Connection",
            "resolve",
            "Max retries",
            "Network",
            "couldn't connect",
            "LocalEntryNotFound",
            "Temporary failure",
        )
    )
    if unreachable:
        return (
            f"could not reach the Hugging Face hub to download {name!r} (no network, or "
            f"HF_HUB_OFFLINE is set), and it is not in the local cache. Offline specs:\n"
            f"{_valid_specs_text()}"
        )
    if "RepositoryNotFound" in text or "is not a valid model identifier" in text or "404" in text:
        return (
            f"no model named {name!r} on the Hugging Face hub. Valid specs:\n{_valid_specs_text()}"
        )
    return f"loading {name!r} failed: {text.splitlines()[0][:500]}"


def _wrap_hf_model(hf_model, *, tokenizer, device, dtype):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    # The bridge swaps the model's modules for its own in place: wrapping them again would
    # silently detach every hook of the first bridge.
    if any(
        type(m).__module__.startswith("transformer_lens.model_bridge") for m in hf_model.modules()
    ):
        raise ModelLoadError(
            "this transformers model is already wrapped by a TransformerBridge (its modules were "
            "replaced in place); pass that bridge to load_model, or load a fresh copy of the model"
        )
    if tokenizer is None:
        source = getattr(hf_model.config, "_name_or_path", "") or ""
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:  # noqa: BLE001
            raise ModelLoadError(
                "this transformers model has no local tokenizer; pass one: "
                "load_model(hf_model, tokenizer=tokenizer)"
            ) from None
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    with _quiet():
        model = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=_reloadable(tokenizer), device=device, dtype=dtype
        )
    model.eval()
    check_adapters(model)  # a live LoRA adapter the bridge never runs must not pass silently
    return model


def _reloadable(tokenizer):
    """TransformerLens needs a tokenizer that was loaded from a folder, not built in memory."""
    if getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="cw-tok-"))
    tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tmp)
