"""The shared vocabulary: heads, receivers and the enums every layer speaks.

Ground floor: imports nothing of ours, has no side effects at import time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class _StrEnum(str, enum.Enum):
    """A str enum that accepts its value or name, case-insensitively, and says what is valid."""

    @classmethod
    def coerce(cls, value: "str | _StrEnum") -> "_StrEnum":
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

    DENOISE = "denoise"
    NOISE = "noise"


class ReceiverInput(_StrEnum):
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
    def parse(cls, value: "Head | str | tuple[int, int]") -> "Head":
        """Accepts Head(3, 1), (3, 1), "3.1" or "L3H1"."""
        if isinstance(value, Head):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(int(value[0]), int(value[1]))
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
        raise ValueError(f"cannot read a head from {value!r}; use Head(layer, head), (l, h) or 'l.h'")


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
