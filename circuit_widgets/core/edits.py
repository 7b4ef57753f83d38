"""One forward with head-level edits: the primitive under ablation, DCM, CMAP and interventions.

``edits[(layer, site)]`` rewrites an activation on its way through the model; ``capture`` keeps
activations (after edits). The fast engine runs it where the architecture is covered (plain torch,
so gradients flow when ``grad=True``); otherwise bridge hooks do, with the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from circuit_widgets.core import cache, hooks, nnsight_backend
from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import attend, causal_masks
from circuit_widgets.types import Component, ModelLike

# Shapes, batch first as the bridge's hooks give them: q [b,s,H,dh]; k, v [b,s,K,dh] (raw, before
# RoPE, and on Gemma 3 before the per-head q/k norm, which undoes any rescaling); pattern
# [b,H,q,k]; z [b,s,H,dh]; resid_pre, attn_out, mlp_out [b,s,d] (Gemma: after the branch norm).
SITES = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "mlp_out")
Edit = Callable[[Tensor], Tensor]


@dataclass
class EditedRun:
    """Logits ([b,s,vocab], or [b,vocab] at ``at``) and the captured activations."""

    logits: Tensor
    captured: dict[tuple[int, str], Tensor] = field(default_factory=dict)


def run_with_edits(
    model: ModelLike,
    tokens: Int[Tensor, "b s"],
    edits: dict[tuple[int, str], Edit] | None = None,
    *,
    capture: Iterable[tuple[int, str]] = (),
    at: Int[Tensor, " b"] | None = None,
    grad: bool = False,
) -> EditedRun:
    """Run ``tokens`` through ``model`` with ``edits`` applied; see the module docstring.

    at: per-example positions; logits come back only there ([b, vocab]), which saves the
    unembedding of every other position. grad=False runs under ``torch.no_grad()``.
    """
    if nnsight_backend.is_nnsight(model):
        return nnsight_backend.dispatch(model, "run_with_edits")(**locals())
    edits = dict(edits or {})
    capture = {check_capture_key(model, k) for k in capture}
    for key, fn in edits.items():
        check_capture_key(model, key)
        if not callable(fn):
            raise TypeError(
                f"edit for {key} must be a callable act -> act, got {type(fn).__name__}"
            )
    if at is not None and (at.dim() != 1 or len(at) != tokens.shape[0]):
        raise ValueError(
            f"at must hold one position per example ({tokens.shape[0]}), "
            f"got shape {tuple(at.shape)}"
        )
    eng = cache.engine_for(model)
    with torch.enable_grad() if grad else torch.no_grad():
        if eng is not None:
            return _fast(eng, tokens, edits, capture, at)
        return _hooked(model, tokens, edits, capture, at)


def check_capture_key(model: ModelLike, key: Any) -> tuple[int, str]:
    n_layers = int(model.cfg.n_layers)
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"edit/capture keys are (layer, site) tuples, got {key!r}")
    layer, site = key
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites are {list(SITES)}")
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range; valid layers are 0..{n_layers - 1}")
    return key


def _fast(
    eng: FastModel, tokens: Tensor, edits: dict, capture: set, at: Tensor | None
) -> EditedRun:
    b, s = tokens.shape
    tokens = tokens.to(eng.device)
    pos = torch.arange(s, device=eng.device).expand(b, s)
    masks = causal_masks(eng, torch.zeros(b, dtype=torch.long, device=eng.device), s, s)
    captured: dict[tuple[int, str], Tensor] = {}

    def site(layer: int, name: str, act: Tensor) -> Tensor:
        fn = edits.get((layer, name))
        if fn is not None:
            act = fn(act)
        if (layer, name) in capture:
            captured[(layer, name)] = act
        return act

    x = eng.embed(tokens)
    for layer in range(eng.n_layers):
        lay = eng.layers[layer]
        x = site(layer, "resid_pre", x)
        q, k, v = eng.qkv(layer, lay.ln1(x))
        q, k, v = site(layer, "q", q), site(layer, "k", k), site(layer, "v", v)
        qr, kr = eng.rotate(layer, q[None], pos, "q"), eng.rotate(layer, k[None], pos, "k")
        if (layer, "pattern") in edits or (layer, "pattern") in capture:
            _, pattern = attend(eng, layer, qr, kr, v[None], None, masks, want_pattern=True)
            pattern = site(layer, "pattern", pattern[0])
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v.repeat_interleave(eng.group, dim=2))
        else:
            z = attend(eng, layer, qr, kr, v[None], None, masks)[0][0]
        z = site(layer, "z", z)
        mid = x + site(layer, "attn_out", eng.o_proj(layer, z))
        x = mid + site(layer, "mlp_out", eng.mlp(layer, mid))
    if at is not None:
        x = x[torch.arange(b, device=x.device), at.to(x.device)]
    return EditedRun(eng.logits(x), captured)


_SITE_COMPONENT = {
    "resid_pre": Component.RESID_PRE,
    "q": Component.Q,
    "k": Component.K,
    "v": Component.V,
    "pattern": Component.PATTERN,
    "z": Component.Z,
    "attn_out": Component.ATTN_OUT,
    "mlp_out": Component.MLP_OUT,
}


def _hooked(
    model: ModelLike, tokens: Tensor, edits: dict, capture: set, at: Tensor | None
) -> EditedRun:
    captured: dict[tuple[int, str], Tensor] = {}
    fwd = []
    for key in sorted(set(edits) | capture):
        fn, keep = edits.get(key), key in capture

        def hook(act: Tensor, hook: Any = None, fn=fn, keep=keep, key=key) -> Tensor:
            if fn is not None:
                act = fn(act)
            if keep:
                captured[key] = act
            return act

        fwd.append((hooks.hook_name(_SITE_COMPONENT[key[1]], key[0]), hook))
    logits = model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=fwd)
    if at is not None:
        logits = logits[torch.arange(logits.shape[0], device=logits.device), at.to(logits.device)]
    return EditedRun(logits, captured)
