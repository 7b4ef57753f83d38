"""Experiments on an nnsight-served model (``load_model(..., backend="nnsight", remote=...)``).

Each request is one nnsight trace; a sweep packs many cells into one trace as extra batch
rows: the source run (B rows), then one copy of the base run per cell, each with its own
head slice overwritten by the source run's activation. A full grid of L layers therefore
costs at most L requests (fewer when several layers' cells fit the row budget), whatever
the number of heads. Code inside a trace uses only torch and nnsight, so NDIF (and the
local simulation, which hides this package while it deserialises) never imports us.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.types import Component, Head

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

# rows (patched copies x examples) per request when batch_size is None
DEFAULT_ROWS = 512
SUPPORTED = (
    "activation_patch",
    "path_patch",
    "head_attention",
    "run_with_edits",
    "cmap",
    "cmap_grid",
    "attribution_patch",
    "path_attribution",
    "dcm",
    "dcm_sweep",
)
# built from the experiments above by backend-neutral code (evaluation.py, discovery.py)
COMPOSED = ("mean_ablate", "faithfulness", "completeness", "minimality", "circuit_pipeline")
# written in core/nnsight_masking.py
_MASKING = ("dcm", "dcm_sweep")

# the core's own sweep runs these, its Backend being backends.NNsightBackend
_IN_CORE = (
    "activation_patch",
    "path_patch",
    "attribution_patch",
    "path_attribution",
    "cmap",
    "cmap_grid",
)

# why an experiment cannot be one request, where that is the reason it is refused
WHY_NOT = {
    "intervene": (
        "the with-block is local-only: it installs hooks that stay on the model for every "
        "forward run inside it, while each nnsight request is a self-contained trace and NDIF "
        "keeps no state between requests"
    ),
    "cmap_logits": (
        "it takes edits keyed by hook names of one model's forward; use cmap or cmap_grid, "
        "which run on two nnsight models"
    ),
}


def is_nnsight(model: Any) -> bool:
    return getattr(model, "backend_name", None) == "nnsight"


def dispatch(model: Any, experiment: str) -> Callable[..., Any]:
    """This module's version of ``experiment`` for an nnsight ``model`` (callers check
    ``is_nnsight`` first); an experiment not written for nnsight raises NotImplementedError
    naming the backend."""
    if not is_nnsight(model):
        raise TypeError(
            f"{experiment}: dispatch takes an nnsight model, got {type(model).__name__}"
        )
    if experiment in WHY_NOT:
        raise NotImplementedError(
            f"{experiment} is not available on the nnsight backend: {WHY_NOT[experiment]}; "
            "load the model with backend='transformer_lens' to run it"
        )
    if experiment not in SUPPORTED:
        raise NotImplementedError(
            f"{experiment} is not available on the nnsight backend yet (supported: "
            f"{', '.join(SUPPORTED + COMPOSED)}); load the model with backend='transformer_lens' to run it"
        )
    if experiment in _MASKING:
        from circuit_widgets.core import nnsight_masking

        return getattr(nnsight_masking, experiment)
    if experiment in _IN_CORE:  # the core function runs nnsight through backends.NNsightBackend
        from circuit_widgets.core import attribution, cross_model, patching, path_patching

        module = {
            "activation_patch": patching,
            "path_patch": path_patching,
            "cmap": cross_model,
            "cmap_grid": cross_model,
        }
        return getattr(module.get(experiment, attribution), experiment)
    return globals()[experiment]


def check(experiment: str, *models: Any) -> None:
    """Refuse an nnsight model in an experiment not written for nnsight, naming the backend."""
    if any(is_nnsight(m) for m in models):
        dispatch(next(m for m in models if is_nnsight(m)), experiment)


# ---------------------------------------------------------------------- sites


def site(nm: Any, comp: Component, layer: int) -> tuple[Any, bool, int]:
    """(module envoy, True if the activation is its input, column offset of head 0)."""
    if comp == Component.Z:
        return nm.z_site(layer), True, 0
    a = nm.attn(layer)
    if nm.family == "gpt2":  # c_attn's output is [q | k | v]
        d = nm.cfg.n_heads * nm.cfg.d_head
        return a.c_attn, False, {"q": 0, "k": d, "v": 2 * d}[comp.value]
    return getattr(a, f"{comp.value}_proj"), False, 0


_site = site  # the earlier name, used by nnsight_experiments


def check_component(comp: Component) -> None:
    """Refuse a component the nnsight sweeps do not patch yet, naming the ones they do."""
    if comp not in (Component.Z, Component.Q, Component.K, Component.V):
        raise NotImplementedError(
            f"component {comp.value!r} is not available on the nnsight backend yet; "
            "use z, q, k or v"
        )


_check_component = check_component  # the earlier name, used by nnsight_experiments


# ---------------------------------------------------------------------- activation patching
# activation_patch itself runs core.patching's sweep; backends.NNsightBackend packs its cells
# into the requests below.


def where(model: Any) -> str:
    """Where an nnsight model's requests run, for a result's notes."""
    return {False: "in-process", "local": "NDIF local simulation", True: "NDIF"}[model.remote]


_where = where  # the earlier name, used by nnsight_experiments


def patch_request(
    nm: Any,
    comp: Component,
    src_tokens: Tensor,
    base_tokens: Tensor,
    with_base: bool,
    by_layer: dict[int, list],
    masks: list[Tensor],
    end: Tensor,
    dh: int,
    cols: Tensor | None,
) -> Tensor:
    """One trace: rows [source | base (first request only) | one base copy per cell]; returns
    the final logits at END of every row (only ``cols`` where the metric reads only those)."""
    B = src_tokens.shape[0]
    n_cells = sum(len(v) for v in by_layer.values())
    lead = 2 if with_base else 1
    inp = torch.cat([src_tokens, *([base_tokens] * (n_cells + lead - 1))])
    rows = torch.arange(inp.shape[0])
    end_rows = end.repeat(n_cells + lead)
    # plain ints, tensors and envoys only: this block's locals are what travels to the server
    layers = sorted(by_layer)
    sites, as_input, plans = [], [], []
    for layer in layers:
        env, is_input, off = _site(nm, comp, layer)
        sites.append(env)
        as_input.append(is_input)
        plans.append(
            [
                (B * (lead + k), off + col * dh, off + (col + 1) * dh, p)
                for k, p, col in by_layer[layer]
            ]
        )
    lm = nm.lm
    with torch.no_grad(), lm.trace(inp, backend=nm.backend()):
        for i in range(len(sites)):
            x = sites[i].input if as_input[i] else sites[i].output
            new = x.clone()
            for r0, a, b, p in plans[i]:
                keep = masks[p][:, :, None].to(x.device)  # NDIF runs the model on GPUs
                new[r0 : r0 + B, :, a:b] = torch.where(keep, x[:B, :, a:b], x[r0 : r0 + B, :, a:b])
            if as_input[i]:
                sites[i].input = new
            else:
                sites[i].output = new
        logits = lm.output.logits[rows, end_rows]
        if cols is not None:
            logits = logits[:, cols]
        saved = logits.save()
    return saved


# ---------------------------------------------------------------------- path patching
# path_patch itself runs core.path_patching's sweep; backends.NNsightBackend packs one frozen
# copy (and for receivers one fresh copy) per sender into the requests below.


def _recv_site(nm: Any, layer: int, which: str) -> tuple[Any, int]:
    """(module envoy whose output holds ``which`` of layer, column offset of head 0)."""
    a = nm.attn(layer)
    if nm.family == "gpt2":
        d = nm.cfg.n_heads * nm.cfg.d_head
        return a.c_attn, {"q": 0, "k": d, "v": 2 * d}[which]
    return getattr(a, f"{which}_proj"), 0


def path_request(
    nm: Any,
    task: Task,
    senders: list[Head],
    mask: Tensor,
    end: Tensor,
    slots: dict,
    to_logits: bool,
    freeze: bool,
    cols: Tensor | None,
) -> Tensor:
    """One trace: rows [corrupt | clean | frozen copy per sender | fresh copy per sender
    (receivers only)]; returns END logits of [corrupt, clean, then per sender its result]."""
    B = task.clean_tokens.shape[0]
    n = len(senders)
    fresh = 0 if to_logits else n
    inp = torch.cat([task.corrupt_tokens, *([task.clean_tokens] * (1 + n + fresh))])
    F0, R0 = 2 * B, (2 + n) * B  # first frozen row, first fresh row
    L = nm.cfg.n_layers
    dh = nm.cfg.d_head
    lo = min((h.layer for h in senders), default=L)  # no senders: the two plain runs only
    stop = L if to_logits else max(layer for layer, _ in slots)
    # per layer: receiver sites [(envoy, [(a, b)])], z envoy, sender patches, mlp envoy
    plan = []
    for layer in range(lo, L if to_logits else stop + 1):
        recv_sites: dict = {}
        for (rl, which), heads in sorted(slots.items(), key=lambda kv: "qkv".index(kv[0][1])):
            if rl == layer:
                env, off = _recv_site(nm, layer, which)
                recv_sites.setdefault(id(env), [env, []])[1].extend(
                    (off + c * dh, off + (c + 1) * dh) for c in heads
                )
        patches = [
            (F0 + k * B, h.head * dh, (h.head + 1) * dh)
            for k, h in enumerate(senders)
            if h.layer == layer
        ]
        freeze_here = layer < stop
        plan.append(
            (
                list(recv_sites.values()),
                nm.z_site(layer) if freeze_here else None,
                patches,
                nm.layer(layer).mlp if freeze_here and freeze else None,
            )
        )
    keep = mask[:, :, None]
    reps = n
    result_rows = torch.arange(F0, R0) if to_logits else torch.arange(R0, R0 + fresh * B)
    ar = torch.cat([torch.arange(2 * B), result_rows])
    end_rows = end.repeat(len(ar) // B)
    lm = nm.lm
    with torch.no_grad(), lm.trace(inp, backend=nm.backend()):
        for sites_r, zsite, patches, mlp in plan:
            for env, spans in sites_r:
                y = env.output
                new = y.clone()
                for a, b in spans:
                    new[R0:, :, a:b] = y[F0:R0, :, a:b]
                env.output = new
            if zsite is not None:
                x = zsite.input
                new = x.clone()
                new[F0:R0] = x[B:F0].repeat(reps, 1, 1)
                for r0, a, b in patches:
                    new[r0 : r0 + B, :, a:b] = torch.where(
                        keep.to(x.device), x[:B, :, a:b], x[B:F0, :, a:b]
                    )
                zsite.input = new
            if mlp is not None:
                m = mlp.output
                new = m.clone()
                new[F0:R0] = m[B:F0].repeat(reps, 1, 1)
                mlp.output = new
        logits = lm.output.logits[ar, end_rows]
        if cols is not None:
            logits = logits[:, cols]
        saved = logits.save()
    return saved


# ---------------------------------------------------------------------- attention


def head_attention(
    model: Any,
    task: Task,
    heads: Any,
    to: Any,
    *,
    at: str = "END",
    which: str = "clean",
) -> Any:
    """``head_attention`` through nnsight: one request reads the heads' attention rows (the
    model runs eager attention, so each attention module returns its pattern)."""
    from circuit_widgets.core.interventions import AttentionResult, Intervention

    if which not in ("clean", "corrupt"):
        raise ValueError(f"which must be 'clean' or 'corrupt', got {which!r}")
    if at == "all":
        raise ValueError(
            "head_attention reads each head's attention row at one query position "
            "per example: at must be a position name (at='END', ...), not 'all'"
        )
    heads = Head.parse_many(heads)
    order = list(dict.fromkeys(heads))
    spec = Intervention(model, task, heads=heads, attend_to=to, scale=1.0, at=at)
    tokens = task.clean_tokens if which == "clean" else task.corrupt_tokens
    layers = sorted({h.layer for h in spec.heads})
    b = len(task)
    ar = torch.arange(b)
    query = task.positions[at].cpu()
    try:
        rows = _attention_request(model, tokens, layers, query)
    except Exception as exc:
        from circuit_widgets.nnsight_model import RemoteError, request_error

        raise (exc if isinstance(exc, RemoteError) else request_error(exc)) from exc
    by_layer = dict(zip(layers, rows, strict=True))
    t = spec.targets
    assert t is not None  # attend_to was given
    out = torch.zeros(b, len(order))
    for i, h in enumerate(order):
        r = by_layer[h.layer][:, h.head].detach().float().cpu()
        hit = torch.zeros_like(r, dtype=torch.bool)
        hit[ar[:, None].expand_as(t), t] = True
        out[:, i] = (r * hit).sum(1)
    label = to if isinstance(to, str) else ("tensor" if isinstance(to, Tensor) else "+".join(to))
    return AttentionResult(per_example=out, heads=order, to=label, at=at, which=which)


def _attention_request(nm: Any, tokens: Tensor, layers: list[int], query: Tensor) -> list:
    """One trace: each layer's attention rows at ``query`` per example, [b, H, s] each."""
    mods = [nm.attn(layer) for layer in layers]
    ar = torch.arange(tokens.shape[0])
    lm = nm.lm
    from nnsight import save

    with torch.no_grad(), lm.trace(tokens, backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        rows = save([])
        for m in mods:
            rows.append(m.output[1][ar, :, query].save())
    return rows


# ---------------------------------------------------------------------- captures


CAPTURE_SITES = ("resid_pre", "q", "k", "v", "pattern", "z")
# the attention module's output (pattern) comes after its o_proj (z)
_ORDER = {site: i for i, site in enumerate(("resid_pre", "q", "k", "v", "z", "pattern"))}


def run_with_edits(
    model: Any,
    tokens: Tensor,
    edits: dict | None = None,
    *,
    capture: Any = (),
    at: Tensor | None = None,
    grad: bool = False,
) -> Any:
    """``run_with_edits`` through nnsight, one request per call. A request cannot carry Python
    functions, so the edits must be ``DeclaredEdit``s (``intervene(...).edits()``): their
    tensors travel and the edit is written out in torch inside the trace. A pattern edit is
    applied as the z it yields (the edited attention row times the layer's values), and a
    captured pattern shows the edited rows, as on a local model."""
    from circuit_widgets.core.edits import EditedRun, check_capture_key

    edits = dict(edits or {})
    for key, fn in edits.items():
        check_capture_key(model, key)
        if not callable(getattr(fn, "spec", None)):
            raise NotImplementedError(
                "run_with_edits with edits written as Python functions is not available on the "
                "nnsight backend (a request cannot carry them); edits built by "
                "intervene(...).edits() travel as tensors; load the model with "
                "backend='transformer_lens' to run other edits"
            )
        if key[1] not in ("pattern", "z"):
            raise NotImplementedError(
                f"editing {key[1]!r} is not available on the nnsight backend (pattern and z are)"
            )
    if grad:
        raise NotImplementedError(
            "run_with_edits(grad=True) is not available on the nnsight backend"
        )
    # in the order the forward reaches them: nnsight reads each activation as it passes
    keys = sorted(
        {check_capture_key(model, k) for k in capture}, key=lambda k: (k[0], _ORDER[k[1]])
    )
    bad = [k for k in keys if k[1] not in CAPTURE_SITES]
    if bad:
        raise NotImplementedError(
            f"capturing {bad[0][1]!r} is not available on the nnsight backend; "
            f"capturable sites: {list(CAPTURE_SITES)}"
        )
    b, s = tokens.shape
    specs: dict[int, list[dict]] = {}
    for (layer, site), fn in sorted(
        edits.items(), key=lambda kv: (kv[0][0], kv[0][1] != "pattern")
    ):
        specs.setdefault(layer, []).append(fn.spec(tokens.cpu()))
    try:
        if specs:
            logits, raw = _edit_request(model, tokens.cpu(), specs, keys, at)
        else:
            logits, raw = _capture_request(model, tokens.cpu(), keys, at)
    except Exception as exc:
        from circuit_widgets.nnsight_model import RemoteError, request_error

        raise (exc if isinstance(exc, RemoteError) else request_error(exc)) from exc
    cfg = model.cfg
    H, K, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    captured = {}
    for key, t in zip(keys, raw, strict=True):
        site = key[1]
        if site in ("q", "z"):
            t = t.reshape(b, s, H, dh)
        elif site in ("k", "v"):
            t = t.reshape(b, s, K, dh)
        captured[key] = t
    for layer, layer_specs in specs.items():
        pattern = captured.get((layer, "pattern"))
        for spec in layer_specs:
            if pattern is not None and spec["kind"] == "pattern":
                # the request edits z; the pattern it read is the model's own, so edit it here
                pattern = pattern.clone()
                for c in spec["cols"]:
                    row = spec["row"].to(pattern.device, pattern.dtype)
                    pattern[torch.arange(b), c, spec["query"].to(pattern.device)] = row
                captured[(layer, "pattern")] = pattern
    return EditedRun(logits, captured)


def _edit_request(
    nm: Any, tokens: Tensor, specs: dict[int, list[dict]], keys: list, at: Tensor | None
) -> tuple:
    """One trace: ``_capture_request`` with each edited layer's z rewritten on its way into the
    output projection (pattern edits first: the edited row times the layer's values)."""
    cfg = nm.cfg
    H, K, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    group = H // K
    b, s = tokens.shape
    ar = torch.arange(b)
    width = H * dh
    kv = K * dh
    # (layer, order, step) in forward order: v, the z edit, then z or pattern captures (which
    # see the edited z); envoys are looked up here, so the trace holds no object of ours
    steps: list[tuple[int, float, tuple]] = []
    for layer, site in keys:
        if site == "resid_pre":
            step: tuple = ("in", nm.layer(layer))
        elif site == "pattern":
            step = ("pattern", nm.attn(layer))
        elif site == "z":
            step = ("z", nm.z_site(layer), layer)
        else:
            env, off = _recv_site(nm, layer, site)
            step = ("out", env, off, off + (width if site == "q" else kv))
        steps.append((layer, _ORDER[site] + (0.6 if site in ("z", "pattern") else 0), step))
    for layer, layer_specs in specs.items():
        venv, voff = None, 0
        if any(spec["kind"] == "pattern" for spec in layer_specs):
            venv, voff = _recv_site(nm, layer, "v")
        steps.append(
            (layer, _ORDER["z"] + 0.5, ("edit", nm.z_site(layer), venv, voff, layer_specs, layer))
        )
    steps.sort(key=lambda t: (t[0], t[1]))
    plan = [st[2] for st in steps]
    lm = nm.lm
    pick = at is not None
    at_rows = at.cpu() if at is not None else ar
    from nnsight import save

    with torch.no_grad(), lm.trace(tokens, backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        out = save([])
        edited = {}
        for i in range(len(plan)):
            step = plan[i]
            if step[0] == "edit":
                _, zsite, venv, voff, layer_specs, layer = step
                v = None
                if venv is not None:  # the values come before z
                    v = venv.output[:, :, voff : voff + kv].reshape(b, s, K, dh)
                x = zsite.input
                z = x.reshape(b, s, H, dh).clone()
                for spec in layer_specs:
                    if spec["kind"] == "pattern":
                        assert v is not None  # read above for every layer with a pattern edit
                        row = spec["row"].to(x.device, x.dtype)
                        q = spec["query"].to(x.device)
                        for c in spec["cols"]:
                            z[ar.to(x.device), q, c] = torch.einsum(
                                "bk,bkd->bd", row, v[:, :, c // group]
                            )
                    else:
                        w = spec["where"].to(x.device)[:, :, None]
                        for j in range(len(spec["cols"])):
                            c = spec["cols"][j]
                            new = z[:, :, c]
                            if spec["source"] is not None:
                                src = spec["source"][:, :, c].to(x.device, x.dtype)
                                new = torch.where(w, src, new)
                            if spec["scale"] is not None:
                                new = torch.where(w, new * float(spec["scale"][j]), new)
                            z[:, :, c] = new
                zsite.input = z.reshape(b, s, width)
                edited[layer] = z.reshape(b, s, width)
            elif step[0] == "in":
                out.append(step[1].input.save())
            elif step[0] == "pattern":
                out.append(step[1].output[1].save())
            elif step[0] == "z":
                out.append((edited[step[2]] if step[2] in edited else step[1].input).save())
            else:
                out.append(step[1].output[:, :, step[2] : step[3]].save())
        logits = lm.output.logits
        if pick:
            logits = logits[ar, at_rows]
        saved = logits.save()
    # captures were saved in forward order; return them in ``keys``' order
    order = sorted(keys, key=lambda k: (k[0], _ORDER[k[1]]))
    by_key = dict(zip(order, out))
    return saved, [by_key[k] for k in keys]


def _capture_request(nm: Any, tokens: Tensor, keys: list, at: Tensor | None) -> tuple:
    """One trace: the listed activations (raw module inputs/outputs) and the logits."""
    plan = []  # (envoy, kind, lo, hi): kind 0 input, 1 output, 2 output[1] (pattern), 3 the
    # previous output again (GPT-2's q, k and v all come from c_attn)
    width = nm.cfg.n_heads * nm.cfg.d_head
    kv = nm.cfg.n_key_value_heads * nm.cfg.d_head
    for layer, site in keys:
        if site == "resid_pre":
            plan.append((nm.layer(layer), 0, 0, 0))
        elif site == "pattern":
            plan.append((nm.attn(layer), 2, 0, 0))
        elif site == "z":
            plan.append((nm.z_site(layer), 0, 0, 0))
        else:
            env, off = _recv_site(nm, layer, site)
            hi = off + (width if site == "q" else kv)
            again = nm.family == "gpt2" and plan and plan[-1][0] is env
            plan.append((env, 3 if again else 1, off, hi if nm.family == "gpt2" else 0))
    ar = torch.arange(tokens.shape[0])
    pick = at is not None
    at_rows = at.cpu() if at is not None else ar
    lm = nm.lm
    from nnsight import save

    with torch.no_grad(), lm.trace(tokens, backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        out = save([])
        for env, kind, lo, hi in plan:
            if kind == 0:
                t = env.input
            elif kind == 2:
                t = env.output[1]
            else:
                t = env.output
                if hi:
                    t = t[:, :, lo:hi]
            out.append(t.save())
        logits = lm.output.logits
        if pick:
            logits = logits[ar, at_rows]
        saved = logits.save()
    return saved, out
