"""Tokenising prompts exactly as a model's bridge does, and finding named words in them.

Generators build a prompt piece by piece (``Prompt``), recording where each named word
starts; ``Vocab.encode_prompt`` tokenises the whole text once and maps those characters to
token indices through the tokenizer's offsets, checking each lands on the expected token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

PositionSpec = Mapping[str, Sequence[int] | Sequence[str]]


def check_n(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what}: n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"{what}: n must be >= 1, got {n}")


@dataclass(frozen=True)
class Vocab:
    """A tokenizer plus whether BOS is prepended, the one model fact that changes token ids."""

    tokenizer: Any
    prepend_bos: bool

    @classmethod
    def of(cls, model_or_tokenizer: Any) -> Vocab:
        """From a TransformerBridge (tokenizer, ``cfg.default_prepend_bos``) or a bare tokenizer."""
        if isinstance(model_or_tokenizer, Vocab):
            return model_or_tokenizer
        tok = getattr(model_or_tokenizer, "tokenizer", None)
        cfg = getattr(model_or_tokenizer, "cfg", None)
        if tok is not None and cfg is not None:
            prepend = bool(getattr(cfg, "default_prepend_bos", True))
            return cls(tok, prepend and tok.bos_token_id is not None)
        if callable(getattr(model_or_tokenizer, "convert_ids_to_tokens", None)):
            # A bare tokenizer: do what to_tokens does by default (BOS first, if there is one).
            return cls(model_or_tokenizer, model_or_tokenizer.bos_token_id is not None)
        raise TypeError(
            "expected a TransformerBridge (e.g. load_model('demo')) or a Hugging Face tokenizer, "
            f"got {type(model_or_tokenizer).__name__}"
        )

    @property
    def name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    @property
    def pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def ids(self, text: str) -> list[int]:
        """Token ids of a piece of text, with no special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def single_token(self, text: str) -> int | None:
        """The id of ``text`` if it is exactly one known token (no BOS, not unk), else None."""
        ids = self.ids(text)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return int(ids[0]) if len(ids) == 1 and ids[0] != unk else None

    def str_tokens(self, ids: Iterable[int]) -> list[str]:
        """Each token decoded alone, like ``model.to_str_tokens``."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids (BOS first where the model prepends it) and each token's character span."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise TypeError(
                f"tokenizer {self.name!r} cannot report character offsets; use a fast tokenizer"
            ) from None
        ids = [int(i) for i in enc["input_ids"]]
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        if self.prepend_bos:
            ids = [int(self.tokenizer.bos_token_id)] + ids
            offsets = [(0, 0)] + offsets
        return ids, offsets

    def single_words(
        self, words: Sequence[str], list_name: str, need: int, what: str
    ) -> dict[str, int]:
        """The words that are one token with a leading space, as word -> id; too few is an error."""
        kept = {w: tid for w in words if (tid := self.single_token(" " + w)) is not None}
        if len(kept) < need:
            raise ValueError(
                f"{what} needs at least {need} words from words.{list_name} that are one token "
                f"with a leading space, but tokenizer {self.name!r} keeps only {len(kept)} of "
                f"{len(words)}: {sorted(kept)}"
            )
        return kept

    def encode_prompt(
        self, prompt: Prompt, expect: Mapping[str, int] | None = None
    ) -> tuple[list[int], dict[str, int]]:
        """Token ids and the token index of every named word; END is the last token.

        ``expect`` maps word names to the token id they must be (a word that merges with its
        neighbours in context would otherwise give a silently wrong position).
        """
        ids, offsets = self.encode(prompt.text)
        positions: dict[str, int] = {}
        for slot, char in prompt.slots.items():
            i = _token_at(offsets, char)
            want = (expect or {}).get(slot)
            if i is None or (want is not None and ids[i] != want):
                raise ValueError(
                    f"in tokenizer {self.name!r}, the word {slot!r} of {prompt.text!r} is not a "
                    f"token of its own; the prompt tokenises as {self.str_tokens(ids)}"
                )
            positions[slot] = i
        positions["END"] = len(ids) - 1
        return ids, positions

    def find_word(
        self, text: str, ids: list[int], offsets: list[tuple[int, int]], word: str
    ) -> int:
        """The token holding the last character of ``word``'s first whole-word match in ``text``."""
        core = word.strip()
        pattern = (r"(?<![A-Za-z0-9])" if core[:1].isalnum() else "") + re.escape(core)
        pattern += r"(?![A-Za-z0-9])" if core[-1:].isalnum() else ""
        match = re.search(pattern, text) if core else None
        i = _token_at(offsets, match.end() - 1) if match else None
        if i is None:
            raise ValueError(
                f"word {word!r} not found in {text!r} (tokens: {self.str_tokens(ids)})"
            )
        return i


def _token_at(offsets: Sequence[tuple[int, int]], char: int) -> int | None:
    """The token whose character span covers ``char`` (zero-width tokens such as BOS never do)."""
    for i, (start, end) in enumerate(offsets):
        if start <= char < end:
            return i
    return None


class Prompt:
    """A prompt built piece by piece, remembering where each named word's first letter is."""

    def __init__(self) -> None:
        self.text = ""
        self.slots: dict[str, int] = {}

    def add(self, piece: str, slot: str | None = None) -> Prompt:
        if slot is not None:
            if slot in self.slots:
                raise ValueError(f"slot {slot!r} used twice")
            self.slots[slot] = len(self.text) + len(piece) - len(piece.lstrip())
        self.text += piece
        return self

    def add_template(
        self,
        template: str,
        fill: Callable[[str, int], tuple[str, str | None]],
        pattern: str = r"\{(\w+)\}",
    ) -> Prompt:
        """Append ``template``, its k-th ``field`` placeholder replaced by ``fill(field, k)``.

        ``fill`` returns (word, slot name or None).
        """
        seen: dict[str, int] = {}
        last = 0
        for m in re.finditer(pattern, template):
            self.add(template[last : m.start()])
            field = m.group(1)
            word, slot = fill(field, seen.get(field, 0))
            seen[field] = seen.get(field, 0) + 1
            self.add(word, slot)
            last = m.end()
        return self.add(template[last:])


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Right-pad token rows into one tensor, with an attention mask of 1 on real tokens."""
    width = max(max(len(r) for r in rows), width or 0)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[b, : len(row)] = 1
    return tokens, mask


def stack_positions(
    per_example: Sequence[Mapping[str, int]],
) -> dict[str, Int[torch.Tensor, " batch"]]:
    names = list(per_example[0])
    return {k: torch.tensor([p[k] for p in per_example], dtype=torch.long) for k in names}


def token_kind(text: str) -> str:
    """Coarse class of a decoded token: do two key positions hold the same kind of thing?"""
    core = text.strip()
    if any(ch.isalpha() for ch in core):
        return "word"
    if core.isdigit():
        return "number"
    return "punctuation" if core else "space"


def resolve_positions(
    vocab: Vocab,
    prompts: Sequence[str],
    encodings: Sequence[tuple[list[int], list[tuple[int, int]]]],
    spec: PositionSpec | None,
    what: str,
) -> list[dict[str, int]]:
    """Per-example named positions from ints (negative counts back from END) or words to find."""
    n = len(prompts)
    out: list[dict[str, int]] = [{} for _ in range(n)]
    for name, values in (spec or {}).items():
        if isinstance(values, (str, int)) or len(values) != n:
            raise ValueError(
                f"{what}: position {name!r} needs one int or word per example ({n}), got {values!r}"
            )
        for i, value in enumerate(values):
            ids, offsets = encodings[i]
            if isinstance(value, str):
                out[i][name] = vocab.find_word(prompts[i], ids, offsets, value)
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{what}: position {name!r} of example {i} must be int or str, got {value!r}"
                )
            index = value + len(ids) if value < 0 else value
            if not 0 <= index < len(ids):
                raise ValueError(
                    f"{what}: position {name!r} of example {i} is {value}, outside its "
                    f"{len(ids)} tokens {vocab.str_tokens(ids)}"
                )
            out[i][name] = index
    for i, (ids, _) in enumerate(encodings):
        out[i]["END"] = len(ids) - 1  # the last real token, whatever the user passed
    return out


def single_token_ids(
    vocab: Vocab, values: Sequence[str | Sequence[str]], label: str, what: str
) -> Int[torch.Tensor, " batch *k"]:
    """Answer strings -> ids, [batch] for one string per example or [batch, k] for lists of k."""
    as_lists = any(not isinstance(v, str) for v in values)
    rows: list[list[int]] = []
    for i, value in enumerate(values):
        items = [value] if isinstance(value, str) else list(value)
        if not items:
            raise ValueError(f"{what}: {label} of example {i} is empty; give at least one string")
        if as_lists and rows and len(items) != len(rows[0]):
            raise ValueError(
                f"{what}: {label} of example {i} has {len(items)} strings but example 0 has "
                f"{len(rows[0])}; every example needs the same number"
            )
        row = []
        for text in items:
            if not isinstance(text, str):
                raise TypeError(f"{what}: {label} of example {i} must be str, got {text!r}")
            tid = vocab.single_token(text)
            if tid is None:
                raise ValueError(
                    f"{what}: {label} {text!r} of example {i} is not one token in tokenizer "
                    f"{vocab.name!r}: it tokenises as {vocab.str_tokens(vocab.ids(text))}. "
                    "Use a single-token string (usually with its leading space, e.g. ' Paris')."
                )
            row.append(tid)
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.long)
    return ids if as_lists else ids[:, 0]
