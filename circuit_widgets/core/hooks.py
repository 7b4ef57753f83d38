"""Component -> bridge hook names, and the grouped-query mapping between query and kv heads."""

from __future__ import annotations

from circuit_widgets.types import Component, ModelShape

_HOOKS = {
    Component.Z: "blocks.{l}.attn.hook_z",
    Component.Q: "blocks.{l}.attn.hook_q",
    Component.K: "blocks.{l}.attn.hook_k",
    Component.V: "blocks.{l}.attn.hook_v",
    Component.PATTERN: "blocks.{l}.attn.hook_pattern",
    Component.ATTN_OUT: "blocks.{l}.hook_attn_out",
    Component.MLP_OUT: "blocks.{l}.hook_mlp_out",
    Component.RESID_PRE: "blocks.{l}.hook_resid_pre",
}


def hook_name(component: Component, layer: int) -> str:
    """The bridge hook carrying ``component`` at ``layer``."""
    return _HOOKS[Component.coerce(component)].format(l=layer)


def n_columns(component: Component, shape: ModelShape) -> int:
    """Grid columns: query heads, key/value heads (k, v) or 1 (per-layer components)."""
    if component.per_kv_head:
        return shape.n_kv_heads
    return shape.n_heads if component.per_head else 1


def column_labels(component: Component, shape: ModelShape) -> list[str]:
    """'0'..'H-1' for query heads; 'kv1 (q3-5)' for shared kv heads; the name per layer."""
    if not component.per_head:
        return [component.value]
    if component.per_kv_head and shape.group_size > 1:
        out = []
        for g in range(shape.n_kv_heads):
            qs = shape.query_heads_of(g)
            out.append(f"kv{g} (q{qs[0]}-{qs[-1]})")
        return out
    return [str(h) for h in range(n_columns(component, shape))]


def kv_groups(shape: ModelShape) -> list[list[int]]:
    """kv_groups[g] = the query heads that read key/value head g."""
    return [shape.query_heads_of(g) for g in range(shape.n_kv_heads)]


def head_axis(component: Component) -> int | None:
    """Axis of the head dimension in the bridge's hook tensor (batch first), None per layer."""
    if component == Component.PATTERN:
        return 1  # [batch, head, q, k]
    return 2 if component.per_head else None  # [batch, pos, head, d_head]
