"""Cross-model activation patching on tiny models: identity, full reproduction, planted heads,
GQA key/value heads, a plain run_with_hooks reference, validation and partial runs."""

from __future__ import annotations

import math

import pytest
import torch

from circuit_widgets import Circuit, Head, tiny_model
from circuit_widgets.core import cache
from circuit_widgets.core.cross_model import (
    CMAPResult,
    check_compatible,
    cmap,
    cmap_grid,
    cmap_logits,
)
from circuit_widgets.tasks import ioi


def _layer(model, i):
    attn = model.original_model.model.layers[i].self_attn
    raw = lambda m: getattr(m, "original_component", None) or m
    return {n: raw(getattr(attn, f"{n}_proj")) for n in "qkvo"}, model.original_model.model.layers[
        i
    ].mlp


def _llama(seed=0, n_kv_heads=2, n_layers=2):
    return tiny_model(
        "llama", n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, seed=seed
    )


def _perturb_rows(linear, rows, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight[rows] += scale * torch.randn(linear.weight[rows].shape, generator=g)


@pytest.fixture(scope="module")
def task():
    return ioi(_llama(), n=6, seed=0)


@pytest.fixture(scope="module")
def pair():
    """The fine-tuned copy differs in every attention and MLP weight, not in embeddings."""
    base, ft = _llama(), _llama()
    for i in range(2):
        proj, mlp = _layer(ft, i)
        for j, lin in enumerate(
            list(proj.values()) + [getattr(mlp, "original_component", mlp).gate_proj]
        ):
            _perturb_rows(lin, slice(None), seed=10 * i + j, scale=0.3)
    return base, ft


@pytest.fixture(scope="module")
def planted():
    """No GQA; only heads 1.0 and 1.3 differ (their W_V rows), in the last layer."""
    base, ft = _llama(n_kv_heads=4), _llama(n_kv_heads=4)
    proj, _ = _layer(ft, 1)
    for h in (0, 3):
        _perturb_rows(proj["v"], slice(8 * h, 8 * (h + 1)), seed=h, scale=3.0)
    return base, ft


def _logits(model, task):
    with torch.no_grad():
        return model(task.clean_tokens)


def test_identical_models_change_nothing_exactly(task):
    a, b = _llama(), _llama()
    for ft in (a, b):  # the same object, and a separate copy with equal weights
        res = cmap(
            a, ft, task, heads="all", component=("z", "attn_out", "mlp_out"), positions="all"
        )
        assert torch.equal(res.patched_metric[0], res.base_metric)
        # The fine-tuned run has another batch shape, so it matches to float precision only.
        torch.testing.assert_close(res.base_metric, res.finetuned_metric, atol=1e-6, rtol=1e-6)
        grid = cmap_grid(a, ft, task, component="z", position="END")
        assert grid.kind == "cmap" and grid.complete
        assert torch.equal(grid.values, torch.zeros_like(grid.values))


def test_all_components_everywhere_reproduce_the_finetuned_logits(pair, task):
    base, ft = pair
    want = _logits(ft, task)
    assert (want - _logits(base, task)).abs().max() > 0.1  # the pair really differs
    shape_masks = {}
    b, s = task.clean_tokens.shape
    for layer in range(2):
        for site in ("attn_out", "mlp_out"):
            shape_masks[(layer, site)] = torch.ones(b, s, 1, dtype=torch.bool)
    got = cmap_logits(base, ft, task.clean_tokens, shape_masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    res = cmap(base, ft, task, heads=[0, 1], component=["attn_out", "mlp_out"], positions="all")
    torch.testing.assert_close(res.patched_metric[0], res.finetuned_metric, atol=1e-5, rtol=1e-5)
    assert float(res.recovered[0]) == pytest.approx(1.0, abs=1e-4)


def test_z_everywhere_reproduces_a_finetune_of_q_k_v_only(task):
    base, ft = _llama(), _llama()
    for i in range(2):
        proj, _ = _layer(ft, i)
        for j, n in enumerate("qkv"):
            _perturb_rows(proj[n], slice(None), seed=5 * i + j, scale=0.5)
    res = cmap(base, ft, task, heads="all", component="z", positions="all")
    torch.testing.assert_close(res.patched_metric[0], res.finetuned_metric, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(res.base_metric, res.finetuned_metric, atol=1e-3)


def test_planted_heads_rank_first_and_recover_the_finetune(planted, task):
    base, ft = planted
    grid = cmap_grid(base, ft, task, component="z", position="END")
    top = grid.top(4)
    assert {h for h, _ in top[:2]} == {Head(1, 0), Head(1, 3)}
    others = [
        grid.values[l, h] for l in range(2) for h in range(4) if (l, h) not in ((1, 0), (1, 3))
    ]
    assert all(float(v) == 0.0 for v in others)  # every other head's z is identical in both models
    # recovered = share of the base -> fine-tuned gap closed: 0 where the head is the same
    gap = float(grid.metric_corrupt.mean() - grid.metric_clean.mean())
    torch.testing.assert_close(grid.recovered, grid.values / gap)
    assert float(grid.recovered[0, 2]) == 0.0 and float(grid.recovered[1, 0]) != 0.0
    res = cmap(base, ft, task, heads=[(1, 0), (1, 3)], positions="END")
    torch.testing.assert_close(res.patched_metric[0], res.finetuned_metric, atol=1e-5, rtol=1e-5)
    one = cmap(base, ft, task, heads=[(1, 0)], positions="END")
    assert not torch.allclose(one.patched_metric[0], res.finetuned_metric, atol=1e-4)


def test_circuit_groups_and_the_whole_circuit(planted, task):
    base, ft = planted
    circ = Circuit.from_groups(
        {"A": [(1, 0)], "B": [(1, 3)], "C": [(0, 1)]}, positions={"A": "END", "B": "END", "C": "S2"}
    )
    res = cmap(base, ft, task, circuit=circ)
    assert res.groups == ["A", "B", "C", "circuit"]
    assert res.positions["C"] == "S2" and res.heads["circuit"] == [
        Head(0, 1),
        Head(1, 0),
        Head(1, 3),
    ]
    torch.testing.assert_close(res.patched_metric[3], res.finetuned_metric, atol=1e-5, rtol=1e-5)
    assert torch.equal(res.patched_metric[2], res.base_metric)  # head 0.1 is the same in both
    df = res.to_dataframe()
    assert list(df["group"]) == res.groups and df["recovered"].iloc[3] == pytest.approx(
        1.0, abs=1e-4
    )
    over = cmap(base, ft, task, circuit=circ, positions={"A": "IO"})
    assert over.positions["A"] == "IO" and over.positions["B"] == "END"
    # "circuit" names all groups together: a lone group may take it, one of several may not
    lone = cmap(base, ft, task, circuit=Circuit.from_groups({"circuit": [(1, 0)]}))
    alone = cmap(base, ft, task, circuit=Circuit.from_groups({"A": [(1, 0)]}))
    assert lone.groups == ["circuit"] and torch.equal(lone.patched_metric, alone.patched_metric)
    assert not torch.equal(lone.patched_metric[0], lone.base_metric)
    with pytest.raises(ValueError, match="group name 'circuit' is taken.*'A', 'circuit'"):
        cmap(base, ft, task, circuit=Circuit.from_groups({"A": [(1, 0)], "circuit": [(1, 3)]}))


def _reference(base, ft, task, layer, heads, position):
    """Plain TransformerLens hooks: cache the fine-tuned hook_z, write it into the base."""
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, ft_cache = ft.run_with_cache(task.clean_tokens, names_filter=[name])
        src = ft_cache[name]
        rows = torch.arange(len(task))
        pos = task.positions[position]

        def hook(act, hook=None):
            act = act.clone()
            for h in heads:
                act[rows, pos, h] = src[rows, pos, h]
            return act

        logits = base.run_with_hooks(task.clean_tokens, fwd_hooks=[(name, hook)])
    return task.metric(logits)


def test_matches_a_run_with_hooks_reference(pair, task):
    base, ft = pair
    want = _reference(base, ft, task, 1, [0, 2], "END")
    res = cmap(base, ft, task, heads=[(1, 0), (1, 2)], positions="END")
    torch.testing.assert_close(res.patched_metric[0], want, atol=1e-5, rtol=1e-5)
    grid = cmap_grid(base, ft, task, position="S2")
    for l, h in ((0, 1), (1, 3)):
        ref = _reference(base, ft, task, l, [h], "S2") - res.base_metric
        torch.testing.assert_close(grid.per_example[:, l, h], ref, atol=1e-5, rtol=1e-5)
    with cache.force_hooked():  # the bridge-hook engine gives the same numbers
        hooked = cmap(base, ft, task, heads=[(1, 0), (1, 2)], positions="END")
    torch.testing.assert_close(hooked.patched_metric, res.patched_metric, atol=1e-5, rtol=1e-5)


def test_gqa_kv_heads_say_which_query_heads_share_them(task):
    base, ft = _llama(), _llama()
    proj, _ = _layer(ft, 1)
    _perturb_rows(proj["v"], slice(8, 16), seed=3, scale=3.0)  # key/value head 1 = query heads 2, 3
    grid = cmap_grid(base, ft, task, component="v")
    assert grid.shape == (2, 2) and grid.kv_groups == [[0, 1], [2, 3]]
    assert grid.heads[1] == "kv1 (q2-3)"
    assert grid.top(1)[0][0] == Head(1, 1) and float(grid.values[1, 0]) == 0.0
    circ = Circuit.from_heads([(1, 3)])  # a query head, at every position: maps to kv head 1
    res = cmap(base, ft, task, circuit=circ, component="v")
    by_kv = cmap(base, ft, task, heads=[(1, 1)], component="v", positions="all")
    assert torch.equal(res.patched_metric[0], by_kv.patched_metric[0])
    torch.testing.assert_close(res.patched_metric[0], res.finetuned_metric, atol=1e-5, rtol=1e-5)
    assert res.kv_groups == [[0, 1], [2, 3]] and any("q2-3" in n for n in res.notes)


def test_q_k_components_and_layers(pair, task):
    base, ft = pair
    for comp in ("q", "k", "attn_out", "mlp_out"):
        grid = cmap_grid(base, ft, task, component=comp, position="END")
        assert grid.complete and not torch.isnan(grid.values).any()
        assert grid.component == comp
    res = cmap(base, ft, task, heads=[1], component="mlp_out", positions="END")
    assert res.heads["heads"] == [Head(1, 0)]


def test_validation_errors(pair, task):
    base, ft = pair
    with pytest.raises(ValueError, match="exactly one of circuit"):
        cmap(base, ft, task)
    with pytest.raises(ValueError, match="exactly one of circuit"):
        cmap(base, ft, task, heads=[(0, 0)], circuit=Circuit.from_heads([(0, 0)]))
    with pytest.raises(ValueError, match="pattern"):
        cmap(base, ft, task, heads=[(0, 0)], component="pattern")
    with pytest.raises(ValueError, match="END"):
        cmap(base, ft, task, heads=[(0, 0)], positions="nowhere")
    with pytest.raises(ValueError, match="0..3"):
        cmap(base, ft, task, heads=[(0, 7)])
    with pytest.raises(ValueError, match="0..1"):
        cmap(base, ft, task, heads=[(5, 0)])
    with pytest.raises(ValueError, match="key/value heads 0..1"):
        cmap(base, ft, task, heads=[(0, 3)], component="k")
    with pytest.raises(ValueError, match="batch_size"):
        cmap_grid(base, ft, task, batch_size=0)
    with pytest.raises(TypeError, match="TransformerBridge"):
        cmap(base, object(), task, heads=[(0, 0)])
    with pytest.raises(TypeError):
        cmap(base, ft, task, heads=[(0, 0)], position="END")  # unknown keyword


def test_mismatched_models_name_the_difference():
    base = _llama()
    cases = [
        (_llama(n_layers=3), "layers"),
        (tiny_model("llama", n_layers=2, n_heads=2, n_kv_heads=2, d_model=32), "heads"),
        (tiny_model("llama", n_layers=2, n_heads=2, n_kv_heads=2, d_model=32), "d_head"),
        (tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64), "d_model"),
        (tiny_model("gpt2", n_layers=2, n_heads=4, d_model=32), "architecture"),
    ]
    for other, word in cases:
        with pytest.raises(ValueError, match=word):
            check_compatible(base, other)
    check_compatible(base, _llama(seed=3))  # other weights, same everything else


def hf_llama(vocab_size: int, seed: int = 0):
    """A bare transformers Llama shaped like the tiny_llama fixture (for peft and custom tokenizers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
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


def test_mismatched_vocabulary_is_named(tmp_path):
    from transformers import AutoTokenizer

    from circuit_widgets import load_model

    base = _llama()
    tok = AutoTokenizer.from_pretrained(base.tokenizer.name_or_path)
    tok.add_tokens(["<extra_token>"])  # same model vocabulary size, another token -> id map
    tok.save_pretrained(tmp_path)  # the bridge reloads its tokenizer from a folder
    tok = AutoTokenizer.from_pretrained(tmp_path)
    other = load_model(hf_llama(base.cfg.d_vocab), tokenizer=tok)
    with pytest.raises(ValueError, match="vocabulary"):
        check_compatible(base, other)


def test_progress_and_stop_keep_partial_results(pair, task):
    base, ft = pair
    seen = []
    res = cmap(
        base,
        ft,
        task,
        heads=[(1, 0)],
        positions="END",
        batch_size=2,
        on_progress=lambda d, t: seen.append((d, t)),
        should_stop=lambda: len(seen) >= 1,
    )
    assert seen == [(1, 3)] and not res.complete
    assert res.done.tolist() == [True, True, False, False, False, False]
    assert math.isnan(float(res.patched_metric[0, 3])) and not math.isnan(
        float(res.group("heads")["patched_metric"])
    )
    calls = []
    grid = cmap_grid(
        base,
        ft,
        task,
        batch_size=4,
        on_progress=lambda d, t: calls.append(d),
        should_stop=lambda: len(calls) >= 2,
    )
    assert not grid.complete and 0 < int(grid.done.sum()) < 8
    assert (
        torch.isnan(grid.values[~grid.done]).all() and not torch.isnan(grid.values[grid.done]).any()
    )
    full = cmap_grid(base, ft, task, batch_size=4)
    assert full.complete and torch.allclose(
        full.values, cmap_grid(base, ft, task).values, atol=1e-6
    )


def test_result_type(pair, task):
    base, ft = pair
    res = cmap(base, ft, task, heads=[(1, 0)])
    assert isinstance(res, CMAPResult) and res.positions == {"heads": None}
    assert res.patched_metric.shape == (1, len(task)) and res.patched_accuracy.shape == (
        1,
        len(task),
    )
    assert "CMAPResult" in repr(res)


def test_only_key_value_heads_differing_is_named():
    with pytest.raises(ValueError, match=r"key/value heads \(n_kv_heads\): base 2, finetuned 4"):
        check_compatible(_llama(n_kv_heads=2), _llama(n_kv_heads=4))


def _reloaded(tok, folder):
    tok.save_pretrained(folder)  # the bridge reloads its tokenizer from a folder
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_tokenizers_differing_only_in_special_tokens_are_named(tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from circuit_widgets import load_model

    base = _llama()
    tok = AutoTokenizer.from_pretrained(base.tokenizer.name_or_path)
    other = next(t for t in tok.get_vocab() if t not in tok.all_special_tokens)
    tok.bos_token = tok.eos_token = other  # the same token -> id map, other special ids
    special = _reloaded(tok, tmp_path / "special")
    assert special.get_vocab() == base.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="bos_token_id") as err:
        check_compatible(base, load_model(hf_llama(base.cfg.d_vocab), tokenizer=special))
    assert "eos_token_id" in str(err.value) and "pad_token_id" not in str(err.value)
    tok = AutoTokenizer.from_pretrained(base.tokenizer.name_or_path)
    tok.backend_tokenizer.normalizer = (
        normalizers.Lowercase()
    )  # same vocabulary, other ids for "Mary"
    lower = _reloaded(tok, tmp_path / "lower")
    with pytest.raises(ValueError, match="tokenizer backend: normalizer differ"):
        check_compatible(base, load_model(hf_llama(base.cfg.d_vocab), tokenizer=lower))
    ft = _llama(seed=1)
    ft.cfg.default_prepend_bos = not base.cfg.default_prepend_bos
    with pytest.raises(ValueError, match="default_prepend_bos"):
        check_compatible(base, ft)
    ft = _llama(seed=1)
    ft.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer: base has one, finetuned has none"):
        check_compatible(base, ft)


def test_a_heads_list_must_not_mix_column_kinds(pair, task):
    base, ft = pair
    for comps in (["z", "v"], ["q", "k"], ["z", "attn_out"], ["v", "mlp_out"]):
        with pytest.raises(ValueError, match="mix .* and .*give a circuit"):
            cmap(base, ft, task, heads=[(1, 1)], component=comps, positions="END")
    # One kind is fine; so is 'all' (every column of each) and a circuit (query heads, mapped).
    zq = cmap(base, ft, task, heads=[(1, 1)], component=["z", "q"], positions="END")
    kv = cmap(base, ft, task, heads=[(1, 1)], component=["k", "v"], positions="END")
    assert zq.heads["heads"] == kv.heads["heads"] == [Head(1, 1)]
    every = cmap(base, ft, task, heads="all", component=["z", "v"], positions="END")
    assert every.complete
    circ = cmap(
        base, ft, task, circuit=Circuit.from_heads([(1, 3)], position="END"), component=["z", "v"]
    )
    alone = cmap(base, ft, task, heads=[(1, 3)], component="z", positions="END")
    assert not torch.allclose(circ.patched_metric, alone.patched_metric)  # v of kv head 1 came too


def test_each_group_is_patched_at_its_own_position(task):
    """Head 0.2's query differs; its z at S2 reaches END through layer 1, its z at token 0 is
    the same in both models (a one-key softmax ignores the query)."""
    import dataclasses

    base, ft = _llama(), _llama()
    proj, _ = _layer(ft, 0)
    _perturb_rows(proj["q"], slice(16, 24), seed=7, scale=3.0)
    first = torch.zeros_like(task.positions["END"])
    t = dataclasses.replace(task, positions={**task.positions, "first": first})
    head = [(0, 2)]
    at_s2 = cmap(base, ft, t, heads=head, positions="S2")
    every = cmap(base, ft, t, heads=head, positions="all")
    at_first = cmap(base, ft, t, heads=head, positions="first")
    b = at_s2.base_metric
    assert (at_s2.patched_metric[0] - b).abs().max() > 1e-3
    assert (every.patched_metric[0] - b).abs().max() > 1e-3
    assert (every.patched_metric[0] - at_s2.patched_metric[0]).abs().max() > 1e-3
    assert torch.equal(at_first.patched_metric[0], at_first.base_metric)
    # The same in one call: each group's cells at its own position, the circuit at all of them.
    circ = Circuit.from_groups(
        {"s2": head, "every": head, "first": head}, positions={"s2": "S2", "first": "first"}
    )
    res = cmap(base, ft, t, circuit=circ)
    assert res.positions == {"s2": "S2", "every": None, "first": "first", "circuit": "per group"}
    torch.testing.assert_close(res.patched_metric[0], at_s2.patched_metric[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.patched_metric[1], every.patched_metric[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(res.patched_metric[2], res.base_metric)
    torch.testing.assert_close(res.patched_metric[3], every.patched_metric[0], atol=1e-5, rtol=1e-5)
