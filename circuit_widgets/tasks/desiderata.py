"""Desiderata for DCM (Davies et al. 2023, as used by Prakash et al. 2024) on the boxes task.

A desideratum pairs a base prompt with a source prompt of the same structure. Interchanging
some heads' outputs from the source run into the base run at a group's position should make
the base run predict ``targets`` if those heads carry the desideratum's property:

- positional: the base context's object at the source's query-box index;
- object_value: the source's answer;
- label_value: the base object in the box whose label is the source's query label.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int

from circuit_widgets.tasks._tokenize import (
    PositionSpec,
    Vocab,
    check_n,
    pad_rows,
    resolve_positions,
    single_token_ids,
    stack_positions,
)
from circuit_widgets.tasks.entity_tracking import BoxPrompt, BoxVocab, box_prompt

KINDS = ("positional", "object_value", "label_value")


@dataclass(frozen=True, eq=False)
class Desideratum:
    """Base/source prompt pairs (one length per pair, right-padded) and the target token of each."""

    name: str
    base_tokens: Int[torch.Tensor, "batch pos"]
    source_tokens: Int[torch.Tensor, "batch pos"]
    base_attention_mask: Int[torch.Tensor, "batch pos"]
    source_attention_mask: Int[torch.Tensor, "batch pos"]
    base_positions: dict[str, Int[torch.Tensor, " batch"]]
    source_positions: dict[str, Int[torch.Tensor, " batch"]]
    targets: Int[torch.Tensor, " batch"]
    base_prompts: list[str] = field(default_factory=list)
    source_prompts: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        b, p = self.base_tokens.shape
        for label in ("source_tokens", "base_attention_mask", "source_attention_mask"):
            if tuple(getattr(self, label).shape) != (b, p):
                raise ValueError(
                    f"{label} must have base_tokens' shape {(b, p)}, got "
                    f"{tuple(getattr(self, label).shape)}"
                )
        if tuple(self.targets.shape) != (b,):
            raise ValueError(f"targets must be [batch] = ({b},), got {tuple(self.targets.shape)}")
        for side, positions, mask in (
            ("base", self.base_positions, self.base_attention_mask),
            ("source", self.source_positions, self.source_attention_mask),
        ):
            if "END" not in positions:
                raise ValueError(f"{side}_positions needs 'END'")
            lengths = mask.sum(-1)
            for name, pos in positions.items():
                if tuple(pos.shape) != (b,):
                    raise ValueError(
                        f"{side} position {name!r} must be [batch], got {tuple(pos.shape)}"
                    )
                bad = (pos < 0) | (pos >= lengths)
                if bad.any():
                    i = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"{side} position {name!r} of example {i} is {int(pos[i])}, "
                        f"outside its {int(lengths[i])} real tokens"
                    )

    def __len__(self) -> int:
        return self.base_tokens.shape[0]

    def target_logit(
        self, logits: Float[torch.Tensor, "batch pos vocab"]
    ) -> Float[torch.Tensor, " batch"]:
        """The target token's logit at each base prompt's END (the quantity DCM maximises)."""
        end = self.base_positions["END"].to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, end, self.targets.to(logits.device)]

    def to(self, device: str | torch.device) -> Desideratum:
        """The same desideratum with every tensor on ``device`` (generators build on the CPU)."""
        return replace(
            self,
            base_tokens=self.base_tokens.to(device),
            source_tokens=self.source_tokens.to(device),
            base_attention_mask=self.base_attention_mask.to(device),
            source_attention_mask=self.source_attention_mask.to(device),
            base_positions={k: v.to(device) for k, v in self.base_positions.items()},
            source_positions={k: v.to(device) for k, v in self.source_positions.items()},
            targets=self.targets.to(device),
        )

    def subset(self, index: Sequence[int] | slice | torch.Tensor) -> Desideratum:
        """The examples at ``index``, trimmed of padding no remaining example needs."""
        idx = torch.arange(len(self))[index] if not isinstance(index, torch.Tensor) else index
        idx = idx.reshape(-1)
        keep = (
            int(
                torch.maximum(
                    self.base_attention_mask[idx].sum(-1), self.source_attention_mask[idx].sum(-1)
                ).max()
            )
            if len(idx)
            else 0
        )
        pick = lambda xs: [xs[i] for i in idx.tolist()] if xs else []
        return replace(
            self,
            base_tokens=self.base_tokens[idx, :keep],
            source_tokens=self.source_tokens[idx, :keep],
            base_attention_mask=self.base_attention_mask[idx, :keep],
            source_attention_mask=self.source_attention_mask[idx, :keep],
            base_positions={k: v[idx] for k, v in self.base_positions.items()},
            source_positions={k: v[idx] for k, v in self.source_positions.items()},
            targets=self.targets[idx],
            base_prompts=pick(self.base_prompts),
            source_prompts=pick(self.source_prompts),
            meta=pick(self.meta),
        )

    def split(
        self, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
    ) -> tuple[Desideratum, ...]:
        """Disjoint random parts (train/val/test by default), each with its own positions."""
        if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {tuple(fractions)}")
        n = len(self)
        sizes = [int(f * n) for f in fractions]
        for j in range(n - sum(sizes)):  # hand out the rounding remainder, largest share first
            sizes[sorted(range(len(sizes)), key=lambda k: -fractions[k])[j % len(sizes)]] += 1
        if min(sizes) < 1:
            raise ValueError(
                f"{n} examples cannot be split into {tuple(fractions)} with none empty"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
        return tuple(self.subset(order[a:b]) for a, b in itertools.pairwise(bounds))

    @classmethod
    def from_examples(
        cls,
        model: Any,
        base: Sequence[str],
        source: Sequence[str],
        targets: Sequence[str],
        positions: PositionSpec | None = None,
        *,
        source_positions: PositionSpec | None = None,
        name: str = "custom",
    ) -> Desideratum:
        """A desideratum from your own base/source prompts and one-token target strings.

        ``positions`` maps names to one int (negative counts back from END) or one word per
        example, found in the base prompts; ``source_positions`` (default: the same spec)
        is found in the source prompts. END is always each prompt's last real token. A base
        and its source must tokenise to the same length.
        """
        what = f"Desideratum.from_examples({name!r})"
        n = len(base)
        if n == 0 or len(source) != n or len(targets) != n:
            raise ValueError(
                f"{what}: need as many base prompts, source prompts and targets, "
                f"at least one; got {n}, {len(source)}, {len(targets)}"
            )
        vocab = Vocab.of(model)
        enc_b = [vocab.encode(p) for p in base]
        enc_s = [vocab.encode(p) for p in source]
        for i, ((b, _), (s, _)) in enumerate(zip(enc_b, enc_s)):
            if len(b) != len(s):
                raise ValueError(
                    f"{what}: example {i}: base and source tokenise to different lengths "
                    f"({len(b)} vs {len(s)}).\n  base:   {vocab.str_tokens(b)}\n"
                    f"  source: {vocab.str_tokens(s)}"
                )
        pos_b = resolve_positions(vocab, base, enc_b, positions, what)
        pos_s = resolve_positions(vocab, source, enc_s, source_positions or positions, what)
        target_ids = single_token_ids(vocab, list(targets), "target", what)
        if target_ids.dim() != 1:
            raise ValueError(f"{what}: give one target string per example")
        return _assemble(
            name,
            vocab,
            [b for b, _ in enc_b],
            [s for s, _ in enc_s],
            pos_b,
            pos_s,
            target_ids,
            list(base),
            list(source),
            [{"target": t} for t in targets],
        )


def _assemble(
    name: str,
    vocab: Vocab,
    base_rows: Sequence[list[int]],
    source_rows: Sequence[list[int]],
    pos_b: Sequence[dict[str, int]],
    pos_s: Sequence[dict[str, int]],
    targets: Int[torch.Tensor, " batch"],
    base_prompts: list[str],
    source_prompts: list[str],
    meta: list[dict[str, Any]],
) -> Desideratum:
    """Pad base and source rows to one width (so one index addresses both) and build it."""
    width = max(len(r) for r in list(base_rows) + list(source_rows))
    bt, bm = pad_rows(base_rows, vocab.pad_id, width)
    st, sm = pad_rows(source_rows, vocab.pad_id, width)
    return Desideratum(
        name,
        bt,
        st,
        bm,
        sm,
        stack_positions(pos_b),
        stack_positions(pos_s),
        targets,
        base_prompts,
        source_prompts,
        meta,
    )


def desiderata(
    model: Any, n: int, seed: int = 0, n_boxes: int = 7, split: str = "all"
) -> dict[str, Desideratum]:
    """The three boxes-task desiderata, ``n`` examples each: positional, object_value, label_value.

    ``split`` ("all", "train", "test") picks objects and labels as ``entity_tracking`` does.

    Each target differs from the base answer. Where the word lists allow, the source's objects
    are not in the base context and (positional, object_value) its query label is in no base
    box, so the three desiderata predict three different tokens.
    """
    check_n(n, "desiderata")
    bv = BoxVocab.of(model, n_boxes, "desiderata", split)
    out = {}
    for kind in KINDS:
        # Each desideratum draws from its own stream, so one's examples never shift another's.
        rng = random.Random(f"{seed}/{kind}")
        pairs = [_pair(kind, bv, rng, n_boxes) for _ in range(n)]
        out[kind] = _assemble(
            kind,
            bv.vocab,
            [b.ids for b, _, _ in pairs],
            [s.ids for _, s, _ in pairs],
            [b.positions for b, _, _ in pairs],
            [s.positions for _, s, _ in pairs],
            torch.tensor([bv.objects[t] for _, _, t in pairs], dtype=torch.long),
            [b.text for b, _, _ in pairs],
            [s.text for _, s, _ in pairs],
            [_meta(b, s, t) for b, s, t in pairs],
        )
    return out


def _pair(
    kind: str, bv: BoxVocab, rng: random.Random, n_boxes: int
) -> tuple[BoxPrompt, BoxPrompt, str]:
    """One (base, source, target object) for ``kind``."""
    objs, labs = bv.sample(rng, n_boxes)
    qb = rng.randrange(n_boxes)
    base = box_prompt(bv, objs, labs, labs[qb])
    src_objs, src_labs = bv.sample(rng, n_boxes, avoid_objects=tuple(objs))
    if kind == "label_value":
        # k: the base box whose label the source asks about, never the base's own query.
        k = rng.choice([j for j in range(n_boxes) if j != qb])
        # The source asks at another index, so position alone cannot give the target.
        others = [j for j in range(n_boxes) if j not in (k, qb)]
        qs = rng.choice(others or [j for j in range(n_boxes) if j != k])
        src_labs = [lb for lb in src_labs if lb != labs[k]][: n_boxes - 1]
        src_labs.insert(qs, labs[k])
        target = objs[k]
    else:
        qs = rng.choice([j for j in range(n_boxes) if j != qb])
        # The source's query label is in no base box, so a label-value reading has no target.
        outside = [
            lb
            for lb in sorted(bv.labels)
            if lb not in labs and lb not in src_labs[:qs] + src_labs[qs + 1 :]
        ]
        src_labs[qs] = rng.choice(outside) if outside else src_labs[qs]
        target = objs[qs] if kind == "positional" else src_objs[qs]
    source = box_prompt(bv, src_objs, src_labs, src_labs[qs])
    return base, source, target


def _answer(p: BoxPrompt) -> str:
    if p.query_index is None:
        raise ValueError(f"query label {p.query_label!r} is in no box: the prompt has no answer")
    return p.objects[p.query_index]


def _meta(base: BoxPrompt, source: BoxPrompt, target: str) -> dict[str, Any]:
    return {
        "base_objects": base.objects,
        "base_labels": base.labels,
        "base_query_index": base.query_index,
        "base_answer": _answer(base),
        "source_objects": source.objects,
        "source_labels": source.labels,
        "source_query_index": source.query_index,
        "source_answer": _answer(source),
        "target": target,
    }
