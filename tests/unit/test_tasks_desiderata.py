"""DCM desiderata: the targets mean what the study says, and the public code's bugs are absent."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from circuit_widgets.models import cache_dir, tiny_tokenizer
from circuit_widgets.tasks import Desideratum, desiderata


@pytest.fixture(scope="module")
def demo_tokenizer():
    folders = sorted((cache_dir() / "models").glob("smollm2-135m-instruct-*"))
    if not folders:
        pytest.skip("demo model not cached yet: run load_model('demo') once")
    return AutoTokenizer.from_pretrained(folders[0])


@pytest.fixture(params=["tiny_gpt2", "demo_tokenizer"])
def source(request):
    return request.getfixturevalue(request.param)


def tok_of(src):
    return src.tokenizer if hasattr(src, "cfg") else src


def dec(src, token_id) -> str:
    return tok_of(src).decode([int(token_id)])


def test_structure_and_positions(source):
    ds = desiderata(source, 12, seed=1, n_boxes=5)
    assert set(ds) == {"positional", "object_value", "label_value"}
    for name, d in ds.items():
        assert d.name == name and len(d) == 12
        assert d.base_tokens.shape == d.source_tokens.shape
        assert torch.equal(d.base_attention_mask, d.source_attention_mask)  # same length per pair
        assert d.targets.shape == (12,)
        for side, tokens, positions in (
            ("base", d.base_tokens, d.base_positions),
            ("source", d.source_tokens, d.source_positions),
        ):
            assert {"END", "query_label", "query_label_ctx", "query_object_ctx"} <= set(positions)
            for b, meta in enumerate(d.meta):
                labels, objects = meta[f"{side}_labels"], meta[f"{side}_objects"]
                q = meta[f"{side}_query_index"]

                def at(k, b=b, tokens=tokens, positions=positions):
                    return dec(source, tokens[b, positions[k][b]])

                assert at("query_label") == at("query_label_ctx") == " " + labels[q]
                assert at("query_object_ctx") == " " + objects[q]
                assert at("END") == " the"
                assert int(positions["END"][b]) == int(d.base_attention_mask[b].sum()) - 1
            assert torch.equal(tokens[:, 0], torch.full((12,), tok_of(source).bos_token_id))


def test_positional_target_uses_the_sources_real_query_index(source):
    d = desiderata(source, 40, seed=2)["positional"]
    not_first = 0
    for b, m in enumerate(d.meta):
        qs = m["source_query_index"]
        assert qs != m["base_query_index"]
        assert dec(source, d.targets[b]) == " " + m["base_objects"][qs] == " " + m["target"]
        assert m["target"] != m["base_answer"]
        assert m["target"] not in m["source_objects"]  # object value cannot explain it
        assert m["source_labels"][qs] not in m["base_labels"]  # nor label value
        not_first += m["target"] != m["base_objects"][0]
    # The public code's floor always read index 0; ours varies with the source.
    assert not_first >= 25
    assert len({m["source_query_index"] for m in d.meta}) == 7


def test_object_value_target_is_the_sources_answer(source):
    d = desiderata(source, 30, seed=3)["object_value"]
    for b, m in enumerate(d.meta):
        assert dec(source, d.targets[b]) == " " + m["source_answer"]
        assert m["source_answer"] not in m["base_objects"]
        assert m["source_query_index"] != m["base_query_index"]


def test_label_value_target_is_the_real_token_of_the_base_object_under_the_sources_label(source):
    d = desiderata(source, 30, seed=4)["label_value"]
    for b, m in enumerate(d.meta):
        label = m["source_labels"][m["source_query_index"]]
        k = m["base_labels"].index(label)  # the label is shared with some base box
        expected = m["base_objects"][k]
        # A real single token that decodes to the object, as the model would predict it.
        assert dec(source, d.targets[b]) == " " + expected
        assert tok_of(source)(" " + expected, add_special_tokens=False)["input_ids"] == [
            int(d.targets[b])
        ]
        assert k != m["base_query_index"] and expected != m["base_answer"]
        assert k != m["source_query_index"]  # position alone cannot give it


def test_each_target_is_its_own_reading_and_no_other():
    """Each target is its property's reading and differs from the others and the base answer."""
    for kind, d in desiderata(tiny_tokenizer(), 20, seed=0).items():
        for m in d.meta:
            qs, label = m["source_query_index"], m["source_labels"][m["source_query_index"]]
            readings = {
                "positional": m["base_objects"][qs],
                "object_value": m["source_answer"],
                "label_value": m["base_objects"][m["base_labels"].index(label)]
                if label in m["base_labels"]
                else None,
                "base": m["base_answer"],
            }
            assert m["target"] == readings[kind]
            assert [k for k, v in readings.items() if v == m["target"]] == [kind]


def test_same_seed_same_desiderata_and_n_boxes_range():
    a, b = desiderata(tiny_tokenizer(), 6, seed=9), desiderata(tiny_tokenizer(), 6, seed=9)
    for k in a:
        assert torch.equal(a[k].base_tokens, b[k].base_tokens) and torch.equal(
            a[k].targets, b[k].targets
        )
    two = desiderata(tiny_tokenizer(), 6, seed=9, n_boxes=2)
    assert all(len(m["base_objects"]) == 2 for d in two.values() for m in d.meta)
    with pytest.raises(ValueError, match="n_boxes must be between 2 and 25"):
        desiderata(tiny_tokenizer(), 6, n_boxes=1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        desiderata(tiny_tokenizer(), 0)


def test_split_is_disjoint_seeded_and_complete():
    d = desiderata(tiny_tokenizer(), 20, seed=0)["positional"]
    train, val, test = d.split((0.6, 0.2, 0.2), seed=1)
    assert (len(train), len(val), len(test)) == (12, 4, 4)
    prompts = [p for part in (train, val, test) for p in part.base_prompts]
    assert sorted(prompts) == sorted(d.base_prompts)
    again = d.split((0.6, 0.2, 0.2), seed=1)
    assert again[1].base_prompts == val.base_prompts
    assert d.split((0.6, 0.2, 0.2), seed=2)[0].base_prompts != train.base_prompts
    # Each part has its own positions and targets (the public code reused the training batch's).
    i = d.base_prompts.index(val.base_prompts[0])
    assert int(val.base_positions["query_label_ctx"][0]) == int(
        d.base_positions["query_label_ctx"][i]
    )
    assert int(val.targets[0]) == int(d.targets[i])
    with pytest.raises(ValueError, match="sum to 1"):
        d.split((0.5, 0.2))
    with pytest.raises(ValueError, match="none empty"):
        d.subset([0, 1]).split()


def test_target_logit_reads_the_target_at_base_end(tiny_llama):
    d = desiderata(tiny_llama, 4, seed=0)["label_value"]
    with torch.no_grad():
        logits = tiny_llama(d.base_tokens, attention_mask=d.base_attention_mask)
    values = d.target_logit(logits)
    assert values.shape == (4,)
    b = 2
    assert values[b] == logits[b, d.base_positions["END"][b], d.targets[b]]


def test_from_examples_for_your_own_prompts(tiny_gpt2):
    base = ["The apple is in Box A, the pen is in Box B. Box A contains the"]
    source = ["The cake is in Box C, the key is in Box A. Box A contains the"]
    d = Desideratum.from_examples(
        tiny_gpt2, base, source, [" pen"], positions={"query_label": [-3], "query_label_ctx": ["A"]}
    )
    assert dec(tiny_gpt2, d.targets[0]) == " pen"
    assert dec(tiny_gpt2, d.base_tokens[0, d.base_positions["query_label_ctx"][0]]) == " A"
    assert int(d.base_positions["query_label_ctx"][0]) == 6
    assert int(d.source_positions["query_label_ctx"][0]) == 13  # found again in the source
    assert torch.equal(d.base_tokens[0], tiny_gpt2.to_tokens(base[0])[0].cpu())
    with pytest.raises(ValueError, match=r"target ' Marianne' of example 0 is not one token"):
        Desideratum.from_examples(tiny_gpt2, base, source, [" Marianne"])
    with pytest.raises(
        ValueError, match=r"example 0: base and source tokenise to different lengths"
    ) as err:
        Desideratum.from_examples(tiny_gpt2, base, ["Box A contains the"], [" pen"])
    assert str(tiny_gpt2.to_str_tokens("Box A contains the")) in str(err.value)


def test_to_moves_every_tensor():
    """CPU-only runs have no second device, so a dtype (also passed to Tensor.to) stands in."""
    d = desiderata(tiny_tokenizer(), 3)["positional"].to(torch.int32)
    tensors = [
        d.base_tokens,
        d.source_tokens,
        d.base_attention_mask,
        d.source_attention_mask,
        d.targets,
        *d.base_positions.values(),
        *d.source_positions.values(),
    ]
    assert all(t.dtype == torch.int32 for t in tensors)
