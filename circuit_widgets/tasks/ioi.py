"""Indirect object identification (Wang et al. 2022): "... John gave a drink to" -> " Mary"."""

from __future__ import annotations

import random
from typing import Any

from circuit_widgets.tasks import words
from circuit_widgets.tasks._tokenize import Prompt, Vocab, check_n
from circuit_widgets.tasks.base import Task
from circuit_widgets.tasks.pairs import PairRows
from circuit_widgets.types import Stage

CORRUPTIONS = ("ABC", "S2_IO")

# Wang et al.'s circuit as Merullo et al. run it: movers -> logits at END; inhibition -> movers'
# queries at END; induction/duplicate -> inhibition heads' keys and values at S2;
# previous-token -> induction heads' keys at S1+1.
STAGES = (
    Stage("movers", "END"),
    Stage("inhibition", "END", "movers", "q"),
    Stage("induction", "S2", "inhibition", "kv"),
    Stage("previous_token", "S1+1", "induction", "k"),
)


def ioi(model: Any, n: int, seed: int = 0, corruption: str = "ABC") -> Task:
    """``n`` IOI prompts, half ABBA and half BABA, over Wang et al.'s 15 + 15 templates.

    ``corruption="ABC"`` replaces IO, S1 and S2 by three fresh distinct names;
    ``"S2_IO"`` replaces S2 by the IO name. Answer: the IO token; wrong answer: the S token.
    Positions: IO, S1, S1+1, S2, and (between the first two names), END. Stages: ``STAGES``.
    ``model`` is a TransformerBridge or a bare tokenizer.
    """
    check_n(n, "ioi")
    key = {c.lower(): c for c in CORRUPTIONS}.get(str(corruption).lower())
    if key is None:
        raise ValueError(f"ioi: unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
    vocab = Vocab.of(model)
    names = vocab.single_words(words.NAMES, "NAMES", 5 if key == "ABC" else 2, "ioi")
    places = sorted(vocab.single_words(words.PLACES, "PLACES", 1, "ioi"))
    objects = sorted(vocab.single_words(words.IOI_OBJECTS, "IOI_OBJECTS", 1, "ioi"))
    pool = sorted(names)
    rng = random.Random(seed)

    rows = PairRows()
    for i in range(n):
        order = "ABBA" if i % 2 == 0 else "BABA"
        templates = words.ABBA_TEMPLATES if order == "ABBA" else words.BABA_TEMPLATES
        t = rng.randrange(len(templates))
        io, s = rng.sample(pool, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        # Drawn for both corruptions where possible, so one seed gives one set of clean prompts.
        others = [x for x in pool if x not in (io, s)]
        fresh = rng.sample(others, 3) if len(others) >= 3 else []
        if key == "ABC":
            swap = dict(zip(("IO", "S1", "S2"), fresh))
        else:
            swap = {"IO": io, "S1": s, "S2": io}
        clean = _fill(templates[t], {"IO": io, "S1": s, "S2": s}, place, obj)
        corrupt = _fill(templates[t], swap, place, obj)
        ids, pos = vocab.encode_prompt(clean, {"IO": names[io], "S1": names[s], "S2": names[s]})
        cids, cpos = vocab.encode_prompt(corrupt, {k: names[v] for k, v in swap.items()})
        if cpos != pos:
            raise ValueError(
                f"ioi: clean and corrupt positions differ for {clean.text!r} / {corrupt.text!r}"
            )
        pos = {
            "IO": pos["IO"],
            "S1": pos["S1"],
            "S1+1": pos["S1"] + 1,
            "S2": pos["S2"],
            "and": min(pos["IO"], pos["S1"]) + 1,
            "END": pos["END"],
        }
        rows.add(
            ids,
            cids,
            pos,
            clean.text,
            corrupt.text,
            answer=names[io],
            wrong_answer=names[s],
            meta={
                "IO": io,
                "S": s,
                "order": order,
                "template": t,
                "place": place,
                "object": obj,
                "corrupt_names": swap,
                "corruption": key,
            },
        )
    return rows.task(f"ioi-{key}", vocab, metric="logit_diff", stages=STAGES)


def _fill(template: str, names: dict[str, str], place: str, obj: str) -> Prompt:
    """The template up to (not including) its final " [A]", the answer, with slots named."""
    body = template[: template.rindex(" [A]")]

    def fill(field: str, k: int) -> tuple[str, str | None]:
        if field == "A":
            return names["IO"], "IO"
        if field == "B":
            slot = "S1" if k == 0 else "S2"
            return names[slot], slot
        return (place, None) if field == "PLACE" else (obj, None)

    return Prompt().add_template(body, fill, pattern=r"\[(A|B|PLACE|OBJECT)\]")
