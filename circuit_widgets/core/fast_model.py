"""A functional view of supported Hugging Face decoders, for forwards that start mid-network.

The bridge can only run a whole forward; patching needs to resume at layer L and at position
p from cached activations. ``FastModel`` reuses the model's own (unhooked) HF modules for
embeddings, norms, projections and MLPs, and computes attention itself so that it can mix
cached keys/values with recomputed ones. Covered: GPT-2, Llama-family (SmolLM2) and Gemma 3
text models; anything else returns ``None`` and the callers fall back to bridge hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuit_widgets.types import ModelLike

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "Gemma3ForCausalLM")


def _raw(module: Any) -> Any:
    """The HF module a bridge component wraps (so no hooks fire), or the module itself."""
    return getattr(module, "original_component", None) or module


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class _Layer:
    ln1: Any
    ln2: Any
    attn: Any
    mlp: Any
    proj: dict  # raw projections (nn.Linear / Conv1D), bypassing the bridge's hooked wrappers
    post_attn: Any = None  # Gemma 3 normalises each branch's output before adding it
    post_mlp: Any = None
    sliding_window: int | None = None
    rope_key: str | None = None


class FastModel:
    """Block-level functions of one supported model. Holds modules, never the bridge."""

    def __init__(self, hf: Any, family: str, n_heads: int, n_kv: int, d_head: int) -> None:
        self.family = family
        self.n_heads, self.n_kv, self.d_head = n_heads, n_kv, d_head
        self.group = n_heads // n_kv
        cfg = hf.config
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        if family == "gpt2":
            tr = _raw(hf.transformer)
            self.wte, self.wpe = _raw(tr.wte), _raw(tr.wpe)
            self.ln_f = _raw(tr.ln_f)
            self.rotary = None
            self.layers = []
            for block in tr.h:
                b = _raw(block)
                a, mlp = _raw(b.attn), _raw(b.mlp)
                # the bridge computes q/k/v with its own split copies of c_attn: read those
                split = b.attn if hasattr(b.attn, "q") else None
                proj = {
                    "o": _raw(a.c_proj),
                    "fc": _raw(mlp.c_fc),
                    "down": _raw(mlp.c_proj),
                    "act": mlp.act,
                }
                if split is not None:
                    proj.update(q=_raw(split.q), k=_raw(split.k), v=_raw(split.v))
                else:
                    proj["qkv"] = _raw(a.c_attn)
                self.layers.append(_Layer(_raw(b.ln_1), _raw(b.ln_2), a, mlp, proj))
            self.scale = d_head**-0.5
            self.softcap = None
        else:
            base = _raw(hf.model)
            self.wte, self.wpe = _raw(base.embed_tokens), None
            self.ln_f = _raw(base.norm)
            self.rotary = _raw(base.rotary_emb)
            layer_types = getattr(cfg, "layer_types", None)
            self.layers = []
            for i, block in enumerate(base.layers):
                b = _raw(block)
                attn, mlp = _raw(b.self_attn), _raw(b.mlp)
                gemma = family == "gemma3"
                proj = {n: _raw(getattr(attn, f"{n}_proj")) for n in "qkvo"}
                proj.update(
                    gate=_raw(mlp.gate_proj),
                    up=_raw(mlp.up_proj),
                    down=_raw(mlp.down_proj),
                    act=mlp.act_fn,
                )
                self.layers.append(
                    _Layer(
                        _raw(b.input_layernorm),
                        _raw(b.pre_feedforward_layernorm if gemma else b.post_attention_layernorm),
                        attn,
                        mlp,
                        proj,
                        post_attn=_raw(b.post_attention_layernorm) if gemma else None,
                        post_mlp=_raw(b.post_feedforward_layernorm) if gemma else None,
                        sliding_window=getattr(attn, "sliding_window", None),
                        rope_key=layer_types[i] if (gemma and layer_types) else None,
                    )
                )
            a0 = self.layers[0].attn
            self.scale = float(a0.scaling)
            self.softcap = getattr(a0, "attn_logit_softcapping", None)
        self.lm_head = _raw(hf.lm_head)
        self.n_layers = len(self.layers)
        self._rope_cache: dict[str | None, tuple[Tensor, Tensor]] = {}  # by layer type

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bridge(cls, model: ModelLike) -> FastModel | None:
        """A FastModel for a supported architecture, else None (callers then use hooks)."""
        hf = getattr(model, "original_model", None)
        name = type(hf).__name__
        if hf is None or name not in SUPPORTED:
            return None
        devices = {p.device for p in hf.parameters()}
        if len(devices) != 1:
            return None  # spread over devices: leave it to the bridge
        cfg = hf.config
        n_heads = int(model.cfg.n_heads)
        d_head = int(model.cfg.d_head)
        n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
        if name == "GPT2LMHeadModel":
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(
                cfg, "scale_attn_weights", True
            ):
                return None
            return cls(hf, "gpt2", n_heads, n_kv, d_head)
        if getattr(cfg, "use_bidirectional_attention", False):
            return None
        if name == "LlamaForCausalLM" and getattr(cfg, "pretraining_tp", 1) not in (1, None):
            return None
        return cls(hf, "gemma3" if name.startswith("Gemma3") else "llama", n_heads, n_kv, d_head)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ pieces

    def embed(self, tokens: Int[Tensor, "b s"]) -> Float[Tensor, "b s d"]:
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))[None]
        return x

    def rope_table(self, layer: int, n_pos: int) -> tuple[Tensor, Tensor] | None:
        """cos/sin [n_pos, d_head] for absolute positions 0..n_pos-1, from the model's own rotary."""
        if self.rotary is None:
            return None
        key = self.layers[layer].rope_key
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].shape[0] < n_pos:
            n = max(n_pos, 64)
            pos = torch.arange(n, device=self.device)[None]
            dummy = torch.zeros(1, n, self.d_head, device=self.device, dtype=self.dtype)
            cos, sin = self.rotary(dummy, pos, key) if key else self.rotary(dummy, pos)
            cached = (cos[0], sin[0])
            self._rope_cache[key] = cached
        return cached

    def qkv(self, layer: int, normed: Float[Tensor, "*r d"]):
        """Raw q [*r,H,dh], k, v [*r,K,dh]: the bridge's hook_q/hook_k/hook_v values."""
        p, dh = self.layers[layer].proj, self.d_head
        lead = normed.shape[:-1]
        if "qkv" in p:
            q, k, v = p["qkv"](normed).split(self.n_heads * dh, dim=-1)
        else:
            q, k, v = p["q"](normed), p["k"](normed), p["v"](normed)
        return (
            q.view(*lead, self.n_heads, dh),
            k.view(*lead, self.n_kv, dh),
            v.view(*lead, self.n_kv, dh),
        )

    def rotate(self, layer: int, x: Tensor, pos: Int[Tensor, "b w"], which: str) -> Tensor:
        """q or k after the per-head norm (Gemma 3) and RoPE; x is [V, b, w, heads, dh]."""
        if self.family == "gemma3":
            a = self.layers[layer].attn
            x = (a.q_norm if which == "q" else a.k_norm)(x)
        table = self.rope_table(layer, int(pos.max()) + 1)
        if table is None:
            return x
        cos, sin = table[0][pos][:, :, None, :], table[1][pos][:, :, None, :]  # [b, w, 1, dh]
        return (x * cos) + (_rotate_half(x) * sin)

    def o_proj(self, layer: int, z: Float[Tensor, "*r H dh"]) -> Float[Tensor, "*r d"]:
        """Attention output as the bridge's hook_attn_out sees it (Gemma: after its norm)."""
        lay = self.layers[layer]
        flat = z.reshape(*z.shape[:-2], self.n_heads * self.d_head).contiguous()
        out = lay.proj["o"](flat)
        return lay.post_attn(out) if lay.post_attn is not None else out

    def mlp(self, layer: int, resid_mid: Float[Tensor, "*r d"]) -> Float[Tensor, "*r d"]:
        """MLP output as hook_mlp_out sees it (Gemma: after its norm)."""
        lay = self.layers[layer]
        p, x = lay.proj, lay.ln2(resid_mid)
        if self.family == "gpt2":
            out = p["down"](p["act"](p["fc"](x)))
        else:
            out = p["down"](p["act"](p["gate"](x)) * p["up"](x))
        return lay.post_mlp(out) if lay.post_mlp is not None else out

    def logits(self, resid: Float[Tensor, "*r d"], cols: Tensor | None = None) -> Tensor:
        """Final norm and unembedding, on every vocab column or only on ``cols``."""
        x = self.ln_f(resid)
        if cols is None:
            out = self.lm_head(x)
        else:
            w = self.lm_head.weight[cols]
            b = self.lm_head.bias[cols] if self.lm_head.bias is not None else None
            out = torch.nn.functional.linear(x, w, b)
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out
