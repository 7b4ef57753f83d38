"""The task generators on the real demo model (SmolLM2-135M): accuracy and padding."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets.tasks import Task, colored_objects, desiderata, entity_tracking, ioi

pytestmark = pytest.mark.integration

N = 100


def _run(model, tokens, mask):
    with torch.inference_mode():
        return model(tokens, attention_mask=mask)


@pytest.fixture(scope="module")
def scored(demo_model):
    """Each task (n=100) with its clean logits at END, computed once for the module."""
    out = {}
    for name, task in (
        ("ioi", ioi(demo_model, N, seed=0)),
        ("colored_objects", colored_objects(demo_model, N, seed=0)),
        ("entity_tracking", entity_tracking(demo_model, N, seed=0)),
    ):
        out[name] = (
            task,
            task.final_logits(_run(demo_model, task.clean_tokens, task.attention_mask)),
        )
    return out


def _report(capsys, name: str, task: Task, final: torch.Tensor) -> tuple[float, float]:
    cand = task.candidate_accuracy(final).mean().item()
    full = task.accuracy(final).mean().item()
    with capsys.disabled():
        print(
            f"\n[demo] {name} (n={len(task)}): candidate accuracy {cand:.2f}, "
            f"full-vocabulary accuracy {full:.2f}, mean {task.metric_name} "
            f"{task.metric(final).mean().item():.3f}"
        )
    return cand, full


def test_demo_model_solves_ioi(scored, capsys):
    task, final = scored["ioi"]
    cand, _ = _report(capsys, "IOI", task, final)
    assert cand >= 0.9
    assert task.logit_diff(final).mean() > 0


def test_demo_model_on_colored_objects(scored, capsys):
    task, final = scored["colored_objects"]
    cand, full = _report(capsys, "Colored Objects", task, final)
    assert 0.0 <= full <= cand <= 1.0  # a full-vocabulary hit is also a candidate hit
    # The answer form is what the model predicts: its top token is a title-cased colour.
    top = [task.answers.new_tensor(i) for i in final.argmax(-1).tolist()]
    colours = set(task.answers.tolist()) | set(task.wrong_answers.flatten().tolist())
    assert sum(int(t) in colours for t in top) >= 0.9 * len(task)


def test_demo_model_on_entity_tracking(scored, capsys):
    task, final = scored["entity_tracking"]
    cand, full = _report(capsys, "entity tracking (7 boxes)", task, final)
    assert 0.0 <= full <= cand <= 1.0
    probs = task.prob(final)
    assert probs.shape == (N,) and ((probs > 0) & (probs < 1)).all()


def test_s2_io_corruption_flips_the_logit_difference(scored, demo_model):
    abc, clean_final = scored["ioi"]
    task = ioi(demo_model, N, seed=0, corruption="S2_IO").subset(range(20))
    assert task.clean_prompts == abc.clean_prompts[:20]  # one seed, one set of clean prompts
    clean = task.logit_diff(clean_final[:20])
    corrupt = task.logit_diff(_run(demo_model, task.corrupt_tokens, task.attention_mask))
    assert clean.mean() > 1.0 and corrupt.mean() < -1.0


def test_right_padded_batch_matches_unpadded_prompts(scored, demo_model):
    task, final = scored["ioi"]
    lengths = task.lengths.tolist()
    by_length = {n: i for i, n in enumerate(lengths)}  # one example per distinct length
    picks = [by_length[n] for n in sorted(by_length)[:3]]  # the shortest, i.e. most padded
    assert len(picks) == 3 and lengths[picks[0]] < task.seq_len
    for b in picks:
        alone = _run(demo_model, task.clean_tokens[b : b + 1, : lengths[b]], None)[0, -1]
        torch.testing.assert_close(final[b], alone, atol=1e-4, rtol=0)


def test_generated_tokens_equal_to_tokens(demo_model):
    tasks = [ioi(demo_model, 4), colored_objects(demo_model, 4), entity_tracking(demo_model, 4)]
    for task in tasks:
        for b in range(len(task)):
            n = int(task.lengths[b])
            assert torch.equal(
                task.clean_tokens[b, :n], demo_model.to_tokens(task.clean_prompts[b])[0].cpu()
            )
            assert torch.equal(
                task.corrupt_tokens[b, :n], demo_model.to_tokens(task.corrupt_prompts[b])[0].cpu()
            )
    for d in desiderata(demo_model, 3).values():
        for b in range(len(d)):
            assert torch.equal(d.base_tokens[b], demo_model.to_tokens(d.base_prompts[b])[0].cpu())
            assert torch.equal(
                d.source_tokens[b], demo_model.to_tokens(d.source_prompts[b])[0].cpu()
            )
            assert demo_model.tokenizer.decode([int(d.targets[b])]) == " " + d.meta[b]["target"]
