"""The test set-up itself (issue 15, item 11): a private model cache for every test, and no
machine's absolute paths in the tests."""

from __future__ import annotations

import re
from pathlib import Path

import platformdirs

from circuit_widgets.models import cache_dir

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_gets_a_private_model_cache():
    user = Path(platformdirs.user_cache_dir("circuit_widgets")).resolve()
    private = cache_dir()
    assert private.resolve() != user and user not in private.resolve().parents
    for link in (private / "models").glob("*"):  # the user's models, reused read-only
        assert link.is_symlink() and link.resolve().parent == user / "models"


def test_tests_name_no_absolute_paths_of_a_machine():
    pattern = re.compile(r"(?<![\w.])/(work|root|home|Users|tmp)/")
    hits = [
        f"{p.relative_to(TESTS)}:{i}"
        for p in TESTS.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and p.name != Path(__file__).name
    ]
    assert not hits, hits


def test_peft_wrapping_does_not_repeat_transformers_future_warning():
    """Issue 15 item 10: peft's get_peft_model reads transformers' deprecated
    is_gradient_checkpointing on every call; the package's wrapper keeps that out."""
    import warnings

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuit_widgets.models import peft_wrap

    def hf():
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)

    lora = peft.LoraConfig(r=2, target_modules=["q_proj"])

    def messages(make):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            make()
        return [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)]

    assert messages(lambda: peft.get_peft_model(hf(), lora))  # the source, as it is upstream
    assert messages(lambda: peft_wrap(hf(), lora)) == []
