"""DCM on the demo model (SmolLM2-135M, grouped-query: 9 query heads share 3 kv heads)."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets.core.masking import dcm
from circuit_widgets.tasks import desiderata

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checksum(model) -> list[tuple[float, float]]:
    return [(float(p.double().sum()), float(p.double().abs().sum())) for p in model.parameters()]


def test_desiderata_targets_are_tokens_in_the_form_the_model_predicts(demo_model):
    """Whenever the model answers with a word of the context, its token is exactly the one the
    desiderata build for that word (one token, leading space), so DCM can ever hit a target;
    the public code's label targets never could."""
    tok = demo_model.tokenizer
    hits = 0
    for kind, d in desiderata(demo_model, 12, seed=0, n_boxes=3).items():
        for b, m in enumerate(d.meta):
            assert tok(" " + m["target"], add_special_tokens=False)["input_ids"] == [
                int(d.targets[b])
            ], kind
        with torch.no_grad():
            logits = demo_model(d.base_tokens)
        pred = logits[torch.arange(len(d)), d.base_positions["END"]].argmax(-1)
        for b, m in enumerate(d.meta):
            word = tok.decode([int(pred[b])])
            if word.strip() in m["base_objects"]:
                hits += 1
                assert tok(" " + word.strip(), add_special_tokens=False)["input_ids"] == [
                    int(pred[b])
                ]
    assert hits >= 6  # the model does answer with context words, in that form


def test_dcm_on_one_group_matches_plain_hooks_and_leaves_the_weights_alone(demo_model):
    """Value fetchers' desideratum (object value at END) over every head, a few steps."""
    d = desiderata(demo_model, 20, seed=1, n_boxes=3)["object_value"]
    before = checksum(demo_model)
    flags = [p.requires_grad for p in demo_model.parameters()]
    r = dcm(demo_model, d, position="END", lam=0.01, lr=0.3, epochs=1, batch_size=6, seed=0)
    assert checksum(demo_model) == before
    assert [p.requires_grad for p in demo_model.parameters()] == flags
    assert r.complete and r.n_examples == (12, 4, 4) and len(r.heads) == 270
    assert r.curve.target_logit[-1] > r.curve.target_logit[0]  # the mask moved the right way
    assert 0 < r.n_selected < 270

    # Accuracies of the rounded mask, no patch and every head patched, by plain bridge hooks.
    train, _, test = d.split((0.6, 0.2, 0.2), seed=0)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(30)]

    def accuracy(part, patched) -> float:
        with torch.no_grad():
            _, cache = demo_model.run_with_cache(
                part.source_tokens, names_filter=lambda n: n in names
            )
        pb, ps = part.base_positions["END"], part.source_positions["END"]
        rows = torch.arange(len(part))
        hooks = []
        for layer in sorted({h.layer for h in patched}):
            cols = torch.tensor([h.head for h in patched if h.layer == layer])
            src = cache[names[layer]][rows[:, None], ps[:, None], cols[None]]

            def hook(z, hook, cols=cols, src=src):
                out = z.clone()
                out[rows[:, None], pb[:, None], cols[None]] = src
                return out

            hooks.append((names[layer], hook))
        with torch.no_grad():
            logits = demo_model.run_with_hooks(part.base_tokens, fwd_hooks=hooks)
        return float((logits[rows, pb].argmax(-1) == part.targets).float().mean())

    assert r.train_accuracy == pytest.approx(accuracy(train, r.selected))
    assert r.train_accuracy > 0  # so the comparison means something
    assert r.test_accuracy == pytest.approx(accuracy(test, r.selected))
    assert r.baseline_accuracy == pytest.approx(accuracy(test, []))
    assert r.full_patch_accuracy == pytest.approx(accuracy(test, r.heads))
