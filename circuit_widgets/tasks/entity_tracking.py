"""Entity tracking (Prakash et al. 2024): "The document is in Box X, ... Box X contains the"."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import torch

from circuit_widgets.tasks import words
from circuit_widgets.tasks._tokenize import Prompt, Vocab, check_n
from circuit_widgets.tasks.base import Task
from circuit_widgets.tasks.pairs import assemble_task
from circuit_widgets.types import Stage

MIN_BOXES = 2
# Prakash et al.: A -> logits at END; B -> A's queries at END; C -> B's values at query_label;
# D -> C's values at query_label_ctx.
STAGES = (
    Stage("A", "END"),
    Stage("B", "END", "A", "q"),
    Stage("C", "query_label", "B", "v"),
    Stage("D", "query_label_ctx", "C", "v"),
)

SPLITS = ("all", "train", "test")
TEST_SHARE = 3  # one word in three (rounded up) is held out for evaluation


def split_words(words_: list[str], split: str, what: str = "split_words") -> list[str]:
    """The words of ``split``: "test" holds out a fixed third, "train" the rest, "all" all.

    The partition hangs on each word alone (a hash of it), so it is the same for every
    tokenizer; filtering to single tokens happens afterwards, within each part.
    """
    if split not in SPLITS:
        raise ValueError(f"{what}: split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(words_)
    ranked = sorted(words_, key=lambda w: hashlib.sha256(f"boxes/{w}".encode()).hexdigest())
    test = set(ranked[: -(-len(ranked) // TEST_SHARE)])
    return [w for w in words_ if (w in test) == (split == "test")]


@dataclass(frozen=True)
class BoxVocab:
    """The box labels and objects that are one token (with a leading space) for one tokenizer."""

    vocab: Vocab
    labels: dict[str, int]
    objects: dict[str, int]
    split: str = "all"

    @classmethod
    def of(cls, model: Any, n_boxes: int, what: str, split: str = "all") -> BoxVocab:
        vocab = Vocab.of(model)
        if isinstance(n_boxes, bool) or not isinstance(n_boxes, int):
            raise TypeError(f"{what}: n_boxes must be an int, got {n_boxes!r}")
        labels = vocab.single_words(
            split_words(words.BOX_LABELS, split, what), "BOX_LABELS", 0, what
        )
        objects = vocab.single_words(
            split_words(words.BOX_OBJECTS, split, what), "BOX_OBJECTS", 0, what
        )
        # One label more than boxes: a corrupt query needs a letter that is in no box.
        top = min(len(labels) - 1, len(objects))
        if not MIN_BOXES <= n_boxes <= top:
            raise ValueError(
                f"{what}: n_boxes must be between {MIN_BOXES} and {top} for tokenizer "
                f"{vocab.name!r} and split {split!r} ({len(labels)} single-token labels, "
                f"{len(objects)} objects), got {n_boxes}"
            )
        return cls(vocab, labels, objects, split)

    def sample(
        self, rng: random.Random, n_boxes: int, avoid_objects: tuple[str, ...] = ()
    ) -> tuple[list[str], list[str]]:
        """Distinct objects (avoiding ``avoid_objects`` where enough remain) and distinct labels."""
        pool = [o for o in sorted(self.objects) if o not in avoid_objects]
        if len(pool) < n_boxes:
            pool = sorted(self.objects)
        return rng.sample(pool, n_boxes), rng.sample(sorted(self.labels), n_boxes)


@dataclass(frozen=True)
class BoxPrompt:
    """One tokenised boxes prompt and where its parts are."""

    ids: list[int]
    text: str
    positions: dict[str, int]  # END, query_label, query_label_ctx, query_object_ctx (if any)
    objects: list[str]
    labels: list[str]
    query_label: str
    query_index: int | None  # the queried box, None when the query label is in no box


def box_prompt(bv: BoxVocab, objects: list[str], labels: list[str], query_label: str) -> BoxPrompt:
    """Tokenise "The o0 is in Box l0, the o1 is in Box l1, ... . Box q contains the"."""
    prompt = Prompt()
    for i, (obj, lab) in enumerate(zip(objects, labels)):
        seg = words.ENTITY_SEGMENT
        seg = seg[:1].upper() + seg[1:] if i == 0 else ", " + seg
        slot = {"object": (obj, f"object{i}"), "label": (lab, f"label{i}")}

        def fill(field: str, _k: int, slot: dict[str, tuple[str, str]] = slot) -> tuple[str, str]:
            return slot[field]

        prompt.add_template(seg, fill)
    prompt.add(".").add_template(words.ENTITY_QUERY, lambda _f, _k: (query_label, "query"))
    expect = {f"object{i}": bv.objects[o] for i, o in enumerate(objects)}
    expect |= {f"label{i}": bv.labels[lb] for i, lb in enumerate(labels)}
    ids, pos = bv.vocab.encode_prompt(prompt, expect | {"query": bv.labels[query_label]})
    q = labels.index(query_label) if query_label in labels else None
    named = {"query_label": pos["query"], "END": pos["END"]}
    # A query label in no box (a corrupt prompt) has no context slot; box 0's stands in.
    named["query_label_ctx"] = pos[f"label{q if q is not None else 0}"]
    named["query_object_ctx"] = pos[f"object{q if q is not None else 0}"]
    return BoxPrompt(ids, prompt.text, named, list(objects), list(labels), query_label, q)


def entity_tracking(
    model: Any, n: int, seed: int = 0, n_boxes: int = 7, split: str = "all"
) -> Task:
    """``n`` boxes prompts with ``n_boxes`` boxes; the answer is the queried box's object.

    ``split`` picks the objects and box labels: "train" and "test" are disjoint (a fixed third
    of each word list is held out for "test", see ``split_words``), "all" uses every word.
    Evaluate a model fine-tuned on "train" prompts on "test" prompts.

    Corrupt = another context (objects not in the clean one, new labels) whose query label
    is a letter in none of its boxes; same length. Answer: " <object>"; wrong answers
    [batch, n_boxes-1]: the clean context's other objects. Positions: query_label, query_label_ctx,
    query_object_ctx, END. Metric: probability of the answer.
    """
    check_n(n, "entity_tracking")
    bv = BoxVocab.of(model, n_boxes, "entity_tracking", split)
    rng = random.Random(seed)
    out: dict[str, list] = {
        k: [] for k in ("clean", "corrupt", "pos", "cp", "kp", "meta", "ans", "wrong")
    }
    for _ in range(n):
        objs, labs = bv.sample(rng, n_boxes)
        q = rng.randrange(n_boxes)
        cobjs, clabs = bv.sample(rng, n_boxes, avoid_objects=tuple(objs))
        cquery = rng.choice([lb for lb in sorted(bv.labels) if lb not in clabs])
        clean = box_prompt(bv, objs, labs, labs[q])
        corrupt = box_prompt(bv, cobjs, clabs, cquery)
        out["clean"].append(clean.ids)
        out["corrupt"].append(corrupt.ids)
        # One structure, so the clean positions index the corrupt prompt's slots too.
        out["pos"].append(dict(clean.positions))
        out["ans"].append(bv.objects[objs[q]])
        out["wrong"].append([bv.objects[o] for j, o in enumerate(objs) if j != q])
        out["cp"].append(clean.text)
        out["kp"].append(corrupt.text)
        out["meta"].append(
            {
                "objects": objs,
                "labels": labs,
                "query_index": q,
                "query_label": labs[q],
                "answer": objs[q],
                "corrupt_objects": cobjs,
                "corrupt_labels": clabs,
                "corrupt_query_label": cquery,
                "split": split,
            }
        )
    return assemble_task(
        "entity_tracking",
        bv.vocab,
        out["clean"],
        out["corrupt"],
        out["pos"],
        torch.tensor(out["ans"], dtype=torch.long),
        torch.tensor(out["wrong"], dtype=torch.long),
        metric="prob",
        clean_prompts=out["cp"],
        corrupt_prompts=out["kp"],
        meta=out["meta"],
        stages=STAGES,
    )
