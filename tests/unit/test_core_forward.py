"""The fast engine reproduces the bridge: full forwards, every hooked activation, and resumes."""

from __future__ import annotations

import pytest
import torch
from test_core_helpers import random_task

from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import gather_window, run_window, trace_forward, window_positions

TOL = 1e-5


@pytest.fixture(params=["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def model(request):
    return request.getfixturevalue(request.param)


def test_unsupported_architecture_gives_none():
    class Fake:
        original_model = torch.nn.Linear(2, 2)

    assert FastModel.from_bridge(Fake()) is None


def test_trace_matches_bridge_cache(model):
    task = random_task(model)
    eng = FastModel.from_bridge(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(task.clean_tokens)
        tr = trace_forward(eng, task.clean_tokens)
        mine = eng.logits(tr.resid_pre[-1])
    torch.testing.assert_close(mine, logits, atol=TOL, rtol=0)
    for l in range(eng.n_layers):
        q, k, v = tr.qkv_raw(eng, l)
        pairs = {
            "attn.hook_z": tr.z[l],
            "attn.hook_q": q,
            "attn.hook_k": k,
            "attn.hook_v": v,
            "attn.hook_pattern": tr.pattern(eng, l),
            "hook_attn_out": tr.attn_out[l],
            "hook_mlp_out": tr.mlp_out[l],
            "hook_resid_pre": tr.resid_pre[l],
        }
        for name, act in pairs.items():
            torch.testing.assert_close(
                act, cache[f"blocks.{l}.{name}"], atol=TOL, rtol=0, msg=f"blocks.{l}.{name}"
            )


def test_gqa_keys_are_per_kv_head(tiny_llama):
    eng = FastModel.from_bridge(tiny_llama)
    assert (eng.n_heads, eng.n_kv, eng.group) == (4, 2, 2)
    tr = trace_forward(eng, random_task(tiny_llama).clean_tokens)
    assert tr.k_rot[0].shape[2] == 2 and tr.z[0].shape[2] == 4


@pytest.mark.parametrize("stage", ["resid_pre", "attn", "z", "attn_out", "mlp_out"])
def test_resume_without_patch_reproduces_the_run(model, stage):
    """Resuming at layer 1 from per-example starts, with nothing patched, changes nothing."""
    task = random_task(model)
    eng = FastModel.from_bridge(model)
    with torch.no_grad():
        tr = trace_forward(eng, task.clean_tokens)
        starts = torch.tensor([2, 5, 0, 3, 4])
        w = task.seq_len - int(starts.min())
        pos = window_positions(starts, w)
        init = {
            "resid_pre": tr.resid_pre,
            "z": tr.z,
            "attn_out": tr.attn_out,
            "mlp_out": tr.mlp_out,
        }.get(stage)
        init = (
            gather_window(init[1], pos)[None].expand(3, *gather_window(init[1], pos).shape)
            if init
            else None
        )
        out = run_window(eng, tr, starts, w, 3, 1, stage, init)
        ref = gather_window(tr.resid_pre[-1], pos)
    valid = pos < task.seq_len
    torch.testing.assert_close(out[:, valid], ref[valid][None].expand(3, -1, -1), atol=TOL, rtol=0)


def test_end_only_last_layer_matches_full_window(model):
    """With end_index the last layer runs END's query alone; END's residual is unchanged."""
    task = random_task(model)
    eng = FastModel.from_bridge(model)
    with torch.no_grad():
        tr = trace_forward(eng, task.clean_tokens)
        starts = torch.tensor([1, 0, 2, 3, 4])
        end = task.positions["END"] - starts
        w = int(end.max()) + 1
        full = run_window(eng, tr, starts, w, 2, 0, "attn")
        only = run_window(eng, tr, starts, w, 2, 0, "attn", end_index=end)
    ar = torch.arange(len(starts))
    torch.testing.assert_close(only, full[:, ar, end], atol=TOL, rtol=0)
    torch.testing.assert_close(
        only[0], tr.resid_pre[-1][ar, task.positions["END"]], atol=TOL, rtol=0
    )
