"""Forwards that resume mid-network: the engine every fast patching path runs on.

A ``Trace`` is one full run of a batch (clean or corrupt), kept per layer. ``run_window``
recomputes only what a patch can change: layers from the patched one on, and per example
only positions from ``starts[b]`` on, reading earlier keys/values from the trace. It runs
``V`` patched variants of every example at once (rows laid out ``[V, batch, window, ...]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuit_widgets.core.fast_model import FastModel

Edit = Callable[[Tensor], Tensor]
STAGES = ("resid_pre", "attn", "z", "attn_out", "mlp_out")


@dataclass
class Trace:
    """Per-layer activations of one full forward, batch-first, as the bridge's hooks name them."""

    tokens: Int[Tensor, "b s"]
    resid_pre: list[Tensor]  # n_layers + 1 entries; the last is the input to the final norm
    resid_mid: list[Tensor]
    attn_out: list[Tensor]
    mlp_out: list[Tensor]
    z: list[Tensor]  # [b, s, H, dh]
    k_rot: list[Tensor]  # [b, s, K, dh], after norm and RoPE: what attention reads
    v: list[Tensor]  # [b, s, K, dh]
    _lazy: dict = field(default_factory=dict)

    def qkv_raw(self, eng: FastModel, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """hook_q / hook_k / hook_v values, recomputed on demand (they are rarely needed)."""
        key = ("qkv", layer)
        if key not in self._lazy:
            lay = eng.layers[layer]
            self._lazy[key] = eng.qkv(layer, lay.ln1(self.resid_pre[layer]))
        return self._lazy[key]

    def pattern(self, eng: FastModel, layer: int) -> Float[Tensor, "b H s s"]:
        """hook_pattern, recomputed on demand."""
        key = ("pattern", layer)
        if key not in self._lazy:
            q, _, _ = self.qkv_raw(eng, layer)
            b, s = q.shape[:2]
            pos = torch.arange(s, device=q.device).expand(b, s)
            qr = eng.rotate(layer, q[None], pos, "q")[0]
            masks = causal_masks(eng, torch.zeros(b, dtype=torch.long, device=q.device), s, s)
            _, probs = attend(
                eng,
                layer,
                qr[None],
                self.k_rot[layer][None],
                self.v[layer][None],
                None,
                masks,
                want_pattern=True,
            )
            self._lazy[key] = probs[0]
        return self._lazy[key]

    def subset(self, sl: slice) -> Trace:
        """Examples ``sl`` (a contiguous slice, so every tensor is a view)."""
        pick = lambda xs: [x[sl] for x in xs]
        return Trace(
            self.tokens[sl],
            pick(self.resid_pre),
            pick(self.resid_mid),
            pick(self.attn_out),
            pick(self.mlp_out),
            pick(self.z),
            pick(self.k_rot),
            pick(self.v),
        )


# ---------------------------------------------------------------------- attention


def causal_masks(eng: FastModel, starts: Tensor, w: int, s: int):
    """Which keys each window query may read: (prefix mask [b,w,s], window mask [b,w,w]) per
    sliding-window size. Prefix keys are the trace's positions before each example's start."""
    dev = starts.device
    qpos = starts[:, None] + torch.arange(w, device=dev)[None]  # [b, w]
    j = torch.arange(s, device=dev)
    i = torch.arange(w, device=dev)
    out = {}
    for win in {lay.sliding_window for lay in eng.layers}:
        pre = (j[None, None, :] < starts[:, None, None]).expand(-1, w, -1)
        wm = (i[None, :] <= i[:, None])[None].expand(len(starts), -1, -1)
        if win is not None:
            pre = pre & ((qpos[:, :, None] - j[None, None, :]) < win)
            wm = wm & ((i[:, None] - i[None, :]) < win)[None]
        out[win] = (pre, wm)
    return out


def attend(
    eng: FastModel,
    layer: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    masks: dict,
    want_pattern: bool = False,
):
    """z [V,b,wq,H,dh] from rotated q [V,b,wq,H,dh] and window k, v [V,b,w,K,dh], plus the
    trace's keys/values [b,s,K,dh] for positions before each example's window. Masks are
    [b, wq, keys]; wq is w, or 1 when only END's query is needed."""
    V, b, wq, H, dh = q.shape
    w = k.shape[2]
    K, G = eng.n_kv, eng.group
    qg = q.view(V, b, wq, K, G, dh).permute(0, 1, 3, 4, 2, 5).reshape(V, b, K, G * wq, dh)
    kw = k.permute(0, 1, 3, 2, 4)  # [V, b, K, w, dh]
    vw = v.permute(0, 1, 3, 2, 4)
    pre_mask, win_mask = masks[eng.layers[layer].sliding_window]
    scores = [torch.matmul(qg, kw.transpose(-1, -2)).view(V, b, K, G, wq, w)]
    mask = [win_mask]
    if prefix is not None:
        kp = prefix[0].permute(0, 2, 1, 3)[None]  # [1, b, K, s, dh]
        scores.insert(0, torch.matmul(qg, kp.transpose(-1, -2)).view(V, b, K, G, wq, -1))
        mask.insert(0, pre_mask)
    att = torch.cat(scores, -1) * eng.scale if len(scores) > 1 else scores[0] * eng.scale
    if eng.softcap is not None:
        att = torch.tanh(att / eng.softcap) * eng.softcap
    m = torch.cat(mask, -1) if len(mask) > 1 else mask[0]  # [b, w, keys]
    att = att.masked_fill(~m[None, :, None, None], float("-inf"))
    probs = torch.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
    pg = probs.view(V, b, K, G * wq, -1)
    if prefix is not None:
        s = prefix[0].shape[1]
        vp = prefix[1].permute(0, 2, 1, 3)[None]
        z = torch.matmul(pg[..., :s], vp) + torch.matmul(pg[..., s:], vw)
    else:
        z = torch.matmul(pg, vw)
    z = z.view(V, b, K, G, wq, dh).permute(0, 1, 4, 2, 3, 5).reshape(V, b, wq, H, dh)
    pattern = probs.reshape(V, b, H, wq, -1) if want_pattern else None
    return z, pattern


# ---------------------------------------------------------------------- full forward


def trace_forward(eng: FastModel, tokens: Int[Tensor, "b s"]) -> Trace:
    """One full forward of every position, keeping what later patched runs resume from."""
    b, s = tokens.shape
    tokens = tokens.to(eng.device)
    starts = torch.zeros(b, dtype=torch.long, device=eng.device)
    pos = torch.arange(s, device=eng.device).expand(b, s)
    masks = causal_masks(eng, starts, s, s)
    out = Trace(tokens, [], [], [], [], [], [], [])
    x = eng.embed(tokens)
    for layer in range(eng.n_layers):
        lay = eng.layers[layer]
        out.resid_pre.append(x)
        q, k, v = eng.qkv(layer, lay.ln1(x))
        qr, kr = eng.rotate(layer, q[None], pos, "q"), eng.rotate(layer, k[None], pos, "k")
        z, _ = attend(eng, layer, qr, kr, v[None], None, masks)
        z = z[0]
        attn_out = eng.o_proj(layer, z)
        mid = x + attn_out
        mlp_out = eng.mlp(layer, mid)
        x = mid + mlp_out
        out.z.append(z)
        out.k_rot.append(kr[0])
        out.v.append(v)
        out.attn_out.append(attn_out)
        out.resid_mid.append(mid)
        out.mlp_out.append(mlp_out)
    out.resid_pre.append(x)
    return out


# ---------------------------------------------------------------------- windowed suffix


def window_positions(starts: Int[Tensor, " b"], w: int) -> Int[Tensor, "b w"]:
    return starts[:, None] + torch.arange(w, device=starts.device)[None]


def gather_window(x: Tensor, pos: Int[Tensor, "b w"]) -> Tensor:
    """x [b, s, ...] at per-example positions [b, w] (clamped: junk past the end is unread)."""
    idx = pos.clamp(max=x.shape[1] - 1)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def run_window(
    eng: FastModel,
    base: Trace,
    starts: Int[Tensor, " b"],
    w: int,
    n_variants: int,
    layer: int,
    stage: str,
    init: Tensor | None = None,
    edits: dict[tuple[int, str], Edit] | None = None,
    stop_layer: int | None = None,
    examples: Tensor | None = None,
    end_index: Tensor | None = None,
) -> Float[Tensor, "V b w d"]:
    """The residual stream after layer ``stop_layer - 1`` (default: the last) at the window
    positions, for ``n_variants`` patched copies of ``base``.

    The first layer starts at ``stage``: 'resid_pre' (init = resid_pre), 'attn' (recompute
    attention, with q/k/v edits), 'z' (init = z), 'attn_out' or 'mlp_out' (init = that
    output). ``edits[(layer, 'q'|'k'|'v')]`` rewrites raw q/k/v [V,b,w,heads,dh] in any
    layer (path patching's receivers); ``edits[(layer, 'z')]`` rewrites recomputed z. Positions before ``starts`` must be unchanged by
    every edit: they are read from ``base``. ``examples`` picks a subset of base's examples
    (then ``starts`` and the rows are theirs). With ``end_index`` (per example, in window
    coordinates) only that position is returned, [V, b, d], and the last layer computes its
    query, attention output and MLP there alone (nothing later reads the other positions).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if init is None and stage != "attn":  # only 'attn' recomputes its first input
        raise ValueError(f"stage {stage!r} starts from init=, which is None")
    edits = edits or {}
    V = n_variants
    s = base.tokens.shape[1]
    pos = window_positions(starts, w)
    masks = causal_masks(eng, starts, w, s)
    pick = (lambda t: t) if examples is None else (lambda t: t[examples])
    g = lambda t: gather_window(pick(t), pos)
    expand = lambda t: t[None].expand(V, *t.shape)
    stop = eng.n_layers if stop_layer is None else stop_layer
    x = expand(g(base.resid_pre[layer])) if init is None or stage != "resid_pre" else init
    for l in range(layer, stop):
        first = l == layer
        lay = eng.layers[l]
        if first and stage == "mlp_out":
            mid = expand(g(base.resid_mid[l]))
            x = mid + init
            continue
        if first and stage == "attn_out" and init is not None:
            attn_out = init
        elif first and stage == "z" and init is not None:
            attn_out = eng.o_proj(l, init)
        else:
            q, k, v = eng.qkv(l, lay.ln1(x))
            only_end = end_index is not None and l == eng.n_layers - 1 and stop == eng.n_layers
            for name, t in (("q", q), ("k", k), ("v", v)):
                fn = edits.get((l, name))
                if fn is not None:
                    t = fn(t)
                if name == "q":
                    q = t
                elif name == "k":
                    k = t
                else:
                    v = t
            q_masks, q_pos = masks, pos
            if only_end:
                ar = torch.arange(len(starts), device=starts.device)
                q, x = q[:, ar, end_index][:, :, None], x[:, ar, end_index][:, :, None]
                q_pos = pos[ar, end_index][:, None]
                q_masks = {
                    win: (pre[ar, end_index][:, None], wm[ar, end_index][:, None])
                    for win, (pre, wm) in masks.items()
                }
            qr, kr = eng.rotate(l, q, q_pos, "q"), eng.rotate(l, k, pos, "k")
            z, _ = attend(eng, l, qr, kr, v, (pick(base.k_rot[l]), pick(base.v[l])), q_masks)
            if (l, "z") in edits:  # z is [V, b, wq, H, dh]; wq is 1 where only END is computed
                z = edits[(l, "z")](z)
            attn_out = eng.o_proj(l, z)
        mid = x + attn_out
        x = mid + eng.mlp(l, mid)
    if end_index is None:
        return x
    if x.shape[2] == 1:  # the last layer already kept END only
        return x[:, :, 0]
    return x[:, torch.arange(len(starts), device=starts.device), end_index]
