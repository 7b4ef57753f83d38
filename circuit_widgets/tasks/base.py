"""The Task: tokenised clean/corrupt prompt pairs with answers, key positions and a metric."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int

from circuit_widgets.tasks._tokenize import (
    PositionSpec,
    Vocab,
    pad_rows,
    resolve_positions,
    single_token_ids,
    stack_positions,
    token_kind,
)
from circuit_widgets.types import Stage

METRICS = ("logit_diff", "accuracy", "candidate_accuracy", "prob")


@dataclass(frozen=True, eq=False)
class Task:
    """A batch of clean/corrupt prompt pairs, right-padded to one length.

    Clean and corrupt prompts of one example have the same length and the same named key
    positions, so ``positions`` serves both. Padding is on the right: under causal
    attention no real token sees a pad, and every read goes through ``positions["END"]``,
    never position -1.
    """

    name: str
    clean_tokens: Int[torch.Tensor, "batch pos"]
    corrupt_tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    answers: Int[torch.Tensor, " batch *k"]
    wrong_answers: Int[torch.Tensor, " batch *k"]
    positions: dict[str, Int[torch.Tensor, " batch"]]
    metric_name: str = "logit_diff"
    clean_prompts: list[str] = field(default_factory=list)
    corrupt_prompts: list[str] = field(default_factory=list)
    # Per-example facts a generator knows (names, objects, box labels...), for display.
    meta: list[dict[str, Any]] = field(default_factory=list)
    # Extra per-example position sets, e.g. the incorrect colour tokens: name -> [batch, k].
    position_sets: dict[str, Int[torch.Tensor, "batch k"]] = field(default_factory=dict)
    # The circuit_pipeline stages this kind of prompt is known to need (empty = the default).
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        b, p = self.clean_tokens.shape
        if self.corrupt_tokens.shape != (b, p) or self.attention_mask.shape != (b, p):
            raise ValueError(
                f"clean_tokens {tuple(self.clean_tokens.shape)}, corrupt_tokens "
                f"{tuple(self.corrupt_tokens.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must have one shape"
            )
        for label, ids in (("answers", self.answers), ("wrong_answers", self.wrong_answers)):
            if ids.shape[0] != b or ids.dim() not in (1, 2):
                raise ValueError(f"{label} must be [batch] or [batch, k], got {tuple(ids.shape)}")
        if "END" not in self.positions:
            raise ValueError("a Task needs an 'END' position (where the answer is read)")
        for name, pos in self.positions.items():
            if pos.shape != (b,):
                raise ValueError(f"position {name!r} must be [batch], got {tuple(pos.shape)}")
            if (pos < 0).any() or (pos >= self.lengths).any():
                bad = int(((pos < 0) | (pos >= self.lengths)).nonzero()[0, 0])
                raise ValueError(
                    f"position {name!r} of example {bad} is {int(pos[bad])}, outside its "
                    f"{int(self.lengths[bad])} real tokens"
                )
        if self.metric_name not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric_name!r}")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pairs(
        cls,
        model: Any,
        clean: Sequence[str],
        corrupt: Sequence[str],
        answers: Sequence[str | Sequence[str]],
        wrong_answers: Sequence[str | Sequence[str]],
        *,
        positions: PositionSpec | None = None,
        metric: str = "logit_diff",
        name: str = "custom",
        stages: Sequence[Stage] = (),
        warn_spacing: bool = True,
    ) -> Task:
        """A Task from your own prompt pairs, tokenised as ``model.to_tokens`` would.

        ``model`` is a TransformerBridge or a bare tokenizer. Each answer / wrong answer is a
        string (or a list of k strings) that must be ONE token, leading space included
        (" Paris"). ``positions`` maps names to one int per example (negative counts back
        from the last real token) or one word per example (its first whole-word occurrence in
        the clean prompt; the token holding its last character). END is always the last real
        token. Clean and corrupt prompts of one example must tokenise to the same length
        with the same kind of token at each named position, else a ValueError shows both.
        ``stages``: the circuit_pipeline stages for such prompts (IOI's: ``tasks.ioi.STAGES``).
        A word answer without its leading space after a prompt ending in a word ("... to",
        "Mary") warns, naming the spaced token the model would predict; ``warn_spacing=False``
        silences it.
        """
        what = f"Task.from_pairs({name!r})"
        for label, seq in (
            ("clean", clean),
            ("corrupt", corrupt),
            ("answers", answers),
            ("wrong_answers", wrong_answers),
        ):
            if isinstance(seq, str) or not isinstance(seq, Sequence):
                raise TypeError(
                    f"{what}: {label} must be a list with one entry per example, got {seq!r}"
                )
        n = len(clean)
        if n == 0:
            raise ValueError(f"{what}: no examples given")
        lengths = {
            "corrupt": len(corrupt),
            "answers": len(answers),
            "wrong_answers": len(wrong_answers),
        }
        if any(v != n for v in lengths.values()):
            raise ValueError(
                f"{what}: {n} clean prompts but {lengths}; give one of each per example"
            )
        vocab = Vocab.of(model)
        enc_clean = [vocab.encode(p) for p in clean]
        enc_corrupt = [vocab.encode(p) for p in corrupt]
        rows_clean = [ids for ids, _ in enc_clean]
        rows_corrupt = [ids for ids, _ in enc_corrupt]
        pos = resolve_positions(vocab, clean, enc_clean, positions, what)
        for i, (c, k) in enumerate(zip(rows_clean, rows_corrupt)):
            if len(c) != len(k):
                break  # assemble_task reports it with both token lists
            for pname, p in pos[i].items():
                a, b = vocab.str_tokens([c[p], k[p]])
                if token_kind(a) != token_kind(b):
                    raise ValueError(
                        f"{what}: example {i}: position {pname!r} ({p}) holds {a!r} in the clean "
                        f"prompt but {b!r} in the corrupt one, so the key positions do not line up.\n"
                        f"  clean:   {vocab.str_tokens(c)}\n  corrupt: {vocab.str_tokens(k)}"
                    )
        if warn_spacing:
            _warn_unspaced(vocab, clean, answers, wrong_answers, what)
        return assemble_task(
            name,
            vocab,
            rows_clean,
            rows_corrupt,
            pos,
            single_token_ids(vocab, answers, "answer", what),
            single_token_ids(vocab, wrong_answers, "wrong answer", what),
            metric=metric,
            clean_prompts=clean,
            corrupt_prompts=corrupt,
            meta=[{"answer": a, "wrong_answer": w} for a, w in zip(answers, wrong_answers)],
            stages=stages,
        )

    # ------------------------------------------------------------------ shape facts

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        """Real (unpadded) length of each example."""
        return self.attention_mask.sum(-1)

    @property
    def seq_len(self) -> int:
        return self.clean_tokens.shape[1]

    @property
    def position_names(self) -> list[str]:
        return list(self.positions)

    def position(self, name: str) -> Int[torch.Tensor, " batch"]:
        """The per-example index of a named position, with an error listing valid names."""
        try:
            return self.positions[name]
        except KeyError:
            raise ValueError(
                f"task {self.name!r} has no position {name!r}; it has {sorted(self.positions)}"
            ) from None

    # ------------------------------------------------------------------ metrics

    def final_logits(
        self, logits: Float[torch.Tensor, "batch pos vocab"]
    ) -> Float[torch.Tensor, "batch vocab"]:
        """Logits at each example's END position (accepts [batch, vocab] as already final)."""
        if logits.dim() == 2:
            return logits
        end = self.positions["END"].to(logits.device)
        return logits[torch.arange(logits.shape[0], device=logits.device), end]

    def _gather(self, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(final.device)
        ids2 = ids if ids.dim() == 2 else ids[:, None]
        return final.gather(1, ids2)

    def logit_diff(self, logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        """Answer logit minus wrong-answer logit at END (means over several of either)."""
        final = self.final_logits(logits)
        return self._gather(final, self.answers).mean(1) - self._gather(
            final, self.wrong_answers
        ).mean(1)

    def accuracy(self, logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        """1.0 where the argmax over the whole vocabulary is an answer token."""
        top = self.final_logits(logits).argmax(-1, keepdim=True)
        ans = self.answers.to(top.device)
        ans = ans if ans.dim() == 2 else ans[:, None]
        return (top == ans).any(-1).float()

    def candidate_accuracy(self, logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        """1.0 where an answer beats every wrong answer (argmax among the candidates)."""
        final = self.final_logits(logits)
        return (
            self._gather(final, self.answers).max(1).values
            > self._gather(final, self.wrong_answers).max(1).values
        ).float()

    def prob(self, logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        """Probability of the answer (summed over answer tokens) at END."""
        probs = self.final_logits(logits).float().softmax(-1)
        return self._gather(probs, self.answers).sum(1)

    def metric(self, logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        """The task's own metric, per example."""
        return getattr(self, self.metric_name)(logits)

    # ------------------------------------------------------------------ derived tasks

    def to(self, device: str | torch.device) -> Task:
        """The same task with every tensor on ``device`` (generators build on the CPU)."""
        return replace(
            self,
            clean_tokens=self.clean_tokens.to(device),
            corrupt_tokens=self.corrupt_tokens.to(device),
            attention_mask=self.attention_mask.to(device),
            answers=self.answers.to(device),
            wrong_answers=self.wrong_answers.to(device),
            positions={k: v.to(device) for k, v in self.positions.items()},
            position_sets={k: v.to(device) for k, v in self.position_sets.items()},
        )

    def with_metric(self, metric_name: str) -> Task:
        return replace(self, metric_name=metric_name)

    def subset(self, index: Sequence[int] | slice | torch.Tensor) -> Task:
        """The examples at ``index``, trimmed of padding no remaining example needs."""
        idx = torch.arange(len(self))[index] if not isinstance(index, torch.Tensor) else index
        idx = idx.reshape(-1)
        keep = int(self.attention_mask[idx].sum(-1).max()) if len(idx) else 0
        pick = lambda xs: [xs[i] for i in idx.tolist()] if xs else []
        return replace(
            self,
            clean_tokens=self.clean_tokens[idx, :keep],
            corrupt_tokens=self.corrupt_tokens[idx, :keep],
            attention_mask=self.attention_mask[idx, :keep],
            answers=self.answers[idx],
            wrong_answers=self.wrong_answers[idx],
            positions={k: v[idx] for k, v in self.positions.items()},
            position_sets={k: v[idx] for k, v in self.position_sets.items()},
            clean_prompts=pick(self.clean_prompts),
            corrupt_prompts=pick(self.corrupt_prompts),
            meta=pick(self.meta),
        )


def assemble_task(
    name: str,
    vocab: Vocab,
    clean_rows: Sequence[list[int]],
    corrupt_rows: Sequence[list[int]],
    positions: Sequence[Mapping[str, int]],
    answers: Int[torch.Tensor, " batch *k"],
    wrong_answers: Int[torch.Tensor, " batch *k"],
    *,
    metric: str,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    meta: Sequence[dict[str, Any]] | None = None,
    position_sets: Mapping[str, Sequence[Sequence[int]]] | None = None,
    stages: Sequence[Stage] = (),
) -> Task:
    """Right-pad the rows and build the Task; clean and corrupt rows must pair up in length."""
    for i, (c, k) in enumerate(zip(clean_rows, corrupt_rows, strict=True)):
        if len(c) != len(k):
            raise ValueError(
                f"{name}: example {i}: clean and corrupt prompts tokenise to different lengths "
                f"({len(c)} vs {len(k)}), so their key positions do not line up.\n"
                f"  clean:   {vocab.str_tokens(c)}\n  corrupt: {vocab.str_tokens(k)}"
            )
    clean, mask = pad_rows(clean_rows, vocab.pad_id)
    corrupt, _ = pad_rows(corrupt_rows, vocab.pad_id)
    sets = {
        k: torch.tensor([list(r) for r in v], dtype=torch.long)
        for k, v in (position_sets or {}).items()
    }
    return Task(
        name=name,
        clean_tokens=clean,
        corrupt_tokens=corrupt,
        attention_mask=mask,
        answers=answers,
        wrong_answers=wrong_answers,
        positions=stack_positions(positions),
        metric_name=metric,
        clean_prompts=list(clean_prompts),
        corrupt_prompts=list(corrupt_prompts),
        meta=list(meta) if meta is not None else [{} for _ in clean_rows],
        position_sets=sets,
        stages=tuple(stages),
    )


def _warn_unspaced(
    vocab: Vocab,
    clean: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    wrong_answers: Sequence[str | Sequence[str]],
    what: str,
) -> None:
    """Warn about a word answered without its leading space after a prompt that ends in a
    non-space: the model predicts " Mary" there, and the unspaced "Mary" is another token."""
    found: dict[str, tuple[int, int]] = {}
    for prompt, *values in zip(clean, answers, wrong_answers):
        if not prompt or prompt[-1].isspace():
            continue  # after a space or newline the unspaced word is the usual continuation
        for value in values:
            for text in [value] if isinstance(value, str) else value:
                if text in found or not isinstance(text, str) or not text[:1].isalpha():
                    continue
                spaced, bare = vocab.single_token(" " + text), vocab.single_token(text)
                if spaced is not None and bare is not None:
                    found[text] = (bare, spaced)
    if found:
        listed = "; ".join(
            f"{t!r} (id {bare}) is used where the text goes on with {' ' + t!r} (one token, id {spaced})"
            for t, (bare, spaced) in found.items()
        )
        warnings.warn(
            f"{what}: answers without their leading space after a prompt ending in a word: "
            f"{listed}. Pass the spaced strings, or warn_spacing=False if the unspaced "
            "tokens are meant.",
            UserWarning,
            stacklevel=3,
        )
