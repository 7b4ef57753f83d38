"""Colored Objects (Merullo et al., simplified BIG-bench): "... the cup?\\nA:" -> " Blue"."""

from __future__ import annotations

import random
from typing import Any

import torch

from circuit_widgets.tasks import words
from circuit_widgets.tasks._tokenize import Prompt, Vocab, check_n
from circuit_widgets.tasks.base import Task
from circuit_widgets.tasks.pairs import assemble_task

EXAMPLE_SEPARATOR = "\n\n"


def colored_objects(model: Any, n: int, seed: int = 0) -> Task:
    """``n`` three-object colour questions, each after one worked example of the same format.

    Corrupt = same context, a different queried object (so a different answer). Answer: the
    title-cased colour (" Blue"); wrong answers [batch, 2]: the other two context colours.
    Positions: query_object, correct_color, correct_object, END; position_sets:
    wrong_colors [batch, 2] (same order as wrong_answers) and objects [batch, 3].
    ``model`` is a TransformerBridge or a bare tokenizer.
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

    out: dict[str, list] = {
        k: []
        for k in (
            "clean",
            "corrupt",
            "pos",
            "cp",
            "kp",
            "meta",
            "ans",
            "wrong",
            "wrong_pos",
            "obj_pos",
        )
    }
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
        out["clean"].append(ids)
        out["corrupt"].append(cids)
        out["pos"].append(
            {
                "query_object": pos["query"],
                "correct_color": pos[f"color{q}"],
                "correct_object": pos[f"object{q}"],
                "END": pos["END"],
            }
        )
        out["wrong_pos"].append([pos[f"color{j}"] for j in others])
        out["obj_pos"].append([pos[f"object{j}"] for j in range(3)])
        out["ans"].append(colors[cols[q]][1])
        out["wrong"].append([colors[cols[j]][1] for j in others])
        out["cp"].append(clean.text)
        out["kp"].append(corrupt.text)
        out["meta"].append(
            {
                "objects": objs,
                "colors": cols,
                "query": objs[q],
                "answer": cols[q],
                "corrupt_query": objs[q_corrupt],
                "corrupt_answer": cols[q_corrupt],
                "example": example,
            }
        )
    return assemble_task(
        "colored_objects",
        vocab,
        out["clean"],
        out["corrupt"],
        out["pos"],
        torch.tensor(out["ans"], dtype=torch.long),
        torch.tensor(out["wrong"], dtype=torch.long),
        metric="logit_diff",
        clean_prompts=out["cp"],
        corrupt_prompts=out["kp"],
        meta=out["meta"],
        position_sets={"wrong_colors": out["wrong_pos"], "objects": out["obj_pos"]},
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
