"""Fixtures shared by the unit tests that run many tiny-model forwards."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def core():
    from circuit_widgets import core

    return core


@pytest.fixture(autouse=True)
def nnsight_strict(request, monkeypatch):
    """CW_NNSIGHT_STRICT=1: the nnsight suites' remote="local" requests run under a stand-in for
    NDIF that sends back only the block's saved variables (tests/unit/nnsight_strict.py)."""
    if os.environ.get("CW_NNSIGHT_STRICT") == "1" and request.module.__name__.startswith(
        "test_nnsight"
    ):
        from nnsight_strict import patch_strict

        patch_strict(monkeypatch)
