"""Task.from_pairs: the user's own prompt pairs, their positions and every way they can be wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoTokenizer

from circuit_widgets.models import cache_dir, tiny_tokenizer
from circuit_widgets.tasks import Task

CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Alice and David had a long argument, and afterwards David said to",
]
CORRUPT = [
    "When Mary and John went to the store, Mary gave a drink to",
    "Then, Alice and David had a long argument, and afterwards Alice said to",
]


@pytest.fixture(scope="module")
def demo_tokenizer():
    folders = sorted((cache_dir() / "models").glob("smollm2-135m-instruct-*"))
    if not folders:
        pytest.skip("demo model not cached yet: run load_model('demo') once")
    return AutoTokenizer.from_pretrained(folders[0])


def test_from_pairs_tokenises_like_to_tokens_and_finds_positions(tiny_gpt2):
    task = Task.from_pairs(
        tiny_gpt2,
        CLEAN,
        CORRUPT,
        [" Mary", " Alice"],
        [" John", " David"],
        positions={"IO": ["Mary", "Alice"], "S2": [10, -3], "S1": [" John", "David"]},
    )
    tok = tiny_gpt2.tokenizer
    assert task.name == "custom" and task.metric_name == "logit_diff"
    assert task.lengths.tolist() == [15, 16]  # mixed lengths, right-padded
    for b in range(2):
        n = int(task.lengths[b])
        assert torch.equal(task.clean_tokens[b, :n], tiny_gpt2.to_tokens(CLEAN[b])[0].cpu())
        assert torch.equal(task.corrupt_tokens[b, :n], tiny_gpt2.to_tokens(CORRUPT[b])[0].cpu())
        assert int(task.positions["END"][b]) == n - 1

    def at(b, name):
        return tok.decode([int(task.clean_tokens[b, task.positions[name][b]])])

    assert [at(0, "IO"), at(1, "IO")] == [" Mary", " Alice"]
    assert [at(0, "S1"), at(1, "S1")] == [" John", " David"]
    assert [at(0, "S2"), at(1, "S2")] == [" John", " David"]  # 10 and -3 (back from END)
    assert [at(0, "END"), at(1, "END")] == [" to", " to"]
    assert tok.decode(task.answers.tolist()) == " Mary Alice"
    assert task.wrong_answers.shape == (2,)


def test_from_pairs_accepts_a_bare_tokenizer_and_several_answers(demo_tokenizer):
    task = Task.from_pairs(
        demo_tokenizer,
        CLEAN,
        CORRUPT,
        [[" Mary", " Maria"], [" Alice", " Anna"]],
        [[" John"], [" David"]],
        metric="candidate_accuracy",
        name="mine",
    )
    assert task.answers.shape == (2, 2) and task.wrong_answers.shape == (2, 1)
    assert task.clean_tokens[0, 0] == demo_tokenizer.bos_token_id  # BOS, as to_tokens prepends
    assert task.name == "mine"


def test_a_two_token_answer_names_the_example_and_shows_its_pieces(demo_tokenizer):
    word = " Marianneqx"
    pieces = [
        demo_tokenizer.decode([i])
        for i in demo_tokenizer(word, add_special_tokens=False)["input_ids"]
    ]
    assert len(pieces) > 1
    with pytest.raises(ValueError) as err:
        Task.from_pairs(demo_tokenizer, CLEAN, CORRUPT, [" Mary", word], [" John", " David"])
    text = str(err.value)
    assert "example 1" in text and repr(word) in text and str(pieces) in text


def test_an_unknown_word_is_not_one_token_either():
    with pytest.raises(ValueError, match=r"'<unk>'"):
        Task.from_pairs(
            tiny_tokenizer(), CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Zebulon"]
        )


def test_length_mismatch_names_the_example_and_shows_both_token_lists(tiny_llama):
    corrupt = [CORRUPT[0], "Then, Alice and David had a long argument. Alice said to"]  # shorter
    with pytest.raises(ValueError) as err:
        Task.from_pairs(tiny_llama, CLEAN, corrupt, [" Mary", " Alice"], [" John", " David"])
    text = str(err.value)
    assert "example 1" in text and "different lengths" in text
    assert str(tiny_llama.to_str_tokens(CLEAN[1])) in text
    assert str(tiny_llama.to_str_tokens(corrupt[1])) in text


def test_named_positions_holding_different_kinds_of_token_are_rejected(tiny_gpt2):
    clean = ["When Mary and John went to the store, John gave a drink to"]
    corrupt = ["When Mary and John went to the store. . gave a drink to"]  # same length
    assert tiny_gpt2.to_tokens(clean[0]).shape == tiny_gpt2.to_tokens(corrupt[0]).shape
    with pytest.raises(ValueError, match=r"example 0: position 'S2' \(10\) holds ' John'.*' \.'"):
        Task.from_pairs(tiny_gpt2, clean, corrupt, [" Mary"], [" John"], positions={"S2": [10]})
    # Without that named position the pair is accepted: only key positions must line up.
    Task.from_pairs(tiny_gpt2, clean, corrupt, [" Mary"], [" John"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"positions": {"IO": ["Zebulon", "Alice"]}}, ValueError, "word 'Zebulon' not found"),
        ({"positions": {"IO": [3]}}, ValueError, "one int or word per example"),
        ({"positions": {"IO": [3, 99]}}, ValueError, "example 1 is 99, outside"),
        ({"positions": {"IO": [3, 2.5]}}, TypeError, "must be int or str"),
        ({"metric": "bleu"}, ValueError, "metric must be one of"),
    ],
)
def test_bad_positions_and_metric(kwargs, error, match):
    with pytest.raises(error, match=match):
        Task.from_pairs(
            tiny_tokenizer(), CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " David"], **kwargs
        )


def test_bad_example_counts():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="2 clean prompts"):
        Task.from_pairs(tok, CLEAN, CORRUPT[:1], [" Mary", " Alice"], [" John", " David"])
    with pytest.raises(ValueError, match="no examples"):
        Task.from_pairs(tok, [], [], [], [])
    with pytest.raises(TypeError, match="one entry per example"):
        Task.from_pairs(tok, CLEAN[0], CORRUPT[0], " Mary", " John")
    with pytest.raises(ValueError, match="example 1 has 1 strings but example 0 has 2"):
        Task.from_pairs(tok, CLEAN, CORRUPT, [[" Mary", " John"], [" Alice"]], [" John", " David"])


def test_from_pairs_carries_the_stages_it_is_given(tiny_gpt2):
    from circuit_widgets import Stage, default_stages

    stages = [Stage("movers", "END"), Stage("inhibition", "END", "movers", "q")]
    mine = [Stage("readers", "END"), Stage("writers", "S2", "readers", "kv")]
    args = (tiny_gpt2, CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " David"])
    plain = Task.from_pairs(*args, positions={"S2": [10, -3]})
    assert plain.stages == () and default_stages(plain) == stages
    given = Task.from_pairs(*args, positions={"S2": [10, -3]}, stages=mine)
    assert given.stages == tuple(mine) and default_stages(given) == mine


def test_unspaced_word_answers_warn_naming_the_spaced_token(demo_tokenizer):
    """Issue 15 item 7: "Mary" after "... gave a drink to" is not what the model continues with."""
    spaced = demo_tokenizer.encode(" Mary", add_special_tokens=False)
    bare = demo_tokenizer.encode("Mary", add_special_tokens=False)
    assert len(spaced) == len(bare) == 1 and spaced != bare
    with pytest.warns(
        UserWarning, match=rf"'Mary' \(id {bare[0]}\) .*' Mary' \(one token, id {spaced[0]}\)"
    ) as rec:
        task = Task.from_pairs(demo_tokenizer, CLEAN[:1], CORRUPT[:1], ["Mary"], [" John"])
    assert "warn_spacing=False" in str(rec[0].message) and rec[0].filename == __file__
    assert task.answers.tolist() == bare  # still what was asked for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Task.from_pairs(
            demo_tokenizer, CLEAN[:1], CORRUPT[:1], ["Mary"], [" John"], warn_spacing=False
        )
        Task.from_pairs(demo_tokenizer, CLEAN[:1], CORRUPT[:1], [" Mary"], [" John"])
        # after a space (or for digits) the unspaced token is the usual continuation
        Task.from_pairs(demo_tokenizer, ["12+30= "], ["12+31= "], ["4"], ["5"])
        Task.from_pairs(demo_tokenizer, ["The answer is "], ["The reply is "], ["Mary"], ["John"])
