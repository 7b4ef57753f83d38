"""CMAP from a model with a live (unmerged) peft LoRA adapter equals CMAP from the merged model.

The study's code rebuilt o_proj from base weights and silently dropped an o_proj adapter; here
the adapter must reach every patched activation, on the fast engine and on bridge hooks alike,
and an adapter the bridge never runs (GPT-2's fused c_attn) is an error, not a silent no-op.
"""

from __future__ import annotations

import copy

import pytest
import torch

from circuit_widgets import load_model
from circuit_widgets.core import cache
from circuit_widgets.core.cross_model import check_compatible, cmap, cmap_grid
from circuit_widgets.models import tiny_tokenizer
from circuit_widgets.tasks import ioi

peft = pytest.importorskip("peft")


def _hf_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf = LlamaForCausalLM(cfg).eval()
    hf.config.architectures = ["LlamaForCausalLM"]
    return hf


def _pair(targets):
    """(base, live LoRA, merged LoRA) bridges; the adapter's B is random, so it is not a no-op."""
    tok = tiny_tokenizer()
    hf = _hf_llama(len(tok))
    base = load_model(copy.deepcopy(hf), tokenizer=tok)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
    with torch.no_grad():  # make the adapter's effect large enough to matter
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    merged_hf = copy.deepcopy(pm).merge_and_unload()
    live = load_model(pm.get_base_model(), tokenizer=tok)
    merged = load_model(merged_hf, tokenizer=tok)
    assert any("lora" in type(m).__module__ for m in live.original_model.modules())
    return base, live, merged


@pytest.fixture(scope="module")
def o_proj_pair():
    return _pair(["o_proj"])


@pytest.fixture(scope="module")
def task(o_proj_pair):
    return ioi(o_proj_pair[0], n=4, seed=0)


@pytest.mark.parametrize("hooked", [False, True])
def test_o_proj_adapter_is_patched_live_as_merged(o_proj_pair, task, hooked):
    base, live, merged = o_proj_pair
    # Both engines run: the fast one calls the peft modules, the bridge wraps them.
    assert cache.engine_for(live) is not None
    with cache.force_hooked(hooked):
        kw = {"heads": [0, 1], "component": ["attn_out", "mlp_out"], "positions": "all"}
        got, want = cmap(base, live, task, **kw), cmap(base, merged, task, **kw)
        with torch.no_grad():
            live_metric = task.metric(live(task.clean_tokens))
    # The adapter matters, and both the live run and the patched base carry it.
    assert (live_metric - got.base_metric).abs().max() > 0.05
    torch.testing.assert_close(got.finetuned_metric, live_metric, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.patched_metric, want.patched_metric, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.patched_metric[0], live_metric, atol=1e-5, rtol=1e-5)
    grid_live = cmap_grid(base, live, task, component="attn_out")
    grid_merged = cmap_grid(base, merged, task, component="attn_out")
    torch.testing.assert_close(grid_live.values, grid_merged.values, atol=1e-5, rtol=1e-5)
    assert grid_live.values.abs().max() > 0.01


def test_qkv_adapter_z_patching_live_as_merged(task):
    base, live, merged = _pair(["q_proj", "k_proj", "v_proj"])
    got = cmap(base, live, task, heads="all", positions="all")
    want = cmap(base, merged, task, heads="all", positions="all")
    torch.testing.assert_close(got.patched_metric, want.patched_metric, atol=1e-5, rtol=1e-5)
    # Only q/k/v changed, so every head's z everywhere reproduces the fine-tuned output.
    torch.testing.assert_close(got.patched_metric[0], got.finetuned_metric, atol=1e-5, rtol=1e-5)
    assert (got.finetuned_metric - got.base_metric).abs().max() > 0.05
    g_live, g_merged = (
        cmap_grid(base, live, task, component="v"),
        cmap_grid(base, merged, task, component="v"),
    )
    torch.testing.assert_close(g_live.values, g_merged.values, atol=1e-5, rtol=1e-5)


def _gpt2_pair(targets):
    """(base bridge, live LoRA bridge, merged LoRA bridge, task, HF's own live-adapter metric)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    hf.config.architectures = ["GPT2LMHeadModel"]
    base = load_model(copy.deepcopy(hf), tokenizer=tok)
    task = ioi(base, n=4, seed=0)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        init_lora_weights=False,
        fan_in_fan_out=True,
    )
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
        hf_metric = task.metric(pm(task.clean_tokens).logits)  # HF's forward, before any bridge
    merged = load_model(copy.deepcopy(pm).merge_and_unload(), tokenizer=tok)
    try:
        live = load_model(copy.deepcopy(pm), tokenizer=tok)
    except ValueError:  # load_model refuses an adapter its bridge never runs; wrap it by hand
        from transformer_lens.model_bridge import TransformerBridge

        live = TransformerBridge.boot_transformers(
            "gpt2-lora", hf_model=copy.deepcopy(pm).get_base_model(), tokenizer=base.tokenizer
        )
    return base, live, merged, task, hf_metric, pm, tok


def test_gpt2_c_attn_adapter_the_bridge_never_runs_is_refused():
    base, live, merged, task, hf_metric, pm, tok = _gpt2_pair(["c_attn"])
    with pytest.raises(ValueError, match=r"model: .*c_attn.*merge_and_unload"):
        load_model(copy.deepcopy(pm), tokenizer=tok)  # refused at load, before any experiment
    # Both engines would compute q/k/v from the bridge's split copies of c_attn, without the adapter.
    assert (hf_metric - task.metric(base(task.clean_tokens))).abs().max() > 0.05
    names = r"transformer\.h\.0\.attn\.c_attn, transformer\.h\.1\.attn\.c_attn"
    for call in (
        lambda: cmap(base, live, task, heads="all", positions="all"),
        lambda: cmap_grid(base, live, task),
        lambda: check_compatible(base, live),
    ):
        with pytest.raises(ValueError, match=f"finetuned model: .*{names}.*merge_and_unload"):
            call()
    with pytest.raises(ValueError, match=f"base model: .*{names}"):
        cmap(live, merged, task, heads="all")
    # Merged, the adapter is in the weights: its z everywhere gives HF's live-adapter behaviour.
    res = cmap(base, merged, task, heads="all", positions="all")
    torch.testing.assert_close(res.finetuned_metric, hf_metric, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.patched_metric[0], hf_metric, atol=1e-4, rtol=1e-4)


def test_gpt2_adapters_the_bridge_runs_are_not_refused():
    base, live, merged, task, hf_metric, _, _ = _gpt2_pair(["c_proj", "c_fc"])
    kw = {"heads": [0, 1], "component": ["attn_out", "mlp_out"], "positions": "all"}
    got, want = cmap(base, live, task, **kw), cmap(base, merged, task, **kw)
    torch.testing.assert_close(got.finetuned_metric, hf_metric, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.patched_metric, want.patched_metric, atol=1e-5, rtol=1e-5)
