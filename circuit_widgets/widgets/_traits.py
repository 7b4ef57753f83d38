"""Traits that carry their own validation and binary serialisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import traitlets


def array_to_json(value: np.ndarray | None, widget: Any = None) -> dict | None:
    """ndarray -> ``{view, dtype, shape}``; the view travels as a binary buffer, not as JSON."""
    if value is None:
        return None
    arr = np.ascontiguousarray(value)
    return {
        "view": arr.reshape(-1).data.cast("B"),
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
    }


def array_from_json(value: dict | None, widget: Any = None) -> np.ndarray | None:
    """``{view, dtype, shape}`` -> ndarray (a copy, so it owns its memory)."""
    if value is None:
        return None
    return np.frombuffer(value["view"], dtype=value["dtype"]).reshape(value["shape"]).copy()


def as_float32(value: Any) -> np.ndarray:
    """A torch tensor, ndarray or nested list as a C-contiguous float32 ndarray."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


class Float32Array(traitlets.TraitType):
    """A float32 ndarray of a fixed number of dimensions, synced as a binary buffer."""

    info_text = "a float32 array (numpy, torch or nested lists)"

    def __init__(self, ndim: int, *, allow_none: bool = False, **kwargs: Any) -> None:
        self.ndim = ndim
        default = None if allow_none else np.zeros((0,) * ndim, dtype=np.float32)
        super().__init__(default_value=default, allow_none=allow_none, **kwargs)
        self.tag(to_json=array_to_json, from_json=array_from_json)

    def validate(self, obj: Any, value: Any) -> np.ndarray | None:
        if value is None and self.allow_none:
            return None
        try:
            arr = as_float32(value)
        except (TypeError, ValueError) as exc:
            raise traitlets.TraitError(f"{self.name} must be {self.info_text}: {exc}") from None
        if arr.ndim != self.ndim:
            raise traitlets.TraitError(
                f"{self.name} must have {self.ndim} dimensions, got shape {tuple(arr.shape)}"
            )
        return arr
