"""Interventions: forced attention, scaled and replaced head outputs, against plain hooked
references; a planted inhibition head that flips the answer; composition and scoping."""

from __future__ import annotations

import pytest
import torch
from micro_models import random_task, sharp_tiny_model

from circuit_widgets import activation_patch, tiny_model
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.evaluation import mean_ablate
from circuit_widgets.core.interventions import head_attention, intervene
from circuit_widgets.tasks.base import Task
from circuit_widgets.types import Head

pytestmark = pytest.mark.usefixtures("one_thread")

MOVER, INHIBITOR = Head(1, 0), Head(1, 1)
TOKENS = list(range(10, 18))  # the 8 tokens with one-hot embeddings


# --------------------------------------------------------------------------- planted model


def inhibition_micro_model(c: float = 0.5, unembed_scale: float = 60.0):
    """Llama 2x4 (2 KV heads). Tokens 10..17 embed one-hot in dims 0:8, every other token to 0
    there; dim 31 is a big constant (each RMSNorm is a near-constant scale). Layer 0 and all
    W_Q/W_K are zero: attention is uniform over the prefix. Layer 1: heads 0 and 1 share KV
    head 0, whose values read dims 0:8. Head 1.0 (mover) writes +I into the answer dims
    16:24, head 1.1 (inhibitor) writes -c*I; token 10+i unembeds from answer dim i. So a
    token's logit is proportional to (1 - c) x its share of the prefix, and if the inhibitor
    attends only to token t, t's logit drops by c."""
    model = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    hf = model.original_model
    d_vocab = model.cfg.d_vocab
    emb_tok = torch.zeros(d_vocab, 8)
    emb_tok[TOKENS, torch.arange(8)] = 1.0
    eye = torch.eye(8)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0:8] = emb_tok
        emb[:, 31] = 20.0
        for layer in hf.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.down_proj):
                lin.weight.zero_()
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        attn = hf.model.layers[1].self_attn
        attn.v_proj.weight[0:8, 0:8] = eye  # KV head 0 (d_head 8) reads the token dims
        attn.o_proj.weight[16:24, 0:8] = eye  # head 0 -> answer dims, +1
        attn.o_proj.weight[16:24, 8:16] = -c * eye  # head 1 -> answer dims, -c
        hf.model.norm.weight.fill_(1.0)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[:, 16:24] = unembed_scale * emb_tok
    return model


def inhibition_task(model) -> Task:
    """Prompts (right-padded, different lengths) holding the answer once and the distractor
    twice among filler tokens: uniform attention makes the distractor win."""
    pad = model.tokenizer.pad_token_id
    rows, ans, wrong, dpos, apos, ends = [], [], [], [], [], []
    filler = 40
    specs = [(7, 1, (3, 5)), (6, 4, (0, 2)), (8, 6, (1, 3)), (5, 0, (2, 4))]
    for i, (length, a_at, d_at) in enumerate(specs):
        a, d = TOKENS[i], TOKENS[i + 4]
        row = [filler + j for j in range(length)] + [pad] * (8 - length)
        row[a_at] = a
        for p in d_at:
            row[p] = d
        rows.append(row)
        ans.append(a)
        wrong.append(d)
        dpos.append(list(d_at))
        apos.append(a_at)
        ends.append(length - 1)
    toks = torch.tensor(rows)
    mask = (toks != pad).long()
    corrupt = toks.clone()
    corrupt[torch.arange(4), torch.tensor(apos)] = torch.tensor(wrong)
    return Task(
        name="inhibition",
        clean_tokens=toks,
        corrupt_tokens=corrupt,
        attention_mask=mask,
        answers=torch.tensor(ans),
        wrong_answers=torch.tensor(wrong),
        positions={"END": torch.tensor(ends), "A": torch.tensor(apos)},
        position_sets={"distractors": torch.tensor(dpos)},
    )


def test_forcing_the_inhibitor_onto_the_distractor_flips_the_answer():
    model = inhibition_micro_model()
    task = inhibition_task(model)
    before = model(task.clean_tokens)
    assert (task.logit_diff(before) < 0).all()  # the distractor wins, as constructed
    assert (task.accuracy(before) == 0).all()
    with intervene(model, task, heads=[INHIBITOR], attend_to="distractors"):
        after = model(task.clean_tokens)
        att = head_attention(model, task, [INHIBITOR, MOVER], to="distractors")
    assert (task.logit_diff(after) > 0).all()
    assert (task.accuracy(after) == 1).all()  # the answer is now the top token of the vocabulary
    assert att.per_example[:, 0].tolist() == pytest.approx([1.0] * 4)
    # The mover still attends uniformly: 2 distractors among END + 1 prefix positions.
    expect = torch.tensor([2 / (int(e) + 1) for e in task.positions["END"]])
    torch.testing.assert_close(att.per_example[:, 1], expect, atol=1e-5, rtol=1e-5)
    # Hand check of the construction: the inhibitor's write drops the distractor by ~c per unit.
    ar = torch.arange(4)
    drop = (
        before[ar, task.positions["END"], task.wrong_answers]
        - after[ar, task.positions["END"], task.wrong_answers]
    )
    assert (drop > 0).all()
    # Exiting removed the hooks: the model is its old self.
    torch.testing.assert_close(model(task.clean_tokens), before)


# --------------------------------------------------------------------------- plain references


def ref_force(model, task, heads, targets, at="END", tokens=None):
    """Logits with each head's pattern row at `at` set uniform over `targets` [b, k], by loops
    (on the task's clean prompts, or on ``tokens`` with the task's positions)."""

    def hook_for(layer):
        def hook(act, hook):
            out = act.clone()
            for b in range(act.shape[0]):
                q = int(task.positions[at][b])
                for h in heads:
                    if h.layer != layer:
                        continue
                    out[b, h.head, q] = 0
                    for k in targets[b].tolist():
                        out[b, h.head, q, k] += 1 / targets.shape[1]
            return out

        return hook

    layers = sorted({h.layer for h in heads})
    return model.run_with_hooks(
        task.clean_tokens if tokens is None else tokens,
        fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", hook_for(l)) for l in layers],
    )


def ref_z(model, task, heads, fn_cell):
    """Logits with z[b, p, h] replaced by fn_cell(layer, b, p, h, z) for every real cell."""

    def hook_for(layer):
        def hook(act, hook):
            out = act.clone()
            for b in range(act.shape[0]):
                for p in range(act.shape[1]):
                    for h in heads:
                        if h.layer == layer:
                            out[b, p, h.head] = fn_cell(layer, b, p, h.head, act[b, p, h.head])
            return out

        return hook

    layers = sorted({h.layer for h in heads})
    return model.run_with_hooks(
        task.clean_tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook_for(l)) for l in layers]
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_forced_attention_matches_reference(arch):
    model = sharp_tiny_model(arch)
    task = random_task(model)
    heads = [Head(0, 1), Head(1, 3)]
    targets = torch.stack([task.positions["S"], torch.zeros(len(task), dtype=torch.long)], 1)
    with torch.no_grad():
        ref = ref_force(model, task, heads, targets)
        plain = model(task.clean_tokens)
        with intervene(model, task, heads=heads, attend_to=targets) as iv:
            got = model(task.clean_tokens)
        fast = run_with_edits(model, task.clean_tokens, iv.edits()).logits
    assert (ref - plain).abs().max() > 1e-3  # the edit really changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)  # edits() through the fast engine


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_scale_and_replace_match_reference(arch):
    model = sharp_tiny_model(arch)
    task = random_task(model)
    heads = [Head(0, 2), Head(1, 1)]
    _, cache = model.run_with_cache(task.corrupt_tokens)
    end = task.positions["END"]
    with torch.no_grad():
        ref_zero = ref_z(model, task, heads, lambda l, b, p, h, z: z * 0)
        with intervene(model, task, heads=heads, scale=0.0, at="all"):
            got_zero = model(task.clean_tokens)
        ref_scale = ref_z(
            model, task, heads, lambda l, b, p, h, z: z * (3.0 if p == int(end[b]) else 1.0)
        )
        with intervene(model, task, heads=heads, scale={heads[0]: 3.0, heads[1]: 3.0}):
            got_scale = model(task.clean_tokens)
        ref_rep = ref_z(
            model, task, heads, lambda l, b, p, h, z: cache[f"blocks.{l}.attn.hook_z"][b, p, h]
        )
        with intervene(model, task, heads=heads, replace_with="corrupt", at="all"):
            got_rep = model(task.clean_tokens)
    torch.testing.assert_close(got_zero, ref_zero, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_scale, ref_scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_rep, ref_rep, atol=1e-5, rtol=1e-5)
    assert (got_zero - model(task.clean_tokens)).abs().max() > 1e-4


def test_replace_with_another_task_at_end(tiny_llama):
    task = random_task(tiny_llama, seed=0)
    other = random_task(tiny_llama, seed=1, lengths=(5, 7, 4, 6))
    head = Head(1, 2)
    _, cache = tiny_llama.run_with_cache(other.clean_tokens)
    src = cache["blocks.1.attn.hook_z"]
    end, oend = task.positions["END"], other.positions["END"]
    with torch.no_grad():
        ref = ref_z(
            tiny_llama,
            task,
            [head],
            lambda l, b, p, h, z: src[b, int(oend[b]), h] if p == int(end[b]) else z,
        )
        with intervene(tiny_llama, task, heads=[head], replace_with=other):
            got = tiny_llama(task.clean_tokens)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_head_attention_matches_cache(tiny_llama):
    model = sharp_tiny_model("llama")
    task = random_task(model)
    heads = [Head(0, 0), Head(1, 3)]
    res = head_attention(model, task, heads, to="S")
    _, cache = model.run_with_cache(task.clean_tokens)
    for i, h in enumerate(heads):
        pat = cache[f"blocks.{h.layer}.attn.hook_pattern"]
        for b in range(len(task)):
            expect = float(
                pat[b, h.head, int(task.positions["END"][b]), int(task.positions["S"][b])]
            )
            assert float(res.per_example[b, i]) == pytest.approx(expect, abs=1e-5)
    assert list(res.as_dict()) == ["0.0", "1.3"]


# --------------------------------------------------------------------------- composition, scope


def test_composes_with_patching_and_ablation(tiny_llama):
    task = random_task(tiny_llama)
    head = Head(1, 1)
    outside = activation_patch(tiny_llama, task, component="z")
    assert abs(float(outside.values[1, 1])) > 0
    with intervene(tiny_llama, task, heads=[head], scale=0.0, at="all"):
        inside = activation_patch(tiny_llama, task, component="z")
        abl = mean_ablate(tiny_llama, task, [(l, h) for l in range(2) for h in range(4)])
    # The zeroed head's output is 0 in clean and corrupt runs: patching it changes nothing.
    assert float(inside.values[1, 1]) == pytest.approx(0.0, abs=1e-6)
    assert any("hooks" in n for n in inside.notes)
    # Mean ablation keeping every head is the intervened model itself.
    with torch.no_grad():
        ref = ref_z(tiny_llama, task, [head], lambda l, b, p, h, z: z * 0)
    assert abl.metric == pytest.approx(float(task.metric(ref).mean()), abs=1e-4)
    after = activation_patch(tiny_llama, task, component="z")
    torch.testing.assert_close(after.values, outside.values)


def test_other_batch_inside_the_block_fails_clearly(tiny_llama):
    task = random_task(tiny_llama)
    other = random_task(tiny_llama, seed=5)
    with intervene(tiny_llama, task, heads=["1.0"], attend_to="S"):
        tiny_llama(task.corrupt_tokens)  # the task's own corrupt prompts are fine
        tiny_llama(task.subset([2, 0]).clean_tokens)  # and any subset of them
        with pytest.raises(ValueError, match="bound to the prompts of task"):
            tiny_llama(other.clean_tokens)
        with pytest.raises(ValueError, match="bound to the prompts of task"):
            head_attention(tiny_llama, other, ["1.0"], to="S")
        # One foreign row among the task's own is refused too.
        mixed = torch.cat([task.clean_tokens[:1], other.clean_tokens[1:2]])
        with pytest.raises(ValueError, match=r"row 1 of a forward's batch"):
            tiny_llama(mixed)
        with pytest.raises(ValueError, match="bound to the prompts of task"):
            mean_ablate(tiny_llama, task, [(1, 0)], reference_task=other)
    assert not any(hp._forward_hooks for hp in tiny_llama.hook_dict.values())


def test_batches_of_the_tasks_prompts_get_each_examples_edit():
    """Rows of a batch are matched to examples by their tokens: any subset of the clean and
    corrupt prompts, in any order, trimmed of padding, gets each example's own edit."""
    model = sharp_tiny_model("llama")
    task = random_task(model)
    heads = [Head(0, 1), Head(1, 3)]
    targets = torch.stack([task.positions["S"], torch.zeros(len(task), dtype=torch.long)], 1)
    end = task.positions["END"]
    ar = torch.arange(len(task))
    with torch.no_grad():
        ref_clean = ref_force(model, task, heads, targets)[ar, end]
        ref_corrupt = ref_force(model, task, heads, targets, tokens=task.corrupt_tokens)[ar, end]
        # Clean 1 (5 tokens) and corrupt 3 (4 tokens), trimmed to 5 columns as Task.subset trims.
        rows = torch.stack([task.clean_tokens[1, :5], task.corrupt_tokens[3, :5]])
        with intervene(model, task, heads=heads, attend_to=targets):
            got = model(rows)
            sub = task.subset([3, 1])
            got_sub = model(sub.clean_tokens)[torch.arange(2), sub.positions["END"]]
        plain = model(rows)
    assert (got[1, int(end[3])] - plain[1, int(end[3])]).abs().max() > 1e-3  # the edit applies
    torch.testing.assert_close(got[0, int(end[1])], ref_clean[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, int(end[3])], ref_corrupt[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sub, ref_clean[[3, 1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit", ["attend", "replace"])
def test_batched_experiments_inside_the_block_equal_unbatched(edit):
    from circuit_widgets.core.evaluation import completeness, faithfulness, minimality

    model = sharp_tiny_model("llama")
    task = random_task(model)
    kw = (
        {"attend_to": "S"}
        if edit == "attend"
        else {"replace_with": random_task(model, seed=1, lengths=(5, 7, 4, 6))}
    )
    circ = [(1, 0), (0, 2), (1, 3)]
    outside = mean_ablate(model, task, circ)
    with intervene(model, task, heads=[(0, 1), (1, 3)], **kw):
        one = mean_ablate(model, task, circ)
        two = mean_ablate(model, task, circ, batch_size=2)
        f1 = faithfulness(model, task, circ, n_random=1)
        f2 = faithfulness(model, task, circ, n_random=1, batch_size=2)
        c1 = completeness(model, task, circ, subsets="groups")
        c2 = completeness(model, task, circ, subsets="groups", batch_size=3)
        m1 = minimality(model, task, circ, k_sets="empty")
        m2 = minimality(model, task, circ, k_sets="empty", batch_size=1)
        a1 = head_attention(model, task, ["1.3", "1.0"], to="S")
        a2 = head_attention(model, task.subset([2, 0]), ["1.3", "1.0"], to="S")
    assert abs(one.metric - outside.metric) > 1e-4  # the intervention is in force
    torch.testing.assert_close(two.per_example, one.per_example, atol=1e-5, rtol=1e-5)
    assert f2.full_metric == pytest.approx(f1.full_metric, abs=1e-5)
    assert f2.circuit_metric == pytest.approx(f1.circuit_metric, abs=1e-5)
    assert f2.random_metric == pytest.approx(f1.random_metric, abs=1e-5)
    assert c2.f_circuit == pytest.approx(c1.f_circuit, abs=1e-5)
    assert c2.f_model == pytest.approx(c1.f_model, abs=1e-5)
    assert m2.scores == pytest.approx(m1.scores, abs=1e-5)
    torch.testing.assert_close(a2.per_example, a1.per_example[[2, 0]], atol=1e-6, rtol=1e-6)


def test_dcm_runs_in_batches_inside_the_block():
    from circuit_widgets.core.masking import dcm
    from circuit_widgets.tasks import Desideratum

    model = sharp_tiny_model("llama")
    task = random_task(model, n=6, lengths=(7, 5, 6, 4, 7, 5))
    heads = [Head(0, 1), Head(1, 3)]
    targets = torch.stack([task.positions["S"], torch.zeros(len(task), dtype=torch.long)], 1)
    end = task.positions["END"]
    with torch.no_grad():
        forced = ref_force(model, task, heads, targets)[torch.arange(len(task)), end]
        plain = model(task.clean_tokens)[torch.arange(len(task)), end]
    assert (
        forced.argmax(-1)[[5, 2]] != plain.argmax(-1)[[5, 2]]
    ).any()  # it matters on the test part
    # Targets are the intervened model's own predictions: with no patch it hits every one.
    mask = task.attention_mask
    d = Desideratum(
        "forced",
        task.clean_tokens,
        task.corrupt_tokens,
        mask,
        mask.clone(),
        {"END": end},
        {"END": end.clone()},
        forced.argmax(-1),
    )
    parts = (d.subset([0, 3]), d.subset([4, 1]), d.subset([5, 2]))
    with intervene(model, task, heads=heads, attend_to=targets):
        res = dcm(model, parts, heads=["0.0", "1.1"], epochs=1, batch_size=1)
    assert res.complete and res.baseline_accuracy == 1.0


def test_bad_intervention_input(tiny_llama):
    task = random_task(tiny_llama)
    with pytest.raises(ValueError, match=r"head 2\.0 is outside the model"):
        intervene(tiny_llama, task, heads=["2.0"], scale=0.0)
    with pytest.raises(ValueError, match="no position or position set 'wrong_colors'"):
        intervene(tiny_llama, task, heads=["1.0"], attend_to="wrong_colors")
    with pytest.raises(ValueError, match="needs attend_to, scale or replace_with"):
        intervene(tiny_llama, task, heads=["1.0"])
    with pytest.raises(ValueError, match="at must be 'all' or a position"):
        intervene(tiny_llama, task, heads=["1.0"], scale=0.0, at="IO")
    with pytest.raises(ValueError, match="at or before"):
        intervene(tiny_llama, task, heads=["1.0"], attend_to=task.positions["END"] + 1, at="S")
    with pytest.raises(ValueError, match="one source prompt per example"):
        intervene(tiny_llama, task, heads=["1.0"], replace_with=task.subset([0]))
    with pytest.raises(ValueError, match="head_attention reads .* not 'all'"):
        head_attention(tiny_llama, task, ["1.0"], to="S", at="all")
    with pytest.raises(
        ValueError, match=r"cannot read a head from \(1\.7, 2\.9\): its parts must be integers"
    ):
        intervene(tiny_llama, task, heads=[(1.7, 2.9)], scale=0.0)


def test_a_tuple_of_heads_is_a_list_of_heads(tiny_llama):
    task = random_task(tiny_llama)
    assert intervene(tiny_llama, task, heads=((1, 2), (0, 1)), scale=0.0).heads == [
        Head(0, 1),
        Head(1, 2),
    ]
    assert intervene(tiny_llama, task, heads=("1.2", Head(0, 1)), scale=0.0).heads == [
        Head(0, 1),
        Head(1, 2),
    ]
    assert intervene(tiny_llama, task, heads=(1, 2), scale=0.0).heads == [
        Head(1, 2)
    ]  # one (l, h) pair
    res = head_attention(tiny_llama, task, ((1, 3), (0, 0)), to="S")
    assert res.heads == [Head(1, 3), Head(0, 0)]
