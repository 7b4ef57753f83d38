"""run_with_edits: the fast engine and the bridge's hooks agree for every site, with and without grad."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets.core import cache
from circuit_widgets.core.edits import SITES, run_with_edits

HEAD = 1


def _edit(site: str):
    if site == "pattern":  # every query attends to itself only

        def fn(p):
            out = p.clone()
            out[:, HEAD] = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
            return out

        return fn
    if site in ("q", "k"):

        def fn(a):
            out = a.clone()
            # Sharpen attention; flipped too, as Gemma's q/k norms undo a pure scale.
            out[:, :, HEAD % a.shape[2]] = 30.0 * out[:, :, HEAD % a.shape[2]].flip(-1)
            return out

        return fn
    if site in ("v", "z"):

        def fn(a):
            out = a.clone()
            out[:, :, HEAD % a.shape[2]] *= -0.5
            return out

        return fn
    return lambda a: a * 0.5


def _tokens(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, int(model.cfg.d_vocab), (3, 7), generator=g)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("site", SITES)
def test_fast_and_hooked_agree(arch, site, request):
    model = request.getfixturevalue(arch)
    tokens = _tokens(model)
    assert cache.engine_for(model) is not None
    edits = {(1, site): _edit(site)}
    fast = run_with_edits(model, tokens, edits, capture=[(0, site), (1, site)])
    with cache.force_hooked():
        slow = run_with_edits(model, tokens, edits, capture=[(0, site), (1, site)])
    with torch.no_grad():
        plain = model(tokens)
    torch.testing.assert_close(fast.logits, slow.logits, atol=2e-5, rtol=1e-4)
    assert (fast.logits - plain).abs().max() > 2e-4, "the edit must change the output"
    for key in [(0, site), (1, site)]:
        torch.testing.assert_close(fast.captured[key], slow.captured[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_no_edit_is_the_model_and_at_picks_positions(arch, request):
    model = request.getfixturevalue(arch)
    tokens = _tokens(model)
    at = torch.tensor([6, 3, 0])
    run = run_with_edits(model, tokens, at=at)
    with torch.no_grad():
        plain = model(tokens)
    torch.testing.assert_close(run.logits, plain[torch.arange(3), at], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_gradients_flow_through_an_edit_on_both_paths(arch, request):
    model = request.getfixturevalue(arch)
    tokens = _tokens(model)
    grads = []
    for hooked in (False, True):
        m = torch.ones(4, requires_grad=True)
        edit = {(0, "z"): lambda z, m=m: z * m[None, None, :, None]}
        with cache.force_hooked(hooked):
            out = run_with_edits(model, tokens, edit, at=torch.tensor([6, 6, 6]), grad=True)
        out.logits[:, 5].sum().backward()
        grads.append(m.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_bad_keys_are_named(tiny_gpt2):
    tokens = _tokens(tiny_gpt2)
    with pytest.raises(ValueError, match="unknown site 'hook_z'"):
        run_with_edits(tiny_gpt2, tokens, {(0, "hook_z"): lambda a: a})
    with pytest.raises(ValueError, match=r"layer 5 is out of range; valid layers are 0..1"):
        run_with_edits(tiny_gpt2, tokens, capture=[(5, "z")])
    with pytest.raises(ValueError, match="one position per example"):
        run_with_edits(tiny_gpt2, tokens, at=torch.tensor([1]))
