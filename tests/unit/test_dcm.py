"""DCM: a planted model's carrier heads are found exactly; training matches a plain hook-based
reference step for step; lambda extremes, seeds, progress/stop and bad input behave."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from circuit_widgets import tiny_model
from circuit_widgets.core.masking import MaskResult, SweepResult, dcm, dcm_sweep
from circuit_widgets.tasks import Desideratum, desiderata
from circuit_widgets.types import Circuit, Head

pytestmark = pytest.mark.usefixtures("one_thread")

USED = list(range(10, 18))  # the planted model's vocabulary: one-hot tokens 10..17
FRAME_FIRST, FRAME_END = 10, 11  # every prompt starts with 10 and ends with 11


# --------------------------------------------------------------------------- planted model


def planted_dcm_model(carriers: dict, *, const: float = 20.0, scale: float = 100.0):
    """Llama 2 layers x 4 heads (2 KV heads), hand-set: token t in USED embeds as one-hot i in
    dims 0:8 (plus a big constant dim 31, so every RMSNorm is a near-constant scale). W_Q = W_K
    = 0 (uniform causal attention); every V reads the token dims; MLPs write nothing. Carrier
    head h writes its z into dims 8:16 with weight carriers[h], every other W_O is 0; token i
    unembeds from dim 8 + i. So a carrier's output at END votes for the tokens of its prompt,
    in proportion to their counts; nothing else reaches the logits.
    """
    model = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    hf = model.original_model
    eye = torch.eye(8)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.zero_()
        for i, t in enumerate(USED):
            emb[t, i] = 1.0
        emb[:, 31] = const
        for layer_idx, layer in enumerate(hf.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.down_proj):
                lin.weight.zero_()
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            for g in range(2):
                attn.v_proj.weight[g * 8 : (g + 1) * 8, 0:8] = eye
            for (cl, ch), w in carriers.items():
                if cl == layer_idx:
                    attn.o_proj.weight[8:16, ch * 8 : (ch + 1) * 8] = w * eye
        hf.model.norm.weight.fill_(1.0)
        head = hf.lm_head
        head.weight.zero_()
        for i, t in enumerate(USED):
            head.weight[t, 8 + i] = scale
        bias = getattr(head.original_component, "bias", None)
        if bias is not None:
            bias.zero_()
    return model


def planted_desideratum(n: int = 40, seed: int = 0, width: int = 9) -> Desideratum:
    """Base [10, a, a, ..., a, 11], source [10, b, ..., b, 11] (lengths 5..width, right-padded),
    target b: a carrier head patched at END votes for b instead of a."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(n, width, dtype=torch.long)
    src, mask = base.clone(), base.clone()
    targets, end = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(5, width + 1, (1,), generator=g))
        a, b = (torch.randperm(6, generator=g)[:2] + 12).tolist()
        base[i, :length] = torch.tensor([FRAME_FIRST] + [a] * (length - 2) + [FRAME_END])
        src[i, :length] = torch.tensor([FRAME_FIRST] + [b] * (length - 2) + [FRAME_END])
        mask[i, :length] = 1
        targets[i], end[i] = b, length - 1
    return Desideratum(
        "planted", base, src, mask, mask.clone(), {"END": end}, {"END": end.clone()}, targets
    )


CARRIERS = {Head(0, 1): 1.0, Head(1, 0): 1.0, Head(1, 3): 1.0}  # 0.0 shares 0.1's KV head


@pytest.fixture(scope="module")
def planted():
    return planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})


def weights_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before: list[torch.Tensor]) -> None:
    after = list(model.parameters())
    assert len(after) == len(before)
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before)), "weights changed"


# --------------------------------------------------------------------------- plain reference


def source_z(model, d: Desideratum, layers) -> dict[int, torch.Tensor]:
    names = {f"blocks.{l}.attn.hook_z": l for l in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(d.source_tokens, names_filter=lambda n: n in names)
    return {l: cache[n].clone() for n, l in names.items()}


def ref_target_logits(model, d: Desideratum, mask: dict, position: str, src: dict) -> torch.Tensor:
    """Target logit at each base END with z[b, pos_b, h] <- m z + (1 - m) z_source[b, pos_s, h],
    one example at a time, through the bridge's own hooks; mask {Head: scalar tensor}."""
    pb, ps = d.base_positions[position], d.source_positions[position]
    hooks = []
    for layer in sorted({h.layer for h in mask}):

        def hook(z, hook, layer=layer):
            out = z.clone()
            for b in range(z.shape[0]):
                for h, m in mask.items():
                    if h.layer == layer:
                        out[b, pb[b], h.head] = (
                            m * z[b, pb[b], h.head] + (1 - m) * src[layer][b, ps[b], h.head]
                        )
            return out

        hooks.append((f"blocks.{layer}.attn.hook_z", hook))
    logits = model.run_with_hooks(d.base_tokens, fwd_hooks=hooks)
    end = d.base_positions["END"]
    return torch.stack([logits[b, end[b], d.targets[b]] for b in range(len(d))])


def ref_accuracy(model, d: Desideratum, patched, position: str, src: dict) -> float:
    """Whole-vocabulary argmax == target with the ``patched`` heads fully from the source."""
    with torch.no_grad():
        pb, ps = d.base_positions[position], d.source_positions[position]
        hooks = []
        for layer in sorted({h.layer for h in patched}):

            def hook(z, hook, layer=layer):
                out = z.clone()
                for b in range(z.shape[0]):
                    for h in patched:
                        if h.layer == layer:
                            out[b, pb[b], h.head] = src[layer][b, ps[b], h.head]
                return out

            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        logits = model.run_with_hooks(d.base_tokens, fwd_hooks=hooks)
    end = d.base_positions["END"]
    hits = [int(logits[b, end[b]].argmax()) == int(d.targets[b]) for b in range(len(d))]
    return sum(hits) / len(d)


def random_desideratum(model, n: int = 15, width: int = 10, seed: int = 0) -> Desideratum:
    """Random prompts of different lengths; 'mid' at a different index in base and source.
    Targets: the plain model's prediction for odd examples, the all-heads-patched one for
    even ones, so accuracies are far from 0 and 1 and depend on the patch."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.cfg.d_vocab)
    lb = torch.randint(5, width + 1, (n,), generator=g)
    ls = torch.clamp(lb - torch.randint(0, 2, (n,), generator=g), min=5)
    ar = torch.arange(width)[None]
    mb, ms = (ar < lb[:, None]).long(), (ar < ls[:, None]).long()
    base = torch.randint(1, vocab, (n, width), generator=g) * mb
    src = torch.randint(1, vocab, (n, width), generator=g) * ms
    mid_b = torch.stack([torch.randint(1, int(x) - 1, (1,), generator=g)[0] for x in lb])
    mid_s = torch.stack([torch.randint(1, int(x) - 1, (1,), generator=g)[0] for x in ls])
    pos_b, pos_s = {"END": lb - 1, "mid": mid_b}, {"END": ls - 1, "mid": mid_s}
    d = Desideratum("random", base, src, mb, ms, pos_b, pos_s, torch.zeros(n, dtype=torch.long))
    n_layers = int(model.cfg.n_layers)
    src_z = source_z(model, d, range(n_layers))
    with torch.no_grad():
        plain = model(base)[torch.arange(n), lb - 1].argmax(-1)
        hooks = []
        for layer in range(n_layers):

            def hook(z, hook, layer=layer):
                out = z.clone()
                for b in range(n):
                    out[b, mid_b[b]] = src_z[layer][b, mid_s[b]]
                return out

            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        patched = model.run_with_hooks(base, fwd_hooks=hooks)[torch.arange(n), lb - 1].argmax(-1)
    targets = torch.where(torch.arange(n) % 2 == 1, plain, patched)
    return Desideratum("random", base, src, mb, ms, pos_b, pos_s, targets)


# --------------------------------------------------------------------------- planted circuit


def test_planted_carriers_are_selected_exactly_over_a_range_of_lambda(planted):
    """Each carrier raises the target logit by about 5.6 when patched, the others by exactly 0:
    every lambda below that selects exactly the carriers; far above it, nothing."""
    before = weights_of(planted)
    flags = [p.requires_grad for p in planted.parameters()]
    d = planted_desideratum()
    sweep = dcm_sweep(planted, d, lams=[0.0, 0.01, 0.3, 2.0, 1000.0], lr=0.2, batch_size=8)
    assert isinstance(sweep, SweepResult) and sweep.complete
    for r in sweep.results[:4]:
        chosen = set(r.selected)
        assert chosen == set(CARRIERS), (r.lam, r.selected)  # precision and recall 1
        assert r.test_accuracy == r.val_accuracy == r.train_accuracy == 1.0
        assert r.complete and r.heads == [Head(l, h) for l in range(2) for h in range(4)]
        non = r.mask[
            [h.layer for h in r.heads if h not in CARRIERS],
            [h.head for h in r.heads if h not in CARRIERS],
        ]
        assert torch.equal(non, torch.ones_like(non))  # zero gradient: never moved
    big = sweep.results[4]
    assert big.selected == [] and big.test_accuracy == 0.0
    assert sweep.baseline_accuracy == 0.0 and sweep.full_patch_accuracy == 1.0
    assert sweep.n_selected.tolist() == [3, 3, 3, 3, 0]
    assert_unchanged(planted, before)
    assert [p.requires_grad for p in planted.parameters()] == flags


def test_lambda_between_head_gains_keeps_exactly_the_stronger_heads():
    """Carriers of weights 1, 2, 4 raise the target logit by g, 2g, 4g (g measured with plain
    hooks): a lambda between two gains selects exactly the heads whose gain exceeds it."""
    weights = {Head(0, 2): 1.0, Head(1, 1): 2.0, Head(0, 0): 4.0}
    model = planted_dcm_model({(h.layer, h.head): w for h, w in weights.items()})
    d = planted_desideratum(n=40, seed=1)
    train = d.split((0.6, 0.2, 0.2), seed=0)[0]
    src = source_z(model, train, [0, 1])
    with torch.no_grad():
        clean = ref_target_logits(model, train, {}, "END", src).mean()
        gain = {
            h: float(
                ref_target_logits(model, train, {h: torch.tensor(0.0)}, "END", src).mean() - clean
            )
            for h in weights
        }
    g = gain[Head(0, 2)]
    assert g > 1.0
    assert gain[Head(1, 1)] == pytest.approx(2 * g, rel=0.02)
    assert gain[Head(0, 0)] == pytest.approx(4 * g, rel=0.02)
    for lam, expected in (
        (1.5 * g, {Head(1, 1), Head(0, 0)}),
        (3 * g, {Head(0, 0)}),
        (0.5 * g, set(weights)),
        (5 * g, set()),
    ):
        r = dcm(model, d, lam=lam, lr=0.2, epochs=3, batch_size=8)
        assert set(r.selected) == expected, (lam / g, r.selected, r.mask)


def test_lambda_zero_on_a_desideratum_every_head_serves_selects_every_head():
    every = {(l, h): 1.0 for l in range(2) for h in range(4)}
    model = planted_dcm_model(every, scale=40.0)
    r = dcm(model, planted_desideratum(n=30, seed=2), lam=0.0, lr=0.2, batch_size=6)
    assert len(r.selected) == 8 and r.test_accuracy == 1.0
    assert torch.all(r.rounded == 0)


def test_heads_subset_trains_only_those_heads(planted):
    d = planted_desideratum(n=20, seed=3)
    r = dcm(planted, d, heads=["0.1", (1, 2), Head(1, 3)], lr=0.3, batch_size=4)
    assert r.heads == [Head(0, 1), Head(1, 2), Head(1, 3)]
    assert set(r.selected) == {Head(0, 1), Head(1, 3)}
    assert int(r.mask.isnan().sum()) == 5 and not r.mask[1, 2].isnan()
    # two of three carriers patched: the target wins (2 votes for b, 1 for a) on every example
    assert r.test_accuracy == 1.0 and r.full_patch_accuracy == 1.0
    c = r.circuit()
    assert isinstance(c, Circuit) and set(c) == {Head(0, 1), Head(1, 3)}
    assert c.groups[0].position == "END"
    df = r.to_dataframe()
    assert list(df["selected"]) == [True, False, True] and len(df) == 3


# --------------------------------------------------------------------------- reference


def sensitive_tiny_model(arch: str):
    """The conftest tiny model (GQA for llama) with attention weights x8, so that head outputs
    move the prediction (at init they barely do). A private instance."""
    model = tiny_model(
        arch,
        n_layers=2,
        n_heads=4,
        n_kv_heads={"llama": 2, "gemma3": 1}.get(arch),
        d_model=32,
        seed=0,
    )
    if arch == "gemma3":
        return model  # its branch outputs are normalised (scaling cancels) and its norms random
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
                lin.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_training_matches_a_plain_hook_reference_step_for_step(arch):
    """Mask mixing at per-example positions that differ between base and source, Adam steps,
    clamping, validation each step and the reported accuracies all equal a plain loop."""
    model = sensitive_tiny_model(arch)
    before = weights_of(model)
    d = random_desideratum(model, n=30, seed=4)
    heads = [Head(0, 1), Head(0, 2), Head(0, 3), Head(1, 0)]  # 1.0 at 'mid' cannot reach END
    lam, lr = 1e-4, 0.3
    r = dcm(
        model,
        d,
        heads=heads,
        position="mid",
        lam=lam,
        lr=lr,
        epochs=3,
        batch_size=64,
        eval_every=1,
        seed=5,
    )
    assert_unchanged(model, before)

    train, val, test = d.split((0.6, 0.2, 0.2), seed=5)
    srcs = {
        name: source_z(model, part, [0, 1])
        for name, part in (("train", train), ("val", val), ("test", test))
    }
    m = torch.ones(len(heads), requires_grad=True)
    opt = torch.optim.Adam([m], lr=lr)
    losses, val_accs, masks = [], [], []
    for _ in range(3):  # one batch per epoch holds every training example: order is moot
        logit = ref_target_logits(model, train, dict(zip(heads, m)), "mid", srcs["train"])
        loss = -logit.mean() + lam * (1 - m).sum()
        (grad,) = torch.autograd.grad(loss, m)
        m.grad = grad
        opt.step()
        with torch.no_grad():
            m.clamp_(0, 1)
        losses.append(float(loss.detach()))
        masks.append(m.detach().clone())
        patched = [h for h, x in zip(heads, m.tolist()) if x < 0.5]
        val_accs.append(ref_accuracy(model, val, patched, "mid", srcs["val"]))
    torch.testing.assert_close(r.curve.loss, torch.tensor(losses), atol=1e-4, rtol=1e-4)
    got_final = torch.stack([r.final_mask[h.layer, h.head] for h in heads])
    torch.testing.assert_close(got_final, masks[-1], atol=1e-5, rtol=0)
    assert r.curve.val_step.tolist() == [1, 2, 3]
    assert r.curve.val_accuracy.tolist() == pytest.approx(val_accs)
    assert any(0 < x < 1 for x in masks[-1].tolist())  # the test means something
    assert masks[-1][3] == 1.0  # no gradient reaches a layer-1 head at 'mid'
    best = r.best_step
    kept = [h for h, x in zip(heads, masks[best - 1].tolist()) if x < 0.5]
    assert r.selected == kept and r.val_accuracy == pytest.approx(val_accs[best - 1])
    assert r.val_accuracy == max(val_accs)
    assert r.test_accuracy == pytest.approx(ref_accuracy(model, test, kept, "mid", srcs["test"]))
    assert r.train_accuracy == pytest.approx(ref_accuracy(model, train, kept, "mid", srcs["train"]))
    assert r.baseline_accuracy == pytest.approx(ref_accuracy(model, test, [], "mid", srcs["test"]))
    assert r.full_patch_accuracy == pytest.approx(
        ref_accuracy(model, test, heads, "mid", srcs["test"])
    )


def test_same_seed_same_mask_other_seed_other_order(tiny_llama):
    d = random_desideratum(tiny_llama, n=20, seed=6)
    kw = {"position": "mid", "lam": 0.01, "lr": 0.2, "epochs": 2, "batch_size": 3}
    a, b = dcm(tiny_llama, d, seed=3, **kw), dcm(tiny_llama, d, seed=3, **kw)
    assert torch.equal(a.final_mask, b.final_mask) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.curve.loss, b.curve.loss) and a.selected == b.selected
    c = dcm(tiny_llama, d, seed=4, **kw)
    assert not torch.equal(a.curve.loss, c.curve.loss)
    # an already split desideratum is used as given
    parts = d.split((0.5, 0.25, 0.25), seed=0)
    e = dcm(tiny_llama, parts, seed=3, **kw)
    assert e.n_examples == (10, 5, 5)


# --------------------------------------------------------------------------- progress and stop


def test_progress_covers_the_run_and_stop_returns_a_partial_result(planted):
    d = planted_desideratum(n=20, seed=7)
    calls = []
    full = dcm(planted, d, lr=0.2, batch_size=4, on_progress=lambda a, b: calls.append((a, b)))
    totals = {t for _, t in calls}
    assert len(totals) == 1 and calls[-1][0] == calls[-1][1]
    assert [a for a, _ in calls] == sorted(a for a, _ in calls)
    assert full.complete and len(full.curve) == 6

    seen = []
    r = dcm(
        planted,
        d,
        lr=0.2,
        batch_size=4,
        on_progress=lambda a, b: seen.append(a),
        should_stop=lambda: len(seen) >= 14,
    )  # 5 source + 5 key/value batches, 3 steps, 1 check
    assert not r.complete and len(r.curve) == 3 and r.curve.val_step.tolist() == [3]
    assert math.isnan(r.test_accuracy) and math.isnan(r.baseline_accuracy)
    assert r.val_accuracy == 1.0 and set(r.selected) == set(CARRIERS)  # best check so far

    early = dcm(planted, d, should_stop=lambda: True)
    assert not early.complete and early.selected == [] and len(early.curve) == 0
    assert "stopped before training began" in early.notes
    assert torch.all(early.mask == 1)


def test_sweep_stops_within_a_lambda_and_keeps_what_it_finished(planted):
    d = planted_desideratum(n=20, seed=8)
    seen, got = [], []
    sweep = dcm_sweep(
        planted,
        d,
        lams=[0.01, 0.1, 1.0],
        lr=0.2,
        batch_size=4,
        on_progress=lambda a, b: seen.append((a, b)),
        on_result=lambda r: got.append(r),
        should_stop=lambda: len(seen) >= 10 + 2 + 12 + 3,
    )  # prep: 5 + 5, references: 1 + 1
    assert not sweep.complete and [r.lam for r in sweep.results] == [0.01, 0.1]
    assert sweep.results[0].complete and not sweep.results[1].complete
    # each lambda reached on_result as it finished, reference accuracies included
    assert got == sweep.results and not math.isnan(got[0].baseline_accuracy)
    assert got[0].full_patch_accuracy == got[1].full_patch_accuracy == sweep.full_patch_accuracy
    assert len({t for _, t in seen}) == 1
    assert sweep.at(0.012).lam == 0.01 and sweep.at(0.5).lam == 0.1
    df = sweep.to_dataframe()
    assert list(df["lam"]) == [0.01, 0.1] and "selected" in df


def test_weights_written_in_place_during_dcm_are_caught():
    """_frozen records each parameter's version: a normal run passes, an in-place write to a
    weight mid-training (here from on_progress, with unchanged values) raises on exit."""
    model = planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})  # a private copy
    d = planted_desideratum(n=20, seed=7)
    flags = [p.requires_grad for p in model.parameters()]
    assert dcm(model, d, lr=0.2, batch_size=4).complete
    assert dcm_sweep(model, d, lams=[0.01], lr=0.2, batch_size=4).complete
    name, weight = next(iter(model.named_parameters()))

    def write(done: int, total: int) -> None:
        if done == 12:  # inside training
            with torch.no_grad():
                weight.mul_(1.0)

    with pytest.raises(
        RuntimeError, match=rf"weights were changed in place during DCM \({re.escape(name)}"
    ):
        dcm(model, d, lr=0.2, batch_size=4, on_progress=write)
    with pytest.raises(RuntimeError, match="weights were changed in place"):
        dcm_sweep(model, d, lams=[0.01], lr=0.2, batch_size=4, on_progress=write)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored all the same


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(planted, tiny_gpt2):
    d = planted_desideratum(n=10)
    with pytest.raises(
        ValueError, match=r"head 2\.0: layer 2 is out of range; valid layers are 0\.\.1"
    ):
        dcm(planted, d, heads=["2.0"])
    with pytest.raises(
        ValueError, match=r"head 1\.4: head 4 is out of range; valid heads are 0\.\.3"
    ):
        dcm(planted, d, heads=[(1, 4)])
    with pytest.raises(ValueError, match="heads is empty"):
        dcm(planted, d, heads=[])
    with pytest.raises(ValueError, match="cannot read a head"):
        dcm(planted, d, heads=["x"])
    with pytest.raises(
        ValueError, match=r"has no position 'query_label'; valid positions are \['END'\]"
    ):
        dcm(planted, d, position="query_label")
    for kw, msg in (
        ({"lam": -1}, "lam must be"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"eval_every": 0}, "eval_every must be"),
        ({"split": (0.5, 0.2)}, "sum to 1"),
        ({"on_progress": 3}, "on_progress must be a callable"),
    ):
        with pytest.raises(ValueError, match=msg):
            dcm(planted, d, **kw)
    with pytest.raises(TypeError, match="heads must be a list"):
        dcm(planted, d, heads="0.1")
    with pytest.raises(TypeError, match="position must be a position name"):
        dcm(planted, d, position=3)
    with pytest.raises(TypeError, match="must be a Desideratum"):
        dcm(planted, [d, d])
    with pytest.raises(TypeError, match="unexpected keyword"):
        dcm(planted, d, lamda=0.1)


def test_base_and_source_of_different_structure_are_refused(planted):
    d = planted_desideratum(n=10)
    other = Desideratum(
        d.name,
        d.base_tokens,
        d.source_tokens,
        d.base_attention_mask,
        d.source_attention_mask,
        {**d.base_positions, "S": d.base_positions["END"]},
        d.source_positions,
        d.targets,
    )
    with pytest.raises(
        ValueError,
        match=r"base and source differ in structure: base positions "
        r"\['END', 'S'\], source positions \['END'\]",
    ):
        dcm(planted, other)
    short = copy.copy(d)  # bypasses __post_init__, as a hand-edited object could
    object.__setattr__(short, "source_tokens", d.source_tokens[:-1])
    with pytest.raises(ValueError, match="10 base prompts, 9 source prompts"):
        dcm(planted, (short, d, d))


def test_a_target_of_several_tokens_is_refused(planted, tiny_gpt2):
    base = ["The apple is in Box A, the pen is in Box B. Box A contains the"]
    source = ["The cake is in Box C, the key is in Box A. Box A contains the"]
    with pytest.raises(ValueError, match=r"target ' Marianne' of example 0 is not one token"):
        Desideratum.from_examples(tiny_gpt2, base, source, [" Marianne"])
    d = planted_desideratum(n=10)
    two = copy.copy(d)
    object.__setattr__(two, "targets", torch.stack([d.targets, d.targets], 1))
    with pytest.raises(ValueError, match=r"one target token per example.*shape \(10, 2\)"):
        dcm(planted, (two, d, d))
    far = copy.copy(d)
    object.__setattr__(far, "targets", d.targets + 10_000)
    with pytest.raises(ValueError, match=r"is not a token id of this model \(0\.\.836\)"):
        dcm(planted, (far, d, d))


def test_sweep_refuses_unknown_arguments(planted):
    d = planted_desideratum(n=10)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lam'\].*lams=\["):
        dcm_sweep(planted, d, lam=0.1)
    with pytest.raises(ValueError, match="lams must be a non-empty list"):
        dcm_sweep(planted, d, lams=[])
    with pytest.raises(ValueError, match="lams item must be a finite number >= 0"):
        dcm_sweep(planted, d, lams=[0.1, -1.0])


# --------------------------------------------------------------------------- real desiderata


def test_runs_on_the_boxes_desiderata_with_a_named_position(tiny_llama):
    """The built-in desiderata (query_label is a different index per example) go through."""
    d = desiderata(tiny_llama, 10, seed=0, n_boxes=3)["positional"]
    r = dcm(tiny_llama, d, position="query_label", heads=["0.0", "1.2"], epochs=1, batch_size=4)
    assert isinstance(r, MaskResult) and r.complete and r.n_examples == (6, 2, 2)
    assert r.desideratum == "positional" and r.position == "query_label"
    assert "positional@query_label" in repr(r)
    df = r.curve.to_dataframe()
    assert list(df["step"]) == [1, 2] and df["val_accuracy"].notna().sum() == 1


def test_bridge_hook_path_gives_the_same_mask(planted):
    """Architectures without the fast engine run through bridge hooks, with the same result."""
    from circuit_widgets.core import cache

    d = planted_desideratum(n=20, seed=9)
    fast = dcm(planted, d, lam=0.1, lr=0.2, batch_size=4)
    with cache.force_hooked():
        slow = dcm(planted, d, lam=0.1, lr=0.2, batch_size=4)
    assert slow.selected == fast.selected == sorted(CARRIERS)
    torch.testing.assert_close(slow.curve.loss, fast.curve.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slow.final_mask, fast.final_mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["query_label", "END"])
def test_windowed_steps_equal_full_forwards(tiny_llama, monkeypatch, position):
    """With cached base keys/values each step recomputes only position..END; same numbers."""
    import circuit_widgets.core.masking as dcm_module
    from circuit_widgets.tasks import desiderata

    d = desiderata(tiny_llama, n=24, seed=3, n_boxes=3)["object_value"]
    engaged = []
    original = dcm_module._Plan._window_logits

    def spy(self, *args, **kwargs):
        engaged.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dcm_module._Plan, "_window_logits", spy)
    windowed = dcm(tiny_llama, d, position=position, lam=0.01, lr=0.3, batch_size=8, epochs=2)
    assert engaged
    monkeypatch.setattr(dcm_module, "KV_BUDGET_BYTES", 0)
    engaged.clear()
    full = dcm(tiny_llama, d, position=position, lam=0.01, lr=0.3, batch_size=8, epochs=2)
    assert not engaged
    torch.testing.assert_close(windowed.curve.loss, full.curve.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(windowed.final_mask, full.final_mask, atol=1e-5, rtol=0)
    assert windowed.selected == full.selected
    assert windowed.test_accuracy == full.test_accuracy
