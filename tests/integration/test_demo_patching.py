"""The patching engine on the real demo model (SmolLM2-135M: 30 layers, 9 query heads on
3 KV heads) against the plain one-head-per-forward references of tests/unit/micro_models.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from circuit_widgets.tasks.base import Task
from circuit_widgets.types import Head, Receiver

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "_reference_micro_models", Path(__file__).parents[1] / "unit" / "micro_models.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

# (template, IO, S): the clean prompt repeats S (answer IO); the corrupt one repeats IO instead.
PROMPTS = [
    ("When {A} and {B} went to the store, {B} gave a drink to", "Mary", "John"),
    ("Then, {A} and {B} had a long argument. Afterwards {B} said to", "Anna", "Tom"),
    ("After {A} and {B} went to the park, {B} gave a ball to", "Sarah", "David"),
    ("When {A} and {B} got a snack at the cafe, {B} decided to give it to", "Lisa", "Mark"),
    ("{A} and {B} found a bone. {B} gave it to", "Kate", "James"),
    ("While {A} and {B} were working, {B} handed a pen to", "Emma", "Paul"),
]


@pytest.fixture(scope="module")
def core():
    from circuit_widgets import core

    return core


@pytest.fixture(scope="module")
def ioi_task(demo_model):
    return build_ioi_task(demo_model)


def build_ioi_task(model) -> Task:
    """Six IOI prompts of different lengths, right-padded; S2 = the repeated name's index."""
    tok = model.tokenizer
    rows, corrupt_rows, s2, answers, wrong = [], [], [], [], []
    for template, io, s in PROMPTS:
        clean = tok(template.format(A=io, B=s)).input_ids
        io_id = tok(" " + io, add_special_tokens=False).input_ids
        s_id = tok(" " + s, add_special_tokens=False).input_ids
        assert len(io_id) == 1 and len(s_id) == 1
        last_s = max(i for i, t in enumerate(clean) if t == s_id[0])
        corrupt = list(clean)
        corrupt[last_s] = io_id[0]
        rows.append(clean)
        corrupt_rows.append(corrupt)
        s2.append(last_s)
        answers.append(io_id[0])
        wrong.append(s_id[0])
    width = max(map(len, rows))
    pad = tok.pad_token_id

    def padded(seqs):
        return torch.tensor([r + [pad] * (width - len(r)) for r in seqs])

    lengths = torch.tensor([len(r) for r in rows])
    return Task(
        name="demo-ioi",
        clean_tokens=padded(rows),
        corrupt_tokens=padded(corrupt_rows),
        attention_mask=(torch.arange(width)[None] < lengths[:, None]).long(),
        answers=torch.tensor(answers),
        wrong_answers=torch.tensor(wrong),
        positions={"END": lengths - 1, "S2": torch.tensor(s2)},
    )


def test_task_is_sound(demo_model, ioi_task):
    assert len(set(ioi_task.lengths.tolist())) > 2, "prompts should differ in length"
    mc = reference.run_metric(demo_model, ioi_task.clean_tokens, ioi_task)
    mk = reference.run_metric(demo_model, ioi_task.corrupt_tokens, ioi_task)
    assert (mc - mk).mean() > 0, "the demo model should prefer the indirect object"


def test_activation_patch_chosen_heads_at_end(core, demo_model, ioi_task):
    chosen = [Head(9, 1), Head(20, 4), Head(29, 8)]
    grid = core.activation_patch(demo_model, ioi_task, component="z", positions="END", heads=chosen)
    task = ioi_task
    metric_clean = reference.run_metric(demo_model, task.clean_tokens, task)
    corrupt_cache = reference.cache_of(
        demo_model, task.corrupt_tokens, [reference.hook_name("z", h.layer) for h in chosen]
    )
    values = grid.values.detach().cpu().float()
    assert tuple(values.shape) == (30, 9)
    for h in chosen:
        name = reference.hook_name("z", h.layer)

        def hook(act, hook, h=h, name=name):
            return reference.copy_slice(
                act, corrupt_cache[name], "z", h.head, task.positions["END"]
            )

        expected = (
            reference.run_metric(demo_model, task.clean_tokens, task, [(name, hook)]) - metric_clean
        ).mean()
        assert abs(float(values[h.layer, h.head] - expected)) <= 1e-4, (
            str(h),
            float(values[h.layer, h.head]),
            float(expected),
        )
    assert int((~torch.isnan(values)).sum()) == len(chosen)


def test_path_patch_to_a_gqa_k_receiver(core, demo_model, ioi_task):
    """Receiver 22.4's k lives on KV head 1, shared with 22.3 and 22.5."""
    senders = [Head(8, 1), Head(21, 0)]
    grid = core.path_patch(
        demo_model, ioi_task, receivers=[Receiver(22, 4, "k")], senders=senders, position="S2"
    )
    ref = reference.ref_path_patch(
        demo_model,
        ioi_task,
        [(22, 4, "k")],
        senders=[(h.layer, h.head) for h in senders],
        position="S2",
    )
    values = grid.values.detach().cpu().float()
    for h in senders:
        assert abs(float(values[h.layer, h.head] - ref[:, h.layer, h.head].mean())) <= 1e-4, str(h)
    assert int((~torch.isnan(values)).sum()) == len(senders)
    assert "group" in " ".join(grid.notes).lower(), grid.notes
