"""The nnsight backend on the real demo model (30 layers, 9 query heads on 3 KV heads), through
NDIF's local simulation, against the fast engine: a few cells only, to stay fast."""

from __future__ import annotations

import pytest
import torch

import circuit_widgets as cw

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def demo_nn(demo_model):
    return cw.load_model(demo_model, backend="nnsight", remote="local")


@pytest.fixture(scope="module")
def ioi(demo_model):
    return cw.tasks.ioi(demo_model, 4)


def test_demo_activation_patch_k_and_z_equal_fast_engine(demo_model, demo_nn, ioi):
    for component, heads in (("z", [(9, 4), (14, 1), (29, 8)]), ("k", [(3, 0), (20, 2)])):
        ref = cw.activation_patch(
            demo_model, ioi, component=component, positions="END", heads=heads
        )
        before = demo_nn.requests
        got = cw.activation_patch(demo_nn, ioi, component=component, positions="END", heads=heads)
        assert demo_nn.requests - before == 1
        assert torch.equal(got.done, ref.done)
        torch.testing.assert_close(
            got.per_example, ref.per_example, atol=1e-4, rtol=0, equal_nan=True
        )


def test_demo_path_patch_to_logits_equals_fast_engine(demo_model, demo_nn, ioi):
    senders = [(9, 4), (22, 3)]
    ref = cw.path_patch(demo_model, ioi, senders=senders, position="END")
    got = cw.path_patch(demo_nn, ioi, senders=senders, position="END")
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0, equal_nan=True)


def test_demo_faithfulness_equals_fast_engine(demo_model, demo_nn, ioi):
    circuit = ["9.4", "9.6", "10.0", "14.1", "22.3", "29.8"]
    ref = cw.faithfulness(demo_model, ioi, circuit, n_random=1)
    before = demo_nn.requests
    got = cw.faithfulness(demo_nn, ioi, circuit, n_random=1)
    assert demo_nn.requests - before == 2  # the means, then 3 circuits x 4 prompts at once
    for name in ("full_metric", "circuit_metric", "ratio"):
        assert abs(getattr(got, name) - getattr(ref, name)) < 1e-4, name
    torch.testing.assert_close(
        torch.tensor(got.random_metric), torch.tensor(ref.random_metric), atol=1e-4, rtol=0
    )


def test_demo_attribution_equals_fast_engine(demo_model, demo_nn, ioi):
    ref = cw.attribution_patch(demo_model, ioi, "v", positions="END")
    before = demo_nn.requests
    got = cw.attribution_patch(demo_nn, ioi, "v", positions="END")
    assert demo_nn.requests - before == 1
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0)


def test_demo_cmap_grid_with_its_arithmetic_fine_tune_equals_fast_engine(demo_model, demo_nn):
    """Two nnsight models (the demo and demo-arith, merged): the k grid in 1 capture request of
    the fine-tuned model and 1 of the base (90 cells x 2 prompts fit 512 rows); cmap of two
    groups and the whole circuit in 1 + 1 too."""
    from circuit_widgets.tasks.arithmetic import arithmetic

    arith = cw.load_model("demo-arith")
    for p in arith.parameters():
        p.requires_grad_(False)
    task = arithmetic(demo_model, n=2, seed=7).with_metric("logit_diff")
    ref = cw.cmap_grid(demo_model, arith, task, component="k")
    arith_nn = cw.load_model(arith, backend="nnsight", remote="local")
    before = demo_nn.requests
    got = cw.cmap_grid(demo_nn, arith_nn, task, component="k")
    assert (demo_nn.requests - before, arith_nn.requests) == (1, 1) and got.done.all()
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.metric_corrupt, ref.metric_corrupt, atol=1e-4, rtol=0)
    assert float(ref.values.abs().max()) > 1e-2  # the fine-tune's k moves the metric
    # cmap of a circuit's groups (z; each alone, then together): 2 requests for the batch
    circuit = cw.Circuit.from_groups({"early": ["9.4", "9.6"], "late": ["14.1", "22.3"]})
    ref_c = cw.cmap(demo_model, arith, task, circuit=circuit)
    demo_nn.requests = arith_nn.requests = 0
    got_c = cw.cmap(demo_nn, arith_nn, task, circuit=circuit)
    assert (demo_nn.requests, arith_nn.requests) == (1, 1) and got_c.done.all()
    assert got_c.groups == ref_c.groups == ["early", "late", "circuit"]
    for name in ("base_metric", "finetuned_metric", "patched_metric", "patched_accuracy"):
        torch.testing.assert_close(getattr(got_c, name), getattr(ref_c, name), atol=1e-4, rtol=0)
    assert float((ref_c.finetuned_metric - ref_c.base_metric).abs().max()) > 1e-2


def test_demo_completeness_equals_fast_engine(demo_model, demo_nn, ioi):
    circuit = cw.Circuit.from_groups(
        {"movers": ["9.4", "9.6", "10.0"], "inhibition": ["14.1", "22.3"]},
        positions={"movers": "END", "inhibition": None},
    )
    ref = cw.completeness(demo_model, ioi, circuit, subsets="groups")
    before = demo_nn.requests
    got = cw.completeness(demo_nn, ioi, circuit, subsets="groups")
    assert demo_nn.requests - before == 2  # the means, then every circuit at once
    torch.testing.assert_close(
        torch.tensor(got.scores), torch.tensor(ref.scores), atol=1e-4, rtol=0
    )
    # minimality scores through the same ablator (tested on the tiny models)


def test_demo_intervention_edits_equal_local(demo_model, demo_nn, ioi):
    """A GQA layer's pattern edit sent as tensors: 9.4 and 9.6 made to attend to S1 at END."""
    from circuit_widgets.core.edits import run_with_edits

    end = ioi.positions["END"]
    args = {"heads": ["9.4", "9.6", "10.0"], "attend_to": "S1", "scale": {"10.0": 0.0}}
    ref = run_with_edits(
        demo_model, ioi.clean_tokens, cw.intervene(demo_model, ioi, **args).edits(), at=end
    )
    before = demo_nn.requests
    got = run_with_edits(
        demo_nn, ioi.clean_tokens, cw.intervene(demo_nn, ioi, **args).edits(), at=end
    )
    assert demo_nn.requests - before == 1
    plain = run_with_edits(demo_model, ioi.clean_tokens, at=end)
    assert float((plain.logits - ref.logits).abs().max()) > 1e-2
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)


def test_demo_dcm_equals_fast_engine(demo_model, demo_nn):
    """The whole training loop in one session: the same masks, curve and accuracies."""
    from circuit_widgets.core.masking import dcm
    from circuit_widgets.tasks import desiderata

    d = desiderata(demo_model, 10, seed=0, n_boxes=3)["object_value"]
    kw = {
        "heads": ["14.1", "14.4", "17.0", "20.2", "22.3", "25.7"],
        "lam": 0.01,
        "lr": 0.3,
        "epochs": 2,
        "batch_size": 4,
        "seed": 1,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than two contended threads here
    try:
        ref = dcm(demo_model, d, **kw)
        before = demo_nn.requests
        got = dcm(demo_nn, d, **kw)
    finally:
        torch.set_num_threads(threads)
    assert demo_nn.requests - before == 2
    for name in ("mask", "final_mask"):
        torch.testing.assert_close(
            getattr(got, name), getattr(ref, name), atol=1e-4, rtol=0, equal_nan=True
        )
    torch.testing.assert_close(got.curve.loss, ref.curve.loss, atol=1e-4, rtol=0)
    assert got.curve.val_accuracy.tolist() == ref.curve.val_accuracy.tolist()
    assert got.selected == ref.selected and got.best_step == ref.best_step
    for name in ("train_accuracy", "test_accuracy", "baseline_accuracy", "full_patch_accuracy"):
        assert getattr(got, name) == getattr(ref, name), name
    assert float((1 - ref.final_mask).nan_to_num().max()) > 0.05  # the mask moved
