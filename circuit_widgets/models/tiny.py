"""Tiny random models (GPT-2, Llama, Gemma 3) with a small word-level tokenizer, built locally
for tests and teaching."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch

from circuit_widgets.models._common import _quiet, _write_dir_atomically, cache_dir


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


def tiny_tokenizer() -> Any:
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
