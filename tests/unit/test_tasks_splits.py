"""Held-out vocabulary for the boxes task: train and test never share an object or a box label."""

from __future__ import annotations

import random

import pytest

from circuit_widgets.models import tiny_tokenizer
from circuit_widgets.tasks import desiderata, entity_tracking, words
from circuit_widgets.tasks.entity_tracking import SPLITS, BoxVocab, split_words


def words_used(task) -> tuple[set[str], set[str]]:
    objects, labels = set(), set()
    for m in task.meta:
        objects |= set(m["objects"]) | set(m["corrupt_objects"])
        labels |= set(m["labels"]) | set(m["corrupt_labels"]) | {m["corrupt_query_label"]}
    return objects, labels


def test_split_words_partition_each_list():
    for full in (words.BOX_OBJECTS, words.BOX_LABELS):
        train, test = split_words(full, "train"), split_words(full, "test")
        assert not set(train) & set(test)
        assert sorted(train + test) == sorted(full) == sorted(split_words(full, "all"))
        assert len(test) == -(-len(full) // 3)  # a third, rounded up
    # Enough held-out letters for 7 boxes plus a corrupt query label in none of them.
    assert len(split_words(words.BOX_LABELS, "test")) >= 8
    with pytest.raises(ValueError, match=r"split must be one of \('all', 'train', 'test'\)"):
        split_words(words.BOX_LABELS, "dev")


def test_tasks_of_train_and_test_share_no_object_and_no_label():
    tok = tiny_tokenizer()
    tr_o, tr_l = words_used(entity_tracking(tok, 200, seed=1, split="train"))
    te_o, te_l = words_used(entity_tracking(tok, 200, seed=1, split="test"))
    assert tr_o and te_o and not tr_o & te_o
    assert tr_l and te_l and not tr_l & te_l
    assert te_o <= set(split_words(words.BOX_OBJECTS, "test"))
    assert te_l <= set(split_words(words.BOX_LABELS, "test"))
    # 200 prompts of 7 boxes reach every word of each part.
    assert te_l == set(split_words(words.BOX_LABELS, "test"))
    assert tr_l == set(split_words(words.BOX_LABELS, "train"))


def test_desiderata_of_train_and_test_share_no_object_and_no_label():
    tok = tiny_tokenizer()
    used = {}
    for split in ("train", "test"):
        objs, labs = set(), set()
        for d in desiderata(tok, 40, seed=2, split=split).values():
            for m in d.meta:
                objs |= set(m["base_objects"]) | set(m["source_objects"])
                labs |= set(m["base_labels"]) | set(m["source_labels"])
        used[split] = (objs, labs)
    assert not used["train"][0] & used["test"][0]
    assert not used["train"][1] & used["test"][1]


def test_default_split_is_all_and_keeps_todays_prompts():
    tok = tiny_tokenizer()
    a = entity_tracking(tok, 3, seed=3)
    b = entity_tracking(tok, 3, seed=3, split="all")
    assert a.clean_prompts == b.clean_prompts and a.corrupt_prompts == b.corrupt_prompts
    # Written down from the generator before splits existed (same seed, same tokenizer).
    assert a.clean_prompts[0] == (
        "The engine is in Box P, the tie is in Box I, the cart is in Box R, the map is in Box H, "
        "the ring is in Box G, the book is in Box Z, the bag is in Box X. Box X contains the"
    )
    assert a.corrupt_prompts[2] == (
        "The iron is in Box Z, the cart is in Box C, the bottle is in Box N, the ticket is in "
        "Box E, the train is in Box A, the boat is in Box J, the crown is in Box X. "
        "Box S contains the"
    )
    # The same draw as before splits existed: the full sorted word lists feed the sampler.
    bv = BoxVocab.of(tok, 7, "test")
    rng = random.Random(3)
    objs, labs = bv.sample(rng, 7)
    assert a.meta[0]["objects"] == objs and a.meta[0]["labels"] == labs
    assert set(bv.labels) == set(words.BOX_LABELS)
    da = desiderata(tok, 4, seed=5)
    db = desiderata(tok, 4, seed=5, split="all")
    assert all(da[k].base_prompts == db[k].base_prompts for k in da)


def test_test_split_limits_the_number_of_boxes():
    tok = tiny_tokenizer()
    top = len(split_words(words.BOX_LABELS, "test")) - 1
    entity_tracking(tok, 2, n_boxes=top, split="test")
    with pytest.raises(ValueError, match=rf"between 2 and {top} .*split 'test'"):
        entity_tracking(tok, 2, n_boxes=top + 1, split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        entity_tracking(tok, 2, split="eval")
    assert SPLITS == ("all", "train", "test")
