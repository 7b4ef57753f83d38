"""Models served through nnsight: in-process, NDIF's local simulation, or NDIF itself.

``load_nnsight(spec, remote=...)`` returns an ``NNsightModel``: the nnsight wrapper of a plain
transformers model plus the ``cfg`` / ``tokenizer`` every task and experiment reads. With
``remote=True`` only a meta-device skeleton is built here (config from the hub) and every
request goes to NDIF; ``"local"`` serialises each request exactly as for NDIF and runs it here;
``False`` runs nnsight in this process.
"""

from __future__ import annotations

import _imp
import re
from dataclasses import dataclass
from typing import Any

import torch

REMOTE_MODES = (False, "local", True)
LOCAL_SPECS = ("demo", "demo-arith", "gemma-3-270m", "tiny-gpt2", "tiny-llama", "tiny-gemma3")


class RemoteError(RuntimeError):
    """A request to NDIF (or its local simulation) failed; the message is one sentence.
    ``partial`` holds the sweep's grid so far, where there is one."""

    partial: Any = None


@dataclass(frozen=True)
class NNsightConfig:
    """The config fields the experiments and tasks read (a subset of the bridge's cfg)."""

    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    default_prepend_bos: bool
    device: Any
    architecture: str


class NNsightModel:
    """An nnsight ``TransformersModel`` with the vocabulary the rest of circuit_widgets reads.

    ``requests`` counts every request sent (traces or sessions; one per call of
    ``backend()``). ``remote`` is False, "local" or True.
    """

    backend_name = "nnsight"

    def __init__(self, lm: Any, tokenizer: Any, cfg: NNsightConfig, remote: Any, name: str):
        self.lm = lm
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.remote = remote
        self.name = name
        self.requests = 0
        self.family = "gpt2" if cfg.architecture.startswith("GPT2") else "llama"
        self._fail = None  # tests: a callable raising on a chosen request

    def __repr__(self) -> str:
        where = {False: "in-process", "local": "NDIF local simulation", True: "NDIF"}[self.remote]
        return f"NNsightModel({self.name!r}, {where}, {self.cfg.n_layers} layers)"

    def to_tokens(self, text: Any, prepend_bos: bool | None = None) -> torch.Tensor:
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if bos and self.tokenizer.bos_token_id is not None:
            ids = [[self.tokenizer.bos_token_id, *x] for x in ids]
        n = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([x + [pad] * (n - len(x)) for x in ids])

    def to_str_tokens(self, text: Any, prepend_bos: bool | None = None) -> list[str]:
        toks = text if isinstance(text, torch.Tensor) else self.to_tokens(text, prepend_bos)[0]
        return [self.tokenizer.decode([int(t)]) for t in toks.flatten()]

    # ------------------------------------------------------------------ modules by name

    def layer(self, layer: int) -> Any:
        lm = self.lm
        return lm.transformer.h[layer] if self.family == "gpt2" else lm.model.layers[layer]

    def attn(self, layer: int) -> Any:
        lay = self.layer(layer)
        return lay.attn if self.family == "gpt2" else lay.self_attn

    def z_site(self, layer: int) -> Any:
        """The module whose input is z (heads concatenated): o_proj, or GPT-2's c_proj."""
        a = self.attn(layer)
        return a.c_proj if self.family == "gpt2" else a.o_proj

    # ------------------------------------------------------------------ requests

    def backend(self) -> Any:
        """The nnsight backend of one request (None = nnsight's own in-process run); counted."""
        self.requests += 1
        if self._fail is not None:
            self._fail(self.requests)
        if self.remote is False:
            return None
        if self.remote is True:
            check_remote_ready()
        try:
            backend = self.lm._remote_backend(self.remote, True, None, False)
        except Exception as exc:
            raise request_error(exc) from exc
        if self.remote == "local":
            backend.__class__ = _import_safe(type(backend))
        return backend


def _import_safe(cls: type) -> type:
    """nnsight's local simulation, holding the import lock while it hides this package.

    The simulation takes every non-installed module out of ``sys.modules`` (and its folder
    out of ``sys.path``) while it reads the request back; an import in another thread meanwhile
    (a widget's worker, a cell run during a request) failed with ModuleNotFoundError. Holding
    the interpreter's import lock for that window makes such an import wait instead. Known
    limit: if another thread is in the middle of a first import of a module the request's
    deserialisation also imports for the first time, the two wait on each other (the request
    holds the global lock, the other thread that module's lock); only first imports of the
    same module at the same moment can meet this way.
    """
    cached = _SAFE.get(cls)
    if cached is not None:
        return cached

    class ImportSafe(cls):
        def _hide_local_modules(self) -> dict:
            _imp.acquire_lock()
            try:
                return super()._hide_local_modules()
            except BaseException:
                _imp.release_lock()
                raise

        def _restore(self, hidden: dict) -> None:
            try:
                super()._restore(hidden)
            finally:
                _imp.release_lock()

    ImportSafe.__name__ = ImportSafe.__qualname__ = f"ImportSafe{cls.__name__}"
    _SAFE[cls] = ImportSafe
    return ImportSafe


_SAFE: dict[type, type] = {}


def check_remote_ready() -> None:
    """One sentence if NDIF cannot be reached the nnsight way (no API key set)."""
    from nnsight import CONFIG

    if not getattr(CONFIG.API, "APIKEY", None):
        raise RemoteError(
            "remote=True needs an NDIF API key: get one at https://login.ndif.us and run "
            "nnsight.CONFIG.set_default_api_key('<key>') (or set NDIF_API_KEY)."
        )


def request_error(exc: BaseException) -> RemoteError:
    """A failed request as one sentence (the server's or the network's own words, first line)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RemoteError(f"the nnsight request failed ({type(exc).__name__}: {first[:300]})")


# ---------------------------------------------------------------------- loading


def load_nnsight(spec: Any, *, remote: Any = False, **kwargs: Any) -> NNsightModel:
    """``load_model(spec, backend="nnsight", remote=...)``; see the module docstring."""
    from nnsight import TransformersModel

    if remote not in REMOTE_MODES or isinstance(remote, int) and not isinstance(remote, bool):
        raise ValueError(f"remote must be False, 'local' or True, got {remote!r}")
    if remote is True:
        if not isinstance(spec, str):
            raise ValueError(
                "remote=True takes a model name NDIF serves (e.g. 'meta-llama/Llama-3.1-8B'), "
                f"not {type(spec).__name__}: its weights stay on NDIF"
            )
        if spec.strip().lower() in LOCAL_SPECS:
            raise ValueError(
                f"{spec!r} is built on this machine, NDIF does not serve it: use "
                "remote=False or remote='local' (or a model name NDIF hosts)"
            )
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec)
            # meta device: no weights; eager attention so attention modules return their patterns
            lm = TransformersModel(
                spec, tokenizer=tok, task="text-generation", attn_implementation="eager"
            )
        except Exception as exc:  # noqa: BLE001 - one sentence below
            raise RemoteError(
                f"could not read {spec!r}'s config from the Hugging Face hub "
                f"({type(exc).__name__}); remote=True needs hub access for the config and "
                "tokenizer (the weights stay on NDIF)"
            ) from None
        return _wrap(lm, lm.tokenizer, lm._module.config, True, spec, prepend_bos=True)

    from circuit_widgets.models import load_model

    bridge = load_model(spec, **kwargs)
    hf = unbridge(bridge)
    lm = TransformersModel(hf, tokenizer=bridge.tokenizer, task="text-generation")
    name = spec if isinstance(spec, str) else type(spec).__name__
    prepend = bool(getattr(bridge.cfg, "default_prepend_bos", True))
    return _wrap(lm, bridge.tokenizer, hf.config, remote, name, prepend_bos=prepend)


def _wrap(lm: Any, tok: Any, config: Any, remote: Any, name: str, *, prepend_bos: bool):
    text = getattr(config, "text_config", None) or config
    arch = (getattr(config, "architectures", None) or [type(lm._module).__name__])[0]
    n_heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    d_model = int(getattr(text, "hidden_size", None) or text.n_embd)
    n_layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    n_kv = int(getattr(text, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(text, "head_dim", None) or d_model // n_heads)
    try:
        device = next(lm._module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    cfg = NNsightConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_head=d_head,
        d_model=d_model,
        d_vocab=int(text.vocab_size),
        default_prepend_bos=prepend_bos and tok.bos_token_id is not None,
        device=torch.device("cpu") if device.type == "meta" else device,
        architecture=arch,
    )
    return NNsightModel(lm, tok, cfg, remote, name)


def unbridge(bridge: Any) -> torch.nn.Module:
    """A plain transformers model sharing the bridge's weights (the bridge wraps its modules)."""
    hf = bridge.original_model
    with torch.device("meta"):
        fresh = type(hf)(hf.config)
    want = fresh.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        clean = re.sub(r"(\._original_component)+", "", key)
        if clean in want and clean not in state:
            state[clean] = value
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(
            f"cannot serve {type(hf).__name__} through nnsight: the bridge holds no weights "
            f"for {missing[:3]}"
        )
    fresh.load_state_dict(state, assign=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict: take the bridge's
    theirs = {re.sub(r"(\._original_component)+", "", k): b for k, b in hf.named_buffers()}
    for key, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, attr = key.rpartition(".")
            if key not in theirs:
                raise ValueError(f"cannot serve {type(hf).__name__}: no buffer {key!r} to copy")
            fresh.get_submodule(owner).register_buffer(attr, theirs[key], persistent=False)
    if getattr(hf.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.eval()
    _check_agrees(bridge, fresh)
    return fresh


def _check_agrees(bridge: Any, hf: torch.nn.Module) -> None:
    vocab = int(bridge.cfg.d_vocab)
    device = next(hf.parameters()).device
    tokens = (torch.arange(1, 9, device=device) * 7919 % max(vocab - 1, 2))[None]
    with torch.no_grad():
        ref = bridge(tokens)
        mine = hf(tokens).logits
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if float((ref - mine).abs().max()) > tol:
        raise ValueError(
            f"cannot serve {type(hf).__name__} through nnsight: the unwrapped model does not "
            "reproduce the bridge's logits"
        )
