"""attribution_patch against an autograd reference (a directional derivative per head, itself
checked by finite differences) and against activation patching on the near-linear micro model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from micro_models import (
    COMPONENTS,
    PLANTED_HEADS,
    hook_name,
    late_diff_task,
    planted_micro_model,
    planted_task,
    random_task,
    ref_activation_patch,
    ref_attribution,
    run_metric,
    sharp_tiny_model,
)

from circuit_widgets.core.cache import force_hooked

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
ARCHS = ("gpt2", "llama", "gemma3")


@pytest.fixture(scope="module")
def sharp():
    out = {}
    for arch in ARCHS:
        model = sharp_tiny_model(arch)
        out[arch] = (model, random_task(model, seed=5))
    return out


@pytest.fixture(scope="module")
def planted():
    model = planted_micro_model()
    return model, planted_task(model)


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_is_the_directional_derivative(sharp, arch):
    """Central finite differences along (corrupt - clean), one head at a time."""
    model, task = sharp[arch]
    ref = ref_attribution(model, task, "z")
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens)
        _, corrupt = model.run_with_cache(task.corrupt_tokens)
    eps = 1e-2
    for layer in range(2):
        name = hook_name("z", layer)
        delta = corrupt[name] - clean[name]
        for head in range(4):

            def shift(sign, head=head, delta=delta, name=name):
                def hook(act, hook):
                    out = act.clone()
                    out[:, :, head] += sign * eps * delta[:, :, head]
                    return out

                return [(name, hook)]

            fd = (
                run_metric(model, task.clean_tokens, task, shift(+1))
                - run_metric(model, task.clean_tokens, task, shift(-1))
            ) / (2 * eps)
            torch.testing.assert_close(ref[:, layer, head], fd, atol=2e-4, rtol=1e-3)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_autograd_reference(core, sharp, arch, component):
    model, task = sharp[arch]
    grid = core.attribution_patch(model, task, component=component, direction="noise")
    ref = ref_attribution(model, task, component, "noise")
    assert tuple(grid.values.shape) == tuple(ref.shape[1:])
    torch.testing.assert_close(grid.values.detach().cpu().float(), ref.mean(0), atol=ATOL, rtol=0)
    if getattr(grid, "per_example", None) is not None:
        torch.testing.assert_close(grid.per_example.detach().cpu().float(), ref, atol=ATOL, rtol=0)
    mc = run_metric(model, task.clean_tokens, task)
    mk = run_metric(model, task.corrupt_tokens, task)
    torch.testing.assert_close(
        grid.normalized.detach().cpu().float(), ref.mean(0) / (mk - mc).mean(), atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("component", ("z", "k", "pattern", "mlp_out"))
def test_generic_path_matches_autograd_reference(core, sharp, component):
    model, task = sharp["llama"]
    with force_hooked():
        grid = core.attribution_patch(model, task, component=component)
    ref = ref_attribution(model, task, component, "noise")
    torch.testing.assert_close(grid.values.detach().cpu().float(), ref.mean(0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("component", ("z", "v", "resid_pre"))
@pytest.mark.parametrize("arch", ARCHS)
def test_denoise_reads_against_the_clean_metric(core, sharp, arch, component):
    """denoise: (clean - corrupt) . grad at the corrupt run, plus metric_corrupt - metric_clean,
    so that values keep activation_patch's convention (metric patched - metric clean)."""
    model, task = sharp[arch]
    grid = core.attribution_patch(model, task, component=component, direction="denoise")
    mc = run_metric(model, task.clean_tokens, task)
    mk = run_metric(model, task.corrupt_tokens, task)
    ref = ref_attribution(model, task, component, "denoise") + (mk - mc)[:, None, None]
    torch.testing.assert_close(grid.values.detach().cpu().float(), ref.mean(0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_corrupt_equal_to_clean_gives_exact_zeros(core, sharp, arch):
    model, task = sharp[arch]
    task = replace(task, corrupt_tokens=task.clean_tokens.clone())
    for component in ("z", "k", "mlp_out"):
        values = core.attribution_patch(model, task, component=component).values.detach().cpu()
        assert torch.equal(values, torch.zeros_like(values)), component


@pytest.mark.parametrize("metric", ("logit_diff", "prob"))
@pytest.mark.parametrize("arch", ARCHS)
def test_late_difference_and_other_metrics(core, sharp, arch, metric):
    """One differing token per example, several answers; prob differentiates the softmax
    over the whole vocabulary."""
    model, _ = sharp[arch]
    task = late_diff_task(model, seed=13, n_answers=2, n_wrong=2).with_metric(metric)
    for component in ("z", "v", "pattern", "attn_out"):
        grid = core.attribution_patch(model, task, component=component)
        ref = ref_attribution(model, task, component, "noise")
        atol = ATOL if metric == "logit_diff" else 1e-6  # probabilities here are ~1e-3
        torch.testing.assert_close(
            grid.values.detach().cpu().float(), ref.mean(0), atol=atol, rtol=1e-4
        )


def test_planted_circuit_close_to_activation_patching(core, planted):
    """The micro model is near linear in every head's z (uniform attention, frozen MLPs = 0,
    norms ~ a constant scale), so the first-order estimate is close to the real patch;
    heads with W_O = 0 have zero gradient, so exactly 0."""
    model, task = planted
    attr = core.attribution_patch(model, task, component="z").values.detach().cpu()
    act = ref_activation_patch(model, task, "z", "all", "noise").mean(0)
    for layer in range(2):
        for head in range(4):
            if (layer, head) in PLANTED_HEADS:
                assert attr[layer, head] < 0
                assert abs(float(attr[layer, head] / act[layer, head]) - 1) < 0.02
            else:
                assert attr[layer, head] == 0
    v = core.attribution_patch(model, task, component="v").values.detach().cpu()
    assert v[0, 0] < 0 and v[1, 1] < 0 and v[0, 1] == 0 and v[1, 0] == 0


def test_unknown_component(core, sharp):
    model, task = sharp["llama"]
    with pytest.raises(ValueError, match="nonsense"):
        core.attribution_patch(model, task, component="nonsense")


# --------------------------------------------------------------------------- path attribution


def _ref_path_derivative(model, task, layer, head, position, freeze_mlps, eps=1e-2):
    """d/dt of path patching's metric when the sender's z moves t of the way to corrupt:
    every head's z frozen to clean (the sender's shifted at `position`), MLPs recompute or
    frozen; central finite differences, plain bridge hooks."""
    n_layers = model.cfg.n_layers
    names = [hook_name(c, l) for l in range(n_layers) for c in ("z", "mlp_out")]
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens, names_filter=lambda n: n in names)
        _, corrupt = model.run_with_cache(task.corrupt_tokens, names_filter=lambda n: n in names)
    s = task.clean_tokens.shape[1]
    where = (
        torch.ones(len(task), s, 1)
        if position == "all"
        else (torch.arange(s)[None] == task.positions[position][:, None]).float()[..., None]
    )

    def hooks(sign):
        out = []
        for l in range(n_layers):
            z = clean[hook_name("z", l)].clone()
            if l == layer:
                delta = corrupt[hook_name("z", l)][:, :, head] - z[:, :, head]
                z[:, :, head] += sign * eps * delta * where
            out.append((hook_name("z", l), lambda act, hook, z=z: z))
            if freeze_mlps:
                m = clean[hook_name("mlp_out", l)]
                out.append((hook_name("mlp_out", l), lambda act, hook, m=m: m))
        return out

    with torch.no_grad():
        up = run_metric(model, task.clean_tokens, task, hooks(+1))
        down = run_metric(model, task.clean_tokens, task, hooks(-1))
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("freeze_mlps", [False, True])
@pytest.mark.parametrize("position", ["all", "END"])
@pytest.mark.parametrize("arch", ARCHS)
def test_path_attribution_is_the_derivative_of_path_patching(
    core, sharp, arch, position, freeze_mlps
):
    """Each sender's estimate is the derivative of its path-patched metric along (corrupt -
    clean): the paths through other heads are cut, those through MLPs kept unless frozen."""
    model, task = sharp[arch]
    grid = core.path_attribution(model, task, position=position, freeze_mlps=freeze_mlps)
    assert grid.receivers == "logits" and grid.complete
    total = core.attribution_patch(model, task, "z", positions=position)
    for layer in range(2):
        for head in range(4):
            ref = _ref_path_derivative(model, task, layer, head, position, freeze_mlps)
            torch.testing.assert_close(grid.per_example[:, layer, head], ref, atol=2e-4, rtol=1e-3)
    # Layer 0's heads also act through layer 1's attention: the path estimate must leave that out.
    assert (grid.values[0] - total.values[0]).abs().max() > 1e-4
    with core.cache.force_hooked():
        hooked = core.path_attribution(model, task, position=position, freeze_mlps=freeze_mlps)
    torch.testing.assert_close(hooked.per_example, grid.per_example, atol=ATOL, rtol=1e-3)


def test_path_attribution_matches_path_patching_on_the_near_linear_model(core, planted):
    """Where the model is near linear, the estimate is path patching's exact value: 1.2 writes
    the answer (~1), while 0.1 reaches the logits only through 1.2's values, a path path
    patching to the logits leaves out (~0), though its total effect is the whole gap (~1)."""
    model, task = planted
    est = core.path_attribution(model, task)
    exact = core.path_patch(model, task, receivers="logits")
    total = core.attribution_patch(model, task, "z")
    torch.testing.assert_close(est.normalized, exact.normalized, atol=0.02, rtol=0)
    assert abs(float(est.normalized[1, 2]) - 1) < 0.02 and abs(float(est.normalized[0, 1])) < 0.01
    assert abs(float(total.normalized[0, 1]) - 1) < 0.05
