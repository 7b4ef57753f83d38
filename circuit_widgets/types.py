"""The shared vocabulary: heads, receivers and the enums every layer speaks.

Ground floor: imports nothing of ours, has no side effects at import time.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard

if TYPE_CHECKING:
    from torch import Tensor
    from typing_extensions import Self


class ModelLike(Protocol):
    """What the library needs of a model: a TransformerBridge, or another backend's wrapper
    with the same hook names (``cfg`` carries n_layers, n_heads, d_head, ...)."""

    cfg: Any

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Tensor: ...

    def parameters(self) -> Iterator[Any]: ...

    def named_parameters(self) -> Iterator[tuple[str, Any]]: ...

    @property
    def hook_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelShape:
    """The sizes every experiment needs, read from a bridge's config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def check_head(self, head: Head) -> Head:
        """``head`` if the model has it, else a ValueError naming the valid ranges."""
        if not (0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads):
            raise ValueError(
                f"head {head} is outside the model (layers 0-{self.n_layers - 1}, "
                f"heads 0-{self.n_heads - 1})"
            )
        return head

    def query_heads_of(self, kv_head: int) -> list[int]:
        g = self.group_size
        return list(range(kv_head * g, (kv_head + 1) * g))


ComponentName = Literal["z", "q", "k", "v", "pattern", "attn_out", "mlp_out", "resid_pre"]
DirectionName = Literal["denoise", "noise"]
GridKind = Literal["activation", "attribution", "path", "cmap"]
"""What produced a HeadGrid: activation or attribution patching, path patching, or CMAP."""


class _StrEnum(str, enum.Enum):
    """A str enum that accepts its value or name, case-insensitively, and says what is valid."""

    @classmethod
    def coerce(cls, value: str | _StrEnum) -> Self:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() in (member.value.lower(), member.name.lower()):
                    return member
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of {valid}")

    def __str__(self) -> str:
        return self.value


class Component(_StrEnum):
    """What gets patched. Per-head components are z/q/k/v/pattern; the rest are per layer."""

    _value_: ComponentName

    Z = "z"
    Q = "q"
    K = "k"
    V = "v"
    PATTERN = "pattern"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    RESID_PRE = "resid_pre"

    @property
    def per_head(self) -> bool:
        return self in (Component.Z, Component.Q, Component.K, Component.V, Component.PATTERN)

    @property
    def per_kv_head(self) -> bool:
        """k and v live on key/value heads, which grouped-query models share between query heads."""
        return self in (Component.K, Component.V)


class Direction(_StrEnum):
    """'denoise' patches clean activations into the corrupt run; 'noise' the reverse."""

    _value_: DirectionName

    DENOISE = "denoise"
    NOISE = "noise"


class ReceiverInput(_StrEnum):
    _value_: Literal["q", "k", "v"]

    Q = "q"
    K = "k"
    V = "v"


@dataclass(frozen=True, order=True)
class Head:
    """One attention (query) head."""

    layer: int
    head: int

    def __post_init__(self) -> None:
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Head.{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"Head.{name} must be >= 0, got {value}")

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"

    @classmethod
    def parse(cls, value: Head | str | tuple[int, int]) -> Head:
        """Accepts Head(3, 1), (3, 1), "3.1" or "L3H1"; a tuple's parts must be integers."""
        if isinstance(value, Head):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_integer(value[0], value), _integer(value[1], value))
        if isinstance(value, str):
            text = value.strip().upper()
            if text.startswith("L") and "H" in text:
                layer, head = text[1:].split("H", 1)
            else:
                layer, _, head = text.partition(".")
            try:
                return cls(int(layer), int(head))
            except ValueError:
                pass
        raise ValueError(
            f"cannot read a head from {value!r}; use Head(layer, head), (l, h) or 'l.h'"
        )

    @classmethod
    def parse_many(cls, value: Head | str | tuple[int, int] | Iterable) -> list[Head]:
        """One head (Head, "l.h", (l, h)) or a collection of them -> a list of Heads.

        A tuple is one head only when both its parts are scalars: ((1, 2), (0, 1)) and
        ("1.2", "0.1") are two heads each.
        """
        if isinstance(value, (Head, str)) or _is_pair(value):
            return [cls.parse(value)]
        try:
            items = list(value)
        except TypeError:
            raise ValueError(
                f"cannot read heads from {value!r}; use a head or a list of heads "
                f"(Head(layer, head), (l, h) or 'l.h')"
            ) from None
        return [cls.parse(v) for v in items]


def _is_pair(value: object) -> TypeGuard[tuple[int, int]]:
    """(l, h) with scalar parts, as opposed to a tuple of heads."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and not any(isinstance(v, (tuple, list, str, Head)) for v in value)
    )


def _integer(part: Any, value: object) -> int:
    """An int from an integer-like part; floats such as 1.7 are refused, never truncated."""
    if isinstance(part, bool):
        raise ValueError(f"cannot read a head from {value!r}: its parts must be integers")  # noqa: TRY004 - every input mistake is a ValueError
    try:
        return operator.index(part)
    except TypeError:
        raise ValueError(
            f"cannot read a head from {value!r}: its parts must be integers, got {part!r}"
        ) from None


@dataclass(frozen=True)
class Stage:
    """One path-patching stage: senders' z from the corrupt run at ``position`` and their
    effect on ``receivers`` ('logits', or the name of an earlier stage whose heads' ``inputs``
    — any of 'q', 'k', 'v', e.g. 'kv' — receive). The stage's heads act at ``position``."""

    name: str
    position: str = "END"
    receivers: str = "logits"
    inputs: str = "q"
    top_k: int | None = None
    top_frac: float | None = None

    def __post_init__(self) -> None:
        if not self.inputs or set(self.inputs) - set("qkv"):
            raise ValueError(
                f"stage {self.name!r}: inputs must be letters of 'qkv', got {self.inputs!r}"
            )


@dataclass(frozen=True, order=True)
class Receiver:
    """A head's query, key or value input, as the receiving end of a path."""

    layer: int
    head: int
    input: ReceiverInput = ReceiverInput.Q

    def __post_init__(self) -> None:
        Head(self.layer, self.head)  # same validation
        object.__setattr__(self, "input", ReceiverInput.coerce(self.input))

    @property
    def as_head(self) -> Head:
        return Head(self.layer, self.head)

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}.{self.input.value}"


class _GridPosition:
    """The default of ``Circuit.from_grid(position=...)``: the grid's own position."""

    def __repr__(self) -> str:
        return "<the grid's position>"


_FROM_GRID = _GridPosition()


@dataclass(frozen=True)
class CircuitGroup:
    """Heads that act together at one named position ("END", "query_label", ...; None = all)."""

    name: str
    heads: frozenset[Head]
    position: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", frozenset(Head.parse(h) for h in self.heads))


@dataclass(frozen=True)
class Circuit:
    """A set of heads, optionally split into named groups each acting at its own position.

    Set operations (|, &, -) work on heads; groups of the same name are merged.
    """

    groups: tuple[CircuitGroup, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"circuit group names must be unique, got {names}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_heads(
        cls, heads, *, position: str | None = None, name: str = "", group: str = "heads"
    ) -> Circuit:
        return cls((CircuitGroup(group, frozenset(Head.parse(h) for h in heads), position),), name)

    @classmethod
    def from_groups(cls, groups: dict, *, positions: dict | None = None, name: str = "") -> Circuit:
        """``{"A": [heads], ...}`` with ``positions={"A": "END", ...}``."""
        positions = positions or {}
        return cls(
            tuple(CircuitGroup(g, frozenset(hs), positions.get(g)) for g, hs in groups.items()),
            name,
        )

    @classmethod
    def parse(cls, value: Any) -> Circuit:
        """A Circuit from a Circuit, ``{"group": [heads]}``, a list of heads ([l, h] lists
        included) or None (the empty circuit)."""
        if value is None:
            return cls()
        if isinstance(value, Circuit):
            return value
        if isinstance(value, dict):
            return cls.from_groups(value)
        return cls.from_heads([Head.parse(tuple(h) if isinstance(h, list) else h) for h in value])

    @classmethod
    def from_grid(
        cls,
        grid,
        *,
        top_k: int | None = None,
        top_frac: float | None = None,
        threshold: float | None = None,
        sign: str = "abs",
        position: str | None | _GridPosition = _FROM_GRID,
        name: str = "",
        group: str = "heads",
    ) -> Circuit:
        """Heads of a [n_layers, n_heads] result: the top k, the top fraction, or score >= threshold.

        A result object (a HeadGrid) is ranked by its ``normalized`` effect, as the pipeline
        ranks it, so ``sign="positive"`` means the patch moves the metric toward the corrupt
        run (the head carries what the corruption destroys) and "negative" away from it; where
        ``normalized`` is undefined (all NaN: clean and corrupt metrics agree on average) its
        raw ``values`` are ranked instead. A plain tensor is ranked as it is. ``sign`` ranks by
        "abs", "positive" or "negative" scores; NaN cells never enter. The group acts at
        ``position``, by default the grid's own (None, every position, for an 'all' grid).
        """
        # Ranking reads tensors, so it lives with the grid (core/results.py), not down here.
        from circuit_widgets.core.results import rank_heads

        heads = rank_heads(grid, top_k=top_k, top_frac=top_frac, threshold=threshold, sign=sign)
        if isinstance(position, _GridPosition):
            at = getattr(grid, "position", None)
            position = None if at == "all" else at
        return cls.from_heads(heads, position=position, name=name, group=group)

    # ------------------------------------------------------------------ reading

    @property
    def heads(self) -> frozenset[Head]:
        return frozenset().union(*(g.heads for g in self.groups)) if self.groups else frozenset()

    def group(self, name: str) -> CircuitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise ValueError(f"circuit has no group {name!r}; it has {[g.name for g in self.groups]}")

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(sorted(self.heads))

    def __contains__(self, head) -> bool:
        return Head.parse(head) in self.heads

    def validate(self, n_layers: int, n_heads: int, position_names=None) -> None:
        """Raise ValueError if a head or a group's position does not exist in this model/task."""
        for g in self.groups:
            for h in sorted(g.heads):
                if h.layer >= n_layers or h.head >= n_heads:
                    raise ValueError(
                        f"head {h} of group {g.name!r} is outside the model "
                        f"(layers 0-{n_layers - 1}, heads 0-{n_heads - 1})"
                    )
            if (
                position_names is not None
                and g.position is not None
                and g.position not in position_names
            ):
                raise ValueError(
                    f"group {g.name!r} acts at position {g.position!r}, which the task lacks; "
                    f"it has {sorted(position_names)}"
                )

    # ------------------------------------------------------------------ set operations

    def _combine(self, other: Circuit, op, union: bool = False) -> Circuit:
        mine = {g.name: g for g in self.groups}
        theirs = {g.name: g for g in other.groups}
        out = []
        for name in list(mine) + [n for n in theirs if n not in mine]:
            a, b = mine.get(name), theirs.get(name)
            heads = op(
                a.heads if a else frozenset(),
                b.heads if b else frozenset(),
                self.heads,
                other.heads,
            )
            # & and - keep only this circuit's heads, so only a union needs the positions to agree.
            if union and a and b and a.position != b.position:
                raise ValueError(
                    f"group {name!r} acts at position {a.position!r} in one circuit and "
                    f"{b.position!r} in the other; rename one group or give both the same position"
                )
            either = a or b
            assert either is not None  # every name comes from one of the two circuits
            if heads:
                out.append(CircuitGroup(name, heads, either.position))
        return Circuit(tuple(out), self.name or other.name)

    def __or__(self, other: Circuit) -> Circuit:
        return self._combine(other, lambda a, b, A, B: a | b, union=True)

    def __and__(self, other: Circuit) -> Circuit:
        return self._combine(other, lambda a, b, A, B: a & B)

    def __sub__(self, other: Circuit) -> Circuit:
        return self._combine(other, lambda a, b, A, B: a - B)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "groups": [
                {
                    "name": g.name,
                    "position": g.position,
                    "heads": [[h.layer, h.head] for h in sorted(g.heads)],
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Circuit:
        try:
            groups = tuple(
                CircuitGroup(
                    g["name"],
                    frozenset(Head(int(l), int(h)) for l, h in g["heads"]),
                    g.get("position"),
                )
                for g in data["groups"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a circuit description: {exc}") from None
        return cls(groups, data.get("name", ""))

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        import json

        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        parts = [
            f"{g.name}@{g.position or 'all'}: {', '.join(str(h) for h in sorted(g.heads))}"
            for g in self.groups
            if g.heads
        ]
        body = "; ".join(parts) or "empty"  # one spelling for no heads, whatever the groups
        return f"Circuit({self.name + '; ' if self.name else ''}{body})"
