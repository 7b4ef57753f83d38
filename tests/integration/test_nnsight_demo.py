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
