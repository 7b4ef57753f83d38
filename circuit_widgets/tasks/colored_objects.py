"""Colored Objects (Merullo et al., simplified BIG-bench): "... the cup?\\nA:" -> " Blue"."""

from __future__ import annotations

import random
from typing import Any

from circuit_widgets.tasks import words
from circuit_widgets.tasks._tokenize import Prompt, Vocab, check_n
from circuit_widgets.tasks.base import Task
from circuit_widgets.tasks.pairs import PairRows
from circuit_widgets.types import Stage

EXAMPLE_SEPARATOR = "\n\n"

# The IOI shape (Merullo et al.): movers, inhibition, then heads at the queried object into the
# inhibition heads' keys/values, then heads there into those heads' queries (clean and corrupt
# prompts first differ at the queried object, so earlier positions carry no signal to patch).
STAGES = (
    Stage("movers", "END"),
    Stage("inhibition", "END", "movers", "q"),
    Stage("object_readers", "query_object", "inhibition", "kv"),
    Stage("object_detectors", "query_object", "object_readers", "q"),
)


def colored_objects(model: Any, n: int, seed: int = 0) -> Task:
    """``n`` three-object colour questions, each after one worked example of the same format.

    Corrupt = same context, a different queried object (so a different answer). Answer: the
    title-cased colour (" Blue"); wrong answers [batch, 2]: the other two context colours.
    Positions: query_object, correct_color, correct_object, END; position_sets:
    wrong_colors [batch, 2] (same order as wrong_answers) and objects [batch, 3].
    Stages: ``STAGES``. ``model`` is a TransformerBridge or a bare tokenizer.
    """
    check_n(n, "colored_objects")
    vocab = Vocab.of(model)
    # A colour is usable only if both " blue" (context) and " Blue" (answer) are single tokens.
    lower = vocab.single_words(words.COLORS, "COLORS", 0, "colored_objects")
    title = vocab.single_words(
        [c.title() for c in lower], "COLORS (title-cased)", 0, "colored_objects"
    )
    colors = {c: (lower[c], title[c.title()]) for c in sorted(lower) if c.title() in title}
    if len(colors) < 3:
        raise ValueError(
            f"colored_objects needs at least 3 words from words.COLORS that are one token with a "
            f"leading space both lower-case and title-cased, but tokenizer {vocab.name!r} keeps "
            f"only {sorted(colors)}"
        )
    objects = vocab.single_words(words.COLORED_OBJECTS, "COLORED_OBJECTS", 3, "colored_objects")
    pool_c, pool_o = sorted(colors), sorted(objects)
    rng = random.Random(seed)

    rows = PairRows()
    wrong_pos: list[list[int]] = []
    obj_pos: list[list[int]] = []
    for _ in range(n):
        ex_objs, ex_cols, ex_q = rng.sample(pool_o, 3), rng.sample(pool_c, 3), rng.randrange(3)
        objs, cols = rng.sample(pool_o, 3), rng.sample(pool_c, 3)
        q = rng.randrange(3)
        q_corrupt = rng.choice([j for j in range(3) if j != q])
        example = _question(Prompt(), ex_objs, ex_cols, ex_q, named=False).text
        example += " " + ex_cols[ex_q].title() + EXAMPLE_SEPARATOR
        clean = _question(Prompt().add(example), objs, cols, q, named=True)
        corrupt = _question(Prompt().add(example), objs, cols, q_corrupt, named=True)
        expect = {f"color{j}": colors[c][0] for j, c in enumerate(cols)}
        expect |= {f"object{j}": objects[o] for j, o in enumerate(objs)}
        ids, pos = vocab.encode_prompt(clean, expect | {"query": objects[objs[q]]})
        cids, cpos = vocab.encode_prompt(corrupt, expect | {"query": objects[objs[q_corrupt]]})
        if cpos != pos:
            raise ValueError(
                f"colored_objects: positions differ for {clean.text!r} / {corrupt.text!r}"
            )
        others = [j for j in range(3) if j != q]
        wrong_pos.append([pos[f"color{j}"] for j in others])
        obj_pos.append([pos[f"object{j}"] for j in range(3)])
        rows.add(
            ids,
            cids,
            {
                "query_object": pos["query"],
                "correct_color": pos[f"color{q}"],
                "correct_object": pos[f"object{q}"],
                "END": pos["END"],
            },
            clean.text,
            corrupt.text,
            answer=colors[cols[q]][1],
            wrong_answer=[colors[cols[j]][1] for j in others],
            meta={
                "objects": objs,
                "colors": cols,
                "query": objs[q],
                "answer": cols[q],
                "corrupt_query": objs[q_corrupt],
                "corrupt_answer": cols[q_corrupt],
                "example": example,
            },
        )
    return rows.task(
        "colored_objects",
        vocab,
        metric="logit_diff",
        position_sets={"wrong_colors": wrong_pos, "objects": obj_pos},
        stages=STAGES,
    )


def _question(prompt: Prompt, objs: list[str], cols: list[str], q: int, named: bool) -> Prompt:
    """Append one question in words.COLORED_TEMPLATE; named=True records each word's slot."""
    # "an orange", as BIG-bench writes it.
    a0, a1, a2 = ("an" if c[:1] in "aeiou" else "a" for c in cols)
    context = f"{a0} {{color0}} {{object0}}, {a1} {{color1}} {{object1}}, and {a2} {{color2}} "
    context += "{object2}"
    template = words.COLORED_TEMPLATE.replace("{context}", context)

    def fill(field: str, _k: int) -> tuple[str, str | None]:
        if field == "query":
            word = objs[q]
        else:
            j = int(field[-1])
            word = cols[j] if field.startswith("color") else objs[j]
        return word, field if named else None

    return prompt.add_template(template, fill)
