"""Property tests over seeds, n and n_boxes: the generators' invariants hold for every draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from circuit_widgets.models import cache_dir, tiny_tokenizer
from circuit_widgets.tasks import colored_objects, desiderata, entity_tracking, ioi

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(1, 9)


def _tokenizers():
    toks = {"tiny": tiny_tokenizer()}
    folders = sorted((cache_dir() / "models").glob("smollm2-135m-instruct-*"))
    if folders:
        toks["demo"] = AutoTokenizer.from_pretrained(folders[0])
    return toks


TOKENIZERS = _tokenizers()


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]


def word_at(tok, tokens, b, pos) -> str:
    return tok.decode([int(tokens[b, int(pos)])])


def check_common(task, tok) -> None:
    """Right padding, END on the last real token, clean and corrupt one length."""
    n = len(task)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape == task.attention_mask.shape
    assert torch.equal(task.positions["END"], task.lengths - 1)
    real = torch.arange(task.seq_len) < task.lengths[:, None]
    assert torch.equal(task.attention_mask.bool(), real)
    assert (task.clean_tokens[~real] == tok.pad_token_id).all()
    assert (task.clean_tokens[:, 0] == tok.bos_token_id).all()
    for name, pos in task.positions.items():
        assert pos.shape == (n,) and (pos < task.lengths).all(), name


@FAST
@given(seed=seeds, n=sizes, corruption=st.sampled_from(["ABC", "S2_IO"]))
def test_ioi_invariants(tok, seed, n, corruption):
    task = ioi(tok, n, seed=seed, corruption=corruption)
    assert len(task) == n
    check_common(task, tok)
    changed = {"ABC": ("IO", "S1", "S2"), "S2_IO": ("S2",)}[corruption]
    for b, m in enumerate(task.meta):
        pos = {k: int(v[b]) for k, v in task.positions.items()}
        assert word_at(tok, task.clean_tokens, b, pos["IO"]) == " " + m["IO"]
        assert (
            word_at(tok, task.clean_tokens, b, pos["S1"])
            == word_at(tok, task.clean_tokens, b, pos["S2"])
            == " " + m["S"]
        )
        assert pos["S1"] < pos["S2"] and pos["IO"] < pos["S2"] < pos["END"]
        diff = (task.clean_tokens[b] != task.corrupt_tokens[b]).nonzero().flatten().tolist()
        assert diff == sorted(pos[k] for k in changed)
        assert tok.decode([int(task.answers[b])]) == " " + m["IO"]
        assert tok.decode([int(task.wrong_answers[b])]) == " " + m["S"]
    again = ioi(tok, n, seed=seed, corruption=corruption)
    assert torch.equal(again.clean_tokens, task.clean_tokens) and again.meta == task.meta


@FAST
@given(seed=seeds, n=sizes)
def test_colored_objects_invariants(tok, seed, n):
    task = colored_objects(tok, n, seed=seed)
    check_common(task, tok)
    for b, m in enumerate(task.meta):
        q = m["objects"].index(m["query"])
        assert (
            word_at(tok, task.clean_tokens, b, task.positions["query_object"][b])
            == " " + m["query"]
        )
        assert (
            word_at(tok, task.corrupt_tokens, b, task.positions["query_object"][b])
            == " " + m["corrupt_query"]
        )
        assert (
            word_at(tok, task.clean_tokens, b, task.positions["correct_color"][b])
            == " " + m["colors"][q]
        )
        colours = {
            tok.decode([int(t)]) for t in task.wrong_answers[b].tolist() + [int(task.answers[b])]
        }
        assert colours == {" " + c.title() for c in m["colors"]}
        diff = (task.clean_tokens[b] != task.corrupt_tokens[b]).nonzero().flatten().tolist()
        assert diff == [int(task.positions["query_object"][b])]


@FAST
@given(seed=seeds, n=sizes, n_boxes=st.integers(2, 12))
def test_entity_tracking_invariants(tok, seed, n, n_boxes):
    task = entity_tracking(tok, n, seed=seed, n_boxes=n_boxes)
    check_common(task, tok)
    assert task.wrong_answers.shape == (n, n_boxes - 1)
    assert len(set(task.lengths.tolist())) == 1  # one structure for a given n_boxes
    for b, m in enumerate(task.meta):
        label = " " + m["query_label"]
        for name in ("query_label", "query_label_ctx"):
            assert word_at(tok, task.clean_tokens, b, task.positions[name][b]) == label
        assert (
            word_at(tok, task.clean_tokens, b, task.positions["query_object_ctx"][b])
            == " " + m["answer"]
        )
        assert int(task.answers[b]) not in task.wrong_answers[b].tolist()
        assert m["corrupt_query_label"] not in m["corrupt_labels"]


@FAST
@given(seed=seeds, n=sizes, n_boxes=st.integers(2, 12))
def test_desiderata_invariants(tok, seed, n, n_boxes):
    for kind, d in desiderata(tok, n, seed=seed, n_boxes=n_boxes).items():
        assert len(d) == n and torch.equal(d.base_attention_mask, d.source_attention_mask)
        for b, m in enumerate(d.meta):
            qs = m["source_query_index"]
            assert m["target"] != m["base_answer"]
            assert tok.decode([int(d.targets[b])]) == " " + m["target"]
            if kind == "positional":
                assert m["target"] == m["base_objects"][qs] and qs != m["base_query_index"]
            elif kind == "object_value":
                assert m["target"] == m["source_answer"]
            else:
                label = m["source_labels"][qs]
                assert m["target"] == m["base_objects"][m["base_labels"].index(label)]
