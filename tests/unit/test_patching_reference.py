"""activation_patch against plain references: one head (or layer) per forward pass with the
bridge's own run_with_hooks, TransformerLens' own patching functions, and a planted circuit.

The hooks the references lean on are checked first against weight edits (zeroing a head's
W_O is the same as zeroing its z, and so on), with autograd off and on.
"""

from __future__ import annotations

import pytest
import torch
from micro_models import (
    COMPONENTS,
    PER_LAYER,
    PLANTED_HEADS,
    cache_of,
    hook_name,
    late_diff_task,
    planted_micro_model,
    planted_task,
    random_task,
    ref_activation_patch,
    run_metric,
    sharp_tiny_model,
)

from circuit_widgets.core.cache import force_hooked
from circuit_widgets.models import tiny_model
from circuit_widgets.tasks.base import Task
from circuit_widgets.types import Head

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
ARCHS = ("gpt2", "llama", "gemma3")


@pytest.fixture(scope="module")
def sharp():
    return {arch: sharp_tiny_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tasks(sharp):
    return {arch: random_task(model, seed=1) for arch, model in sharp.items()}


@pytest.fixture(scope="module")
def planted():
    model = planted_micro_model()
    return model, planted_task(model)


def metrics_of(model, task):
    return run_metric(model, task.clean_tokens, task), run_metric(model, task.corrupt_tokens, task)


def assert_grid_matches(grid, ref, model, task, atol=ATOL):
    """Every number the grid carries against the per-example reference [batch, ...]."""
    mc, mk = metrics_of(model, task)
    torch.testing.assert_close(grid.metric_clean.detach().cpu().float(), mc, atol=atol, rtol=0)
    torch.testing.assert_close(grid.metric_corrupt.detach().cpu().float(), mk, atol=atol, rtol=0)
    assert tuple(grid.values.shape) == tuple(ref.shape[1:])
    assert tuple(grid.per_example.shape) == tuple(ref.shape)
    torch.testing.assert_close(
        grid.per_example.detach().cpu().float(), ref, atol=atol, rtol=0, equal_nan=True
    )
    torch.testing.assert_close(
        grid.values.detach().cpu().float(), ref.mean(0), atol=atol, rtol=0, equal_nan=True
    )
    denom = (grid.metric_corrupt - grid.metric_clean).mean()
    torch.testing.assert_close(
        grid.normalized.detach().cpu().float(),
        (grid.values / denom).detach().cpu().float(),
        atol=1e-6,
        rtol=1e-5,
        equal_nan=True,
    )


def test_public_api_reexports_the_engine(core):
    import circuit_widgets as cw

    for name in ("activation_patch", "path_patch", "attribution_patch", "HeadGrid"):
        assert getattr(cw, name) is getattr(core, name), name


# --------------------------------------------------------------------------- the hooks themselves


def _edit_weights(model, arch, component, layer, idx):
    """The weight edit equivalent to zeroing one slice of `component` (pattern: uniform)."""
    dh = 8
    with torch.no_grad():
        if arch in ("llama", "gemma3"):  # Gemma's q/k norms and branch norms map 0 to 0 too
            blk = model.original_model.model.layers[layer]
            attn = blk.self_attn
            rows = slice(dh * idx, dh * idx + dh) if idx is not None else slice(None)
            if component == "z":
                attn.o_proj.weight[:, rows] = 0
            elif component in ("q", "pattern"):  # q = 0 -> scores 0 -> uniform causal pattern
                attn.q_proj.weight[rows] = 0
            elif component == "k":
                attn.k_proj.weight[rows] = 0
            elif component == "v":
                attn.v_proj.weight[rows] = 0
            elif component == "attn_out":
                attn.o_proj.weight.zero_()
            elif component == "mlp_out":
                blk.mlp.down_proj.weight.zero_()
        else:
            blk = model.original_model.transformer.h[layer]
            attn = model.blocks[layer].attn  # the bridge's split q/k/v copies of c_attn
            rows = slice(dh * idx, dh * idx + dh) if idx is not None else slice(None)
            if component == "z":
                blk.attn.c_proj.weight[rows, :] = 0  # Conv1D: [in, out]
            elif component in ("q", "pattern", "k", "v"):
                lin = {"q": attn.q, "pattern": attn.q, "k": attn.k, "v": attn.v}[component]
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            elif component == "attn_out":
                blk.attn.c_proj.weight.zero_()
                blk.attn.c_proj.bias.zero_()
            elif component == "mlp_out":
                blk.mlp.c_proj.weight.zero_()
                blk.mlp.c_proj.bias.zero_()


@pytest.mark.parametrize("component", [c for c in COMPONENTS if c != "resid_pre"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hook_replacement_equals_weight_edit(arch, component):
    """A hook returning a new tensor really reaches the output, with autograd off and on."""
    model, edited = sharp_tiny_model(arch), sharp_tiny_model(arch)
    # k and v columns are key/value heads: Gemma's tiny model has only one.
    idx = None if component in PER_LAYER else (0 if arch == "gemma3" and component in "kv" else 1)
    _edit_weights(edited, arch, component, 1, idx)
    tokens = random_task(model).clean_tokens

    def hook(act, hook):
        act = act.clone()
        if component == "pattern":
            t = act.shape[-1]
            act[:, idx] = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
        elif idx is None:
            act.zero_()
        else:
            act[:, :, idx] = 0
        return act

    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            base = model(tokens)
            hooked = model.run_with_hooks(tokens, fwd_hooks=[(hook_name(component, 1), hook)])
            expected = edited(tokens)
        assert (hooked - base).abs().max() > 1e-4, "the hook changed nothing"
        torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_pre_replacement_is_a_cut(arch):
    """Writing another prompt's resid_pre into a layer gives that prompt's logits exactly."""
    model = tiny_model(
        arch,
        n_layers=2,
        n_heads=4,
        n_kv_heads={"llama": 2, "gemma3": 1}.get(arch),
        d_model=32,
        seed=0,
    )
    task = random_task(model)
    corrupt_cache = cache_of(model, task.corrupt_tokens)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            expected = model(task.corrupt_tokens)
            for layer in (0, 1):
                name = hook_name("resid_pre", layer)
                hooked = model.run_with_hooks(
                    task.clean_tokens,
                    fwd_hooks=[(name, lambda a, hook, name=name: corrupt_cache[name].clone())],
                )
                torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


def _tl_cases():
    import transformer_lens.patching as tlp

    return {
        "z": (tlp.get_act_patch_attn_head_out_all_pos, "z", "all"),
        "q": (tlp.get_act_patch_attn_head_q_all_pos, "q", "all"),
        "k": (tlp.get_act_patch_attn_head_k_all_pos, "k", "all"),
        "v": (tlp.get_act_patch_attn_head_v_all_pos, "v", "all"),
        "pattern": (tlp.get_act_patch_attn_head_pattern_all_pos, "pattern", "all"),
        "z_by_pos": (tlp.get_act_patch_attn_head_out_by_pos, "z", "each"),
        "attn_out": (tlp.get_act_patch_attn_out, "attn_out", "each"),
        "mlp_out": (tlp.get_act_patch_mlp_out, "mlp_out", "each"),
        "resid_pre": (tlp.get_act_patch_resid_pre, "resid_pre", "each"),
    }


TL_CASES = ("z", "q", "k", "v", "pattern", "z_by_pos", "attn_out", "mlp_out", "resid_pre")


def _transformer_lens_patch(model, task, case):
    """TransformerLens' own activation patching on the bridge, as our 'denoise' values.

    TL writes clean activations into the corrupted run (our denoise) and returns the raw
    metric; subtracting the clean metric gives our convention. Its by-position functions
    patch every example at position p, padding included; under right padding and causal
    attention that never reaches END, so it equals our "each".
    """
    fn, component, positions = _tl_cases()[case]
    metric_clean = run_metric(model, task.clean_tokens, task)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(task.clean_tokens)
        out = fn(
            model,
            task.corrupt_tokens,
            clean_cache,
            lambda logits: task.metric(logits).float().mean() - metric_clean.mean(),
        )
    return out.float(), component, positions


@pytest.mark.parametrize("case", TL_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_agrees_with_transformer_lens(sharp, tasks, arch, case):
    tl, component, positions = _transformer_lens_patch(sharp[arch], tasks[arch], case)
    ref = ref_activation_patch(sharp[arch], tasks[arch], component, positions, "denoise").mean(0)
    torch.testing.assert_close(tl, ref.reshape(tl.shape), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("direction", ("noise", "denoise"))
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_all_positions_matches_reference(core, sharp, tasks, arch, component, direction):
    model, task = sharp[arch], tasks[arch]
    grid = core.activation_patch(
        model, task, component=component, positions="all", direction=direction
    )
    ref = ref_activation_patch(model, task, component, "all", direction)
    assert_grid_matches(grid, ref, model, task)
    assert grid.complete and bool(torch.as_tensor(grid.done).all())


@pytest.mark.parametrize("direction", ("noise", "denoise"))
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_named_position_matches_reference(core, sharp, tasks, arch, component, direction):
    model, task = sharp[arch], tasks[arch]
    grid = core.activation_patch(
        model, task, component=component, positions="END", direction=direction
    )
    assert_grid_matches(
        grid, ref_activation_patch(model, task, component, "END", direction), model, task
    )


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_position_list_matches_reference(core, sharp, tasks, arch, component):
    model, task = sharp[arch], tasks[arch]
    direction = ("noise", "denoise")[(COMPONENTS.index(component) + ARCHS.index(arch)) % 2]
    grid = core.activation_patch(
        model, task, component=component, positions=["END", "S"], direction=direction
    )
    ref = ref_activation_patch(model, task, component, ["END", "S"], direction)
    assert_grid_matches(grid, ref, model, task)


EACH_CASES = [
    ("llama", "z"),
    ("llama", "k"),
    ("llama", "pattern"),
    ("llama", "mlp_out"),
    ("gpt2", "q"),
    ("gpt2", "v"),
    ("gpt2", "attn_out"),
    ("gpt2", "resid_pre"),
]


@pytest.mark.parametrize("arch,component", EACH_CASES)
def test_each_position_matches_reference(core, sharp, tasks, arch, component):
    """[L, seq_len, C]; beyond an example's length nothing is patched, so the metric stays the
    base run's: 0 for noise, metric_corrupt - metric_clean for denoise."""
    model, task = sharp[arch], tasks[arch]
    direction = ("noise", "denoise")[EACH_CASES.index((arch, component)) % 2]
    grid = core.activation_patch(
        model, task, component=component, positions="each", direction=direction
    )
    ref = ref_activation_patch(model, task, component, "each", direction)
    assert ref.shape[2] == task.seq_len
    assert_grid_matches(grid, ref, model, task)
    per_example = grid.per_example.detach().cpu().float()
    mc, mk = metrics_of(model, task)
    for b, length in enumerate(task.lengths.tolist()):
        unpatched = 0.0 if direction == "noise" else float(mk[b] - mc[b])
        beyond = per_example[b, :, length:]
        assert beyond.numel() == 0 or (beyond - unpatched).abs().max() <= 1e-6, (b, beyond)


@pytest.mark.parametrize("fixture,component", [("tiny_gpt2", "z"), ("tiny_llama", "k")])
def test_conftest_tiny_models(core, request, fixture, component):
    """The shared fixtures too (attention near uniform there, so effects are small)."""
    model = request.getfixturevalue(fixture)
    task = random_task(model, seed=2)
    for direction in ("noise", "denoise"):
        grid = core.activation_patch(model, task, component=component, direction=direction)
        assert_grid_matches(
            grid,
            ref_activation_patch(model, task, component, "all", direction),
            model,
            task,
            atol=1e-6,
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_gqa_kv_columns_and_groups(core, sharp, tasks, arch):
    model, task = sharp[arch], tasks[arch]
    grid = core.activation_patch(model, task, component="v")
    expected = {"llama": [[0, 1], [2, 3]], "gemma3": [[0, 1, 2, 3]]}.get(arch, [[0], [1], [2], [3]])
    assert tuple(grid.values.shape) == (2, len(expected))
    groups = [list(g) for g in grid.kv_groups]
    assert groups == expected


@pytest.mark.parametrize("case", TL_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_agrees_with_transformer_lens(core, sharp, tasks, arch, case):
    model, task = sharp[arch], tasks[arch]
    tl, component, positions = _transformer_lens_patch(model, task, case)
    grid = core.activation_patch(
        model, task, component=component, positions=positions, direction="denoise"
    )
    torch.testing.assert_close(
        grid.values.detach().cpu().float().reshape(tl.shape), tl, atol=ATOL, rtol=0
    )


@pytest.fixture
def generic_path():
    """The engine's generic path (bridge hooks only) instead of its fast re-implementation."""
    with force_hooked():
        yield


@pytest.mark.parametrize("component", COMPONENTS)
def test_generic_path_matches_reference(core, sharp, tasks, generic_path, component):
    model, task = sharp["llama"], tasks["llama"]
    grid = core.activation_patch(model, task, component=component, positions="all")
    assert_grid_matches(grid, ref_activation_patch(model, task, component, "all"), model, task)


def test_generic_path_each_position(core, sharp, tasks, generic_path):
    model, task = sharp["gpt2"], tasks["gpt2"]
    grid = core.activation_patch(model, task, component="z", positions="each", direction="denoise")
    assert_grid_matches(
        grid, ref_activation_patch(model, task, "z", "each", "denoise"), model, task
    )


# --------------------------------------------------------------------------- harder tasks


@pytest.mark.parametrize("positions", ("all", "END", ["S", "END"], "each"))
@pytest.mark.parametrize("arch", ARCHS)
def test_late_single_token_difference(core, sharp, arch, positions):
    """Clean and corrupt share every token but one, late and at a different index per
    example (any shortcut that skips shared prefixes must get this right); 2 answers and 3
    wrong answers per example."""
    model = sharp[arch]
    task = late_diff_task(model, seed=11, n_answers=2, n_wrong=3)
    for component, direction in (
        ("z", "noise"),
        ("k", "denoise"),
        ("pattern", "noise"),
        ("resid_pre", "denoise"),
        ("mlp_out", "noise"),
    ):
        grid = core.activation_patch(
            model, task, component=component, positions=positions, direction=direction
        )
        ref = ref_activation_patch(model, task, component, positions, direction)
        assert_grid_matches(grid, ref, model, task)


def _argmax_task(model, task: Task, metric: str) -> Task:
    """answers = the clean run's top token at END, wrong = the corrupt run's: accuracy-type
    metrics then start at 1 and can flip."""
    from dataclasses import replace

    with torch.no_grad():
        top_clean = task.final_logits(model(task.clean_tokens)).argmax(-1)
        top_corrupt = task.final_logits(model(task.corrupt_tokens)).argmax(-1)
    return replace(task, answers=top_clean, wrong_answers=top_corrupt, metric_name=metric)


@pytest.mark.parametrize("metric", ("prob", "accuracy", "candidate_accuracy"))
@pytest.mark.parametrize("arch", ARCHS)
def test_other_metrics(core, sharp, tasks, arch, metric):
    """prob needs the softmax over the whole vocabulary, accuracy the argmax over it."""
    model = sharp[arch]
    task = _argmax_task(model, tasks[arch], metric)
    for component, positions, direction in (
        ("z", "all", "noise"),
        ("v", "END", "denoise"),
        ("mlp_out", "each", "noise"),
    ):
        grid = core.activation_patch(
            model, task, component=component, positions=positions, direction=direction
        )
        ref = ref_activation_patch(model, task, component, positions, direction)
        assert_grid_matches(grid, ref, model, task)


@pytest.mark.parametrize("batch_size", (1, 3, 1000))
def test_batch_size_does_not_change_results(core, sharp, tasks, batch_size):
    model, task = sharp["llama"], tasks["llama"]
    for component, positions in (("z", "each"), ("k", "END"), ("attn_out", ["S", "END"])):
        grid = core.activation_patch(
            model, task, component=component, positions=positions, batch_size=batch_size
        )
        assert_grid_matches(
            grid, ref_activation_patch(model, task, component, positions), model, task
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_single_example_and_no_padding(core, sharp, tasks, arch):
    model = sharp[arch]
    for task in (tasks[arch].subset([3]), tasks[arch].subset([0])):
        for component, positions in (("z", "all"), ("v", "each"), ("resid_pre", "END")):
            grid = core.activation_patch(
                model, task, component=component, positions=positions, direction="denoise"
            )
            ref = ref_activation_patch(model, task, component, positions, "denoise")
            assert_grid_matches(grid, ref, model, task)


def test_heads_subset_for_kv_columns(core, sharp, tasks):
    """On GQA, heads= for k/v names key/value heads (the grid's columns)."""
    model, task = sharp["llama"], tasks["llama"]
    grid = core.activation_patch(model, task, component="v", heads=[Head(1, 1)])
    ref = ref_activation_patch(model, task, "v").mean(0)
    values = grid.values.detach().cpu()
    assert abs(float(values[1, 1] - ref[1, 1])) <= ATOL
    assert int((~torch.isnan(values)).sum()) == 1


# --------------------------------------------------------------------------- laws


def _same_prompts(task: Task) -> Task:
    from dataclasses import replace

    return replace(task, corrupt_tokens=task.clean_tokens.clone())


@pytest.mark.parametrize("arch", ARCHS)
def test_corrupt_equal_to_clean_gives_exact_zeros(core, sharp, tasks, arch):
    """Patching an activation with its own clean value changes nothing, bit for bit."""
    model, task = sharp[arch], _same_prompts(tasks[arch])
    for component, positions, direction in (
        ("z", "all", "noise"),
        ("v", "each", "denoise"),
        ("mlp_out", ["END", "S"], "noise"),
        ("pattern", "END", "denoise"),
    ):
        grid = core.activation_patch(
            model, task, component=component, positions=positions, direction=direction
        )
        values = grid.values.detach().cpu()
        assert torch.equal(values, torch.zeros_like(values)), (component, values)


# --------------------------------------------------------------------------- the planted circuit


def test_planted_model_is_what_its_docstring_says(planted):
    model, task = planted
    cache = cache_of(model, task.clean_tokens)
    t = task.seq_len
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    for layer in (0, 1):
        torch.testing.assert_close(cache[hook_name("pattern", layer)][0, 2], uniform)
        assert cache[hook_name("mlp_out", layer)].abs().max() == 0
    mc, mk = metrics_of(model, task)
    assert (mc > mk).all()
    with torch.no_grad():
        torch.testing.assert_close(
            model(task.clean_tokens), model.original_model(task.clean_tokens).logits
        )


def test_planted_circuit_ranks_first(core, planted):
    """By hand: only 0.1 and 1.2 write anything, so every other head's effect is exactly 0;
    patching either planted head at all positions replays the whole corrupt run (normalized
    ~1, the model being near linear); q, k and patterns are 0 in both runs, so patching them
    does nothing; v matters only on the KV heads the planted heads read."""
    model, task = planted
    grid = core.activation_patch(model, task, component="z")
    values = grid.values.detach().cpu()
    for layer in range(2):
        for head in range(4):
            if (layer, head) in PLANTED_HEADS:
                assert values[layer, head] < 0
                assert abs(float(grid.normalized[layer, head]) - 1.0) < 0.02
            else:
                assert values[layer, head] == 0
    top = sorted(
        ((abs(float(values[l, h])), (l, h)) for l in range(2) for h in range(4)), reverse=True
    )
    assert {lh for _, lh in top[:2]} == PLANTED_HEADS
    for component in ("q", "k", "pattern"):
        # Zero up to float32 rounding: the patched pattern is recomputed through another kernel
        # than the clean run's (-4.8e-8 for 1.2's pattern on an AVX-512 machine, 0 elsewhere).
        values = core.activation_patch(model, task, component=component).values
        assert values.abs().max() <= 1e-6
    v = core.activation_patch(model, task, component="v").values.detach().cpu()
    assert v[0, 0] < 0 and v[1, 1] < 0 and v[0, 1] == 0 and v[1, 0] == 0
    at_end = core.activation_patch(model, task, component="z", positions="END")
    ranked = at_end.values.detach().cpu().abs().flatten().argsort(descending=True)
    assert int(ranked[0]) == 1 * 4 + 2  # 1.2 reads everything it needs at END
    assert_grid_matches(at_end, ref_activation_patch(model, task, "z", "END"), model, task)


def test_task_tensors_may_be_views(core, sharp, tasks):
    """Answers sliced out of a bigger tensor (non-contiguous) are an ordinary input; the
    engine must neither fail nor warn (our own warnings are errors in tests)."""
    from dataclasses import replace

    model, task = sharp["gpt2"], tasks["gpt2"]
    both = torch.stack([task.answers, task.wrong_answers], 1)
    view = replace(task, answers=both[:, 0], wrong_answers=both[:, 1])
    assert not view.answers.is_contiguous()
    grid = core.activation_patch(model, view, component="z")
    assert_grid_matches(grid, ref_activation_patch(model, task, "z"), model, task)


def test_results_follow_in_place_weight_edits(core):
    """Editing weights between two calls (an ablation, a merged adapter) must not leave the
    second call reading clean/corrupt runs cached from the old weights."""
    model = sharp_tiny_model("llama", seed=7)
    task = random_task(model, seed=7)
    core.activation_patch(model, task, component="z")
    with torch.no_grad():
        model.original_model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    grid = core.activation_patch(model, task, component="z")
    assert_grid_matches(grid, ref_activation_patch(model, task, "z"), model, task)


# --------------------------------------------------------------------------- heads=, progress, stop


def test_heads_subset(core, sharp, tasks):
    model, task = sharp["llama"], tasks["llama"]
    chosen = [Head(0, 1), Head(1, 3)]
    grid = core.activation_patch(model, task, component="z", positions="END", heads=chosen)
    ref = ref_activation_patch(model, task, "z", "END").mean(0)
    values = grid.values.detach().cpu()
    for layer in range(2):
        for head in range(4):
            if Head(layer, head) in chosen:
                assert abs(float(values[layer, head] - ref[layer, head])) <= ATOL
            else:
                assert torch.isnan(values[layer, head])


def test_stop_after_first_batch_keeps_partial_results(core, sharp, tasks):
    model, task = sharp["gpt2"], tasks["gpt2"]
    full = core.activation_patch(model, task, component="z", positions="each")
    calls: list[tuple[int, int]] = []
    part = core.activation_patch(
        model,
        task,
        component="z",
        positions="each",
        batch_size=2,
        on_progress=lambda done, total: calls.append((done, total)),
        should_stop=lambda: any(d > 0 for d, _ in calls),
    )
    assert part.complete is False
    done = torch.as_tensor(part.done).bool()
    assert tuple(done.shape) == tuple(full.values.shape)
    assert 0 < int(done.sum()) < done.numel()
    values = part.values.detach().cpu()
    torch.testing.assert_close(values[done], full.values.detach().cpu()[done], atol=1e-6, rtol=0)
    assert torch.isnan(values[~done]).all()
    assert not torch.isnan(values[done]).any()
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progress_is_reported_up_to_the_total(core, sharp, tasks):
    model, task = sharp["llama"], tasks["llama"]
    calls: list[tuple[int, int]] = []
    grid = core.activation_patch(
        model,
        task,
        component="z",
        batch_size=2,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert grid.complete
    assert len(calls) >= 2
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len(set(dones)) == len(dones)
    assert calls[-1][0] == calls[-1][1]
    assert len({t for _, t in calls}) == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"component": "resid_post_typo"}, "resid_post_typo"),
        ({"component": "z", "positions": "IO"}, "IO"),
        ({"component": "z", "positions": ["END", "IO"]}, "IO"),
        ({"component": "z", "heads": [Head(0, 4)]}, "4"),
        ({"component": "z", "heads": [Head(2, 0)]}, "2"),
    ],
)
def test_validation_errors(core, sharp, tasks, kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        core.activation_patch(
            sharp["llama"], tasks["llama"], on_progress=lambda d, t: calls.append(d), **kwargs
        )
    assert calls == [], "validation must happen before any computing"
