"""The shared vocabulary: heads, receivers, enums and circuits (set algebra, JSON, grids)."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets.types import Circuit, CircuitGroup, Component, Head, Receiver, ReceiverInput


def test_head_parse_forms_and_errors():
    assert Head.parse("3.1") == Head.parse("L3H1") == Head.parse((3, 1)) == Head(3, 1)
    assert str(Head(10, 2)) == "10.2"
    with pytest.raises(ValueError, match="cannot read a head"):
        Head.parse("three.one")
    with pytest.raises(ValueError, match=">= 0"):
        Head(-1, 0)
    with pytest.raises(TypeError):
        Head(1.5, 0)


def test_receiver_and_component_coercion():
    assert Receiver(2, 1, "K").input is ReceiverInput.K
    assert Component.coerce("Z") is Component.Z and Component.coerce("attn_out").per_head is False
    assert Component.K.per_kv_head and not Component.Q.per_kv_head
    with pytest.raises(ValueError, match="'z', 'q'"):
        Component.coerce("zz")
    with pytest.raises(ValueError):
        Receiver(1, 0, "o")


def test_from_grid_top_k_top_frac_threshold_and_nan():
    values = torch.tensor([[0.1, -0.9, float("nan")], [0.5, 0.0, 0.3]])
    assert set(Circuit.from_grid(values, top_k=2).heads) == {Head(0, 1), Head(1, 0)}
    assert set(Circuit.from_grid(values, top_k=1, sign="positive").heads) == {Head(1, 0)}
    assert set(Circuit.from_grid(values, threshold=0.3).heads) == {
        Head(0, 1),
        Head(1, 0),
        Head(1, 2),
    }
    # 2% of 6 heads rounds to 0 -> at least one head
    assert len(Circuit.from_grid(values, top_frac=0.02)) == 1
    # NaN cells never enter, even when k exceeds the finite cells
    assert Head(0, 2) not in Circuit.from_grid(values, top_k=6)
    assert len(Circuit.from_grid(values, top_k=6)) == 5
    with pytest.raises(ValueError, match="exactly one"):
        Circuit.from_grid(values, top_k=1, threshold=0.1)


def test_from_grid_reads_a_result_object():
    class Grid:
        values = torch.zeros(2, 2).index_put_(
            (torch.tensor([1]), torch.tensor([1])), torch.tensor(2.0)
        )

    assert list(Circuit.from_grid(Grid(), top_k=1, position="END")) == [Head(1, 1)]
    assert Circuit.from_grid(Grid(), top_k=1, position="END").groups[0].position == "END"


def test_set_operations_keep_groups():
    a = Circuit.from_groups({"A": ["1.0", "2.0"], "B": ["0.1"]}, positions={"A": "END", "B": "S2"})
    b = Circuit.from_groups({"A": ["2.0", "3.3"]}, positions={"A": "END"})
    assert set((a | b).heads) == {Head(1, 0), Head(2, 0), Head(3, 3), Head(0, 1)}
    assert set((a & b).heads) == {Head(2, 0)} and (a & b).group("A").position == "END"
    assert set((a - b).heads) == {Head(1, 0), Head(0, 1)}
    assert "1.0" in a and (3, 3) not in a and len(a) == 3


def test_json_round_trip():
    c = Circuit.from_groups(
        {"A": ["1.0", "2.0"], "C": [(0, 3)]}, positions={"A": "END", "C": "query_label"}, name="et"
    )
    assert Circuit.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="not a circuit"):
        Circuit.from_json('{"groups": [{"heads": [[1]]}]}')


def test_validate_names_the_problem():
    c = Circuit((CircuitGroup("A", frozenset({Head(5, 0)}), "END"),))
    with pytest.raises(
        ValueError, match=r"head 5.0 of group 'A' is outside the model \(layers 0-1"
    ):
        c.validate(n_layers=2, n_heads=4)
    ok = Circuit((CircuitGroup("A", frozenset({Head(1, 0)}), "query_label"),))
    with pytest.raises(ValueError, match="position 'query_label'.*lacks"):
        ok.validate(2, 4, position_names=["END", "IO"])
    ok.validate(2, 4, position_names=["query_label"])  # no error


def test_duplicate_group_names_rejected():
    g = CircuitGroup("A", frozenset({Head(0, 0)}))
    with pytest.raises(ValueError, match="unique"):
        Circuit((g, g))


def test_head_parse_needs_integer_parts():
    import numpy as np

    for bad in ((1.7, 2.9), (1, 2.0), (True, 1)):
        with pytest.raises(ValueError, match="parts must be integers"):
            Head.parse(bad)
    assert Head.parse((np.int64(1), torch.tensor(2))) == Head(1, 2)


def test_parse_many_reads_a_tuple_of_heads_as_several():
    assert Head.parse_many(((1, 2), (0, 1))) == [Head(1, 2), Head(0, 1)]
    assert Head.parse_many(("1.2", Head(0, 1))) == [Head(1, 2), Head(0, 1)]
    assert (
        Head.parse_many((1, 2))
        == Head.parse_many("1.2")
        == Head.parse_many(Head(1, 2))
        == [Head(1, 2)]
    )
    assert Head.parse_many([(3, 0)]) == [Head(3, 0)]
    with pytest.raises(ValueError, match="parts must be integers"):
        Head.parse_many((1.7, 2.9))
    with pytest.raises(ValueError, match="cannot read heads from 3"):
        Head.parse_many(3)


def test_from_grid_ranks_a_head_grid_by_its_normalized_effect():
    from circuit_widgets.core.results import HeadGrid

    # Noise patching lowers the metric (gap = corrupt - clean = -2): important heads have
    # negative values and positive normalized effects.
    per_example = torch.tensor([[[-1.8, 0.2], [0.1, -0.4]], [[-1.8, 0.2], [0.1, -0.4]]])
    values = per_example.mean(0)
    clean, corrupt = torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0])
    grid = HeadGrid(
        values=values,
        normalized=values / -2.0,
        per_example=per_example,
        metric_clean=clean,
        metric_corrupt=corrupt,
        done=torch.ones(2, 2, dtype=torch.bool),
        complete=True,
        layers=[0, 1],
        heads=["0", "1"],
        positions=None,
        component="z",
        direction="noise",
        kind="path",
        metric_name="logit_diff",
        position="END",
    )
    pos = Circuit.from_grid(grid, top_k=1, sign="positive")
    assert list(pos) == [Head(0, 0)] and pos.groups[0].position == "END"
    assert list(Circuit.from_grid(grid, top_k=1, sign="negative")) == [Head(0, 1)]
    assert Circuit.from_grid(grid, top_k=1, position=None).groups[0].position is None
    assert Circuit.from_grid(grid, top_k=1, position="S").groups[0].position == "S"
    # A tensor is ranked as it is; an undefined normalized falls back to the values.
    assert list(Circuit.from_grid(grid.values, top_k=1, sign="positive")) == [Head(0, 1)]
    flat = HeadGrid(
        **{**grid.__dict__, "normalized": torch.full((2, 2), float("nan")), "position": "all"}
    )
    picked = Circuit.from_grid(flat, top_k=1, sign="positive")
    assert list(picked) == [Head(0, 1)] and picked.groups[0].position is None


def test_union_refuses_a_group_at_two_positions():
    a = Circuit.from_groups({"A": ["1.0"], "B": ["0.1"]}, positions={"A": "END", "B": "S2"})
    b = Circuit.from_groups({"A": ["2.0"]}, positions={"A": "S2"})
    with pytest.raises(
        ValueError, match=r"group 'A' acts at position 'END' in one circuit and 'S2' in the other"
    ):
        a | b
    # Intersection and difference keep only the left circuit's heads: its positions stand.
    assert (a - b).group("A").position == "END" and (a & b).heads == frozenset()
    same = Circuit.from_groups({"A": ["2.0"]}, positions={"A": "END"})
    assert (a | same).group("A").heads == {Head(1, 0), Head(2, 0)}


def test_circuit_parse_reads_what_a_widget_is_given():
    grouped = Circuit.from_groups({"A": [(1, 0)]}, positions={"A": "END"})
    assert Circuit.parse(None) == Circuit()
    assert Circuit.parse(grouped) is grouped
    assert Circuit.parse({"A": [(1, 0)], "B": ["0.1"]}) == Circuit.from_groups(
        {"A": [Head(1, 0)], "B": [Head(0, 1)]}
    )
    assert Circuit.parse([[1, 2], "0.1", (3, 0)]).heads == {Head(1, 2), Head(0, 1), Head(3, 0)}
    with pytest.raises(ValueError, match="cannot read a head"):
        Circuit.parse(["x"])
