"""Task generators on tiny models and the demo tokenizer: tokens, positions, answers, errors."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from circuit_widgets.models import cache_dir, tiny_tokenizer
from circuit_widgets.tasks import Task, colored_objects, entity_tracking, ioi, words

SOURCES = ["tiny_gpt2", "tiny_llama", "demo_tokenizer"]
BRIDGES = ["tiny_gpt2", "tiny_llama"]


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo model's tokenizer alone (no weights), from the dequantised cache."""
    folders = sorted((cache_dir() / "models").glob("smollm2-135m-instruct-*"))
    if not folders:
        pytest.skip("demo model not cached yet: run load_model('demo') once")
    return AutoTokenizer.from_pretrained(folders[0])


@pytest.fixture(params=SOURCES)
def source(request):
    """A bridge or a bare tokenizer, each generator must accept both."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=BRIDGES)
def bridge(request):
    return request.getfixturevalue(request.param)


def tokenizer_of(src):
    return src.tokenizer if hasattr(src, "cfg") else src


def decode(src, token_id) -> str:
    return tokenizer_of(src).decode([int(token_id)])


def token_at(src, task: Task, b: int, position: str | int) -> str:
    """The clean token of example b at a named position (or an index), decoded."""
    index = task.positions[position][b] if isinstance(position, str) else position
    return decode(src, task.clean_tokens[b, int(index)])


def tiny_without(drop: set[str]):
    """The tiny word-level tokenizer without some words (they become <unk>: not one token)."""
    vocab = tiny_tokenizer().get_vocab()
    keep = {w: i for w, i in vocab.items() if w.lstrip("Ġ") not in drop}
    tk = Tokenizer(tk_models.WordLevel(keep, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )


def assert_padding_is_right(task: Task, pad_id: int) -> None:
    """Real tokens first, then pads; END is the last real token of every example."""
    mask = task.attention_mask
    assert torch.equal(mask, (torch.arange(task.seq_len) < task.lengths[:, None]).long())
    assert torch.equal(task.positions["END"], task.lengths - 1)
    assert (task.clean_tokens[mask == 0] == pad_id).all()
    assert (task.corrupt_tokens[mask == 0] == pad_id).all()


# --------------------------------------------------------------------------- IOI


@pytest.mark.parametrize("corruption", ["ABC", "S2_IO"])
def test_ioi_positions_name_their_tokens(source, corruption):
    task = ioi(source, 12, seed=3, corruption=corruption)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape == (12, task.seq_len)
    assert task.answers.shape == task.wrong_answers.shape == (12,)
    assert set(task.positions) == {"IO", "S1", "S1+1", "S2", "and", "END"}
    assert task.metric_name == "logit_diff"
    for b, meta in enumerate(task.meta):

        def at(name, b=b):
            return token_at(source, task, b, name)

        assert at("IO") == " " + meta["IO"]
        assert at("S1") == at("S2") == " " + meta["S"]
        assert at("and") == " and"
        assert int(task.positions["S1+1"][b]) == int(task.positions["S1"][b]) + 1
        assert decode(source, task.answers[b]) == " " + meta["IO"]
        assert decode(source, task.wrong_answers[b]) == " " + meta["S"]
        assert meta["IO"] != meta["S"]
        # ABBA: IO comes first; BABA: S comes first.
        assert (task.positions["IO"][b] < task.positions["S1"][b]) == (meta["order"] == "ABBA")
        assert at("END") == " to"  # every template ends "... to [A]"; the answer is cut off


def test_ioi_abc_changes_exactly_the_three_names(source):
    task = ioi(source, 10, seed=1, corruption="ABC")
    for b, meta in enumerate(task.meta):
        diff = (task.clean_tokens[b] != task.corrupt_tokens[b]).nonzero().flatten().tolist()
        slots = sorted(int(task.positions[k][b]) for k in ("IO", "S1", "S2"))
        assert diff == slots
        fresh = [meta["corrupt_names"][k] for k in ("IO", "S1", "S2")]
        assert len(set(fresh)) == 3 and not set(fresh) & {meta["IO"], meta["S"]}
        for k, name in meta["corrupt_names"].items():
            assert decode(source, task.corrupt_tokens[b, task.positions[k][b]]) == " " + name


def test_ioi_s2_io_puts_the_io_name_at_s2(source):
    task = ioi(source, 10, seed=1, corruption="s2_io")  # case-insensitive
    for b in range(len(task)):
        diff = (task.clean_tokens[b] != task.corrupt_tokens[b]).nonzero().flatten().tolist()
        s2 = int(task.positions["S2"][b])
        assert diff == [s2]
        assert task.corrupt_tokens[b, s2] == task.answers[b]


def test_ioi_corruptions_share_the_clean_prompts_of_a_seed(source):
    abc, s2io = ioi(source, 9, seed=11), ioi(source, 9, seed=11, corruption="S2_IO")
    assert torch.equal(abc.clean_tokens, s2io.clean_tokens)
    assert abc.corrupt_prompts != s2io.corrupt_prompts


def test_ioi_is_balanced_and_uses_many_templates(source):
    task = ioi(source, 40, seed=0)
    orders = [m["order"] for m in task.meta]
    assert orders.count("ABBA") == orders.count("BABA") == 20
    assert len({(m["order"], m["template"]) for m in task.meta}) > 10


def test_generators_pad_on_the_right_and_mix_lengths(source):
    pad = tokenizer_of(source).pad_token_id
    task = ioi(source, 30, seed=0)
    assert_padding_is_right(task, pad)
    assert len(set(task.lengths.tolist())) > 1  # templates differ in length
    short, long_ = int(task.lengths.argmin()), int(task.lengths.argmax())
    pair = task.subset([short, long_])
    assert pair.seq_len == int(task.lengths.max())
    assert pair.positions["END"].tolist() == [
        int(task.lengths[short]) - 1,
        int(task.lengths[long_]) - 1,
    ]
    assert pair.positions["END"][0] != pair.positions["END"][1]
    assert pair.meta == [task.meta[short], task.meta[long_]]
    only_short = task.subset([short])
    assert only_short.seq_len == int(task.lengths[short])  # padding trimmed
    assert torch.equal(only_short.clean_tokens[0], task.clean_tokens[short, : only_short.seq_len])
    for gen in (colored_objects, entity_tracking):
        assert_padding_is_right(gen(source, 5, seed=0), pad)


@pytest.mark.parametrize("gen", [ioi, colored_objects, entity_tracking])
def test_tokens_equal_to_tokens_for_unpadded_examples(bridge, gen):
    task = gen(bridge, 6, seed=2)
    for b in range(len(task)):
        n = int(task.lengths[b])
        for tokens, prompt in (
            (task.clean_tokens, task.clean_prompts),
            (task.corrupt_tokens, task.corrupt_prompts),
        ):
            expected = bridge.to_tokens(prompt[b])[0].cpu()
            assert torch.equal(tokens[b, :n], expected)


@pytest.mark.parametrize("gen", [ioi, colored_objects, entity_tracking])
def test_same_seed_same_task(gen):
    tok = tiny_tokenizer()
    a, b, c = gen(tok, 8, seed=5), gen(tok, 8, seed=5), gen(tok, 8, seed=6)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(
        a.corrupt_tokens, b.corrupt_tokens
    )
    assert a.clean_prompts == b.clean_prompts and a.meta == b.meta
    assert a.clean_prompts != c.clean_prompts


@pytest.mark.parametrize("gen", [ioi, colored_objects, entity_tracking])
def test_tiny_models_run_every_task_and_metric(bridge, gen):
    task = gen(bridge, 6, seed=0)
    with torch.no_grad():
        logits = bridge(task.clean_tokens, attention_mask=task.attention_mask)
    assert logits.shape == (6, task.seq_len, bridge.cfg.d_vocab)
    for metric in ("logit_diff", "accuracy", "candidate_accuracy", "prob"):
        values = task.with_metric(metric).metric(logits)
        assert values.shape == (6,) and torch.isfinite(values).all()


def test_padding_does_not_change_logits_at_end(bridge):
    task = ioi(bridge, 8, seed=4)
    assert len(set(task.lengths.tolist())) > 1
    with torch.no_grad():
        batched = task.final_logits(bridge(task.clean_tokens, attention_mask=task.attention_mask))
        for b in range(len(task)):
            alone = bridge(task.clean_tokens[b : b + 1, : int(task.lengths[b])])[0, -1]
            torch.testing.assert_close(batched[b], alone, atol=1e-4, rtol=0)


def test_n_larger_than_the_combinations_repeats():
    tok = tiny_without(set(words.NAMES[5:]))  # five names left: 20 (IO, S) pairs
    task = ioi(tok, 200, seed=0, corruption="S2_IO")
    assert len(task) == 200
    assert len({(m["IO"], m["S"]) for m in task.meta}) <= 20


# --------------------------------------------------------------------------- Colored Objects


def test_colored_objects_positions_and_answers(source):
    task = colored_objects(source, 12, seed=7)
    assert task.answers.shape == (12,) and task.wrong_answers.shape == (12, 2)
    assert task.position_sets["wrong_colors"].shape == (12, 2)
    assert task.position_sets["objects"].shape == (12, 3)
    assert set(task.positions) == {"END", "query_object", "correct_color", "correct_object"}
    for b, meta in enumerate(task.meta):

        def at(p, b=b):
            return token_at(source, task, b, int(p))

        objs, cols = meta["objects"], meta["colors"]
        assert len(set(objs)) == len(set(cols)) == 3
        q = objs.index(meta["query"])
        assert at(task.positions["query_object"][b]) == " " + meta["query"]
        assert at(task.positions["correct_object"][b]) == " " + meta["query"]
        assert at(task.positions["correct_color"][b]) == " " + cols[q]
        assert task.positions["correct_object"][b] == task.positions["correct_color"][b] + 1
        assert task.positions["correct_object"][b] < task.positions["query_object"][b]
        assert at(task.positions["END"][b]) == ":"
        assert decode(source, task.answers[b]) == " " + cols[q].title()
        others = [c for j, c in enumerate(cols) if j != q]
        assert [decode(source, t) for t in task.wrong_answers[b]] == [
            " " + c.title() for c in others
        ]
        assert [at(p) for p in task.position_sets["wrong_colors"][b]] == [" " + c for c in others]
        assert [at(p) for p in task.position_sets["objects"][b]] == [" " + o for o in objs]
        # One worked example, answered, then the real question.
        prompt = task.clean_prompts[b]
        assert prompt.count("Q: On the table, I see") == 2 and prompt.endswith("?\nA:")
        assert prompt.startswith(meta["example"]) and meta["example"].endswith("\n\n")
        assert f"\nA: {meta['example'].split('A: ')[1].split()[0]}\n\nQ:" in prompt


def test_colored_objects_corrupt_asks_about_another_object(source):
    task = colored_objects(source, 12, seed=8)
    for b, meta in enumerate(task.meta):
        qpos = int(task.positions["query_object"][b])
        diff = (task.clean_tokens[b] != task.corrupt_tokens[b]).nonzero().flatten().tolist()
        assert diff == [qpos]
        assert meta["corrupt_query"] != meta["query"] and meta["corrupt_query"] in meta["objects"]
        assert meta["corrupt_answer"] != meta["answer"]
        assert decode(source, task.corrupt_tokens[b, qpos]) == " " + meta["corrupt_query"]


def test_colored_objects_uses_an_before_vowels():
    task = colored_objects(tiny_tokenizer(), 40, seed=0)
    texts = [p.split("\n\n")[1] for p in task.clean_prompts]
    assert any(" an orange " in t for t in texts)
    assert not any(" a orange " in t for t in texts)


def test_colored_objects_drops_a_colour_whose_title_case_is_two_tokens():
    tok = tiny_without({"Orange"})  # " orange" stays one token, " Orange" becomes <unk>
    task = colored_objects(tok, 60, seed=0)
    used = {c for m in task.meta for c in m["colors"]}
    assert "orange" not in used and len(used) == len(words.COLORS) - 1


# --------------------------------------------------------------------------- entity tracking


@pytest.mark.parametrize("n_boxes", [2, 3, 7])
def test_entity_tracking_positions_and_answers(source, n_boxes):
    task = entity_tracking(source, 10, seed=4, n_boxes=n_boxes)
    assert task.metric_name == "prob"
    assert task.answers.shape == (10,) and task.wrong_answers.shape == (10, n_boxes - 1)
    assert set(task.positions) == {"END", "query_label", "query_label_ctx", "query_object_ctx"}
    for b, meta in enumerate(task.meta):

        def at(name, b=b):
            return token_at(source, task, b, name)

        objs, labs, q = meta["objects"], meta["labels"], meta["query_index"]
        assert len(set(objs)) == len(set(labs)) == n_boxes and len(objs) == n_boxes
        assert all(len(lb) == 1 and lb.isupper() for lb in labs)
        assert at("query_label") == at("query_label_ctx") == " " + labs[q]
        assert task.positions["query_label_ctx"][b] < task.positions["query_label"][b]
        assert at("query_object_ctx") == " " + objs[q] == decode(source, task.answers[b])
        assert at("END") == " the"
        assert [decode(source, t) for t in task.wrong_answers[b]] == [
            " " + o for j, o in enumerate(objs) if j != q
        ]
        assert task.clean_prompts[b].endswith(f". Box {labs[q]} contains the")
        assert task.clean_prompts[b].startswith(f"The {objs[0]} is in Box {labs[0]}, the {objs[1]}")


def test_entity_tracking_corrupt_is_another_context_with_an_unused_query_label(source):
    task = entity_tracking(source, 10, seed=9)
    for b, meta in enumerate(task.meta):
        assert meta["corrupt_query_label"] not in meta["corrupt_labels"]
        assert not set(meta["corrupt_objects"]) & set(meta["objects"])
        qpos = int(task.positions["query_label"][b])
        assert decode(source, task.corrupt_tokens[b, qpos]) == " " + meta["corrupt_query_label"]
        assert task.corrupt_prompts[b].endswith(f"Box {meta['corrupt_query_label']} contains the")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("gen", [ioi, colored_objects, entity_tracking])
@pytest.mark.parametrize("n", [0, -3])
def test_n_below_one_is_an_error(gen, n):
    with pytest.raises(ValueError, match="n must be >= 1"):
        gen(tiny_tokenizer(), n)


def test_unknown_corruption_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown corruption 'IO_S'.*'ABC', 'S2_IO'"):
        ioi(tiny_tokenizer(), 4, corruption="IO_S")


@pytest.mark.parametrize("n_boxes", [1, 0, 26, 100])
def test_n_boxes_out_of_range(n_boxes):
    with pytest.raises(ValueError, match=rf"n_boxes must be between 2 and 25 .* got {n_boxes}"):
        entity_tracking(tiny_tokenizer(), 4, n_boxes=n_boxes)


def test_too_few_single_token_names_says_which_list_and_tokenizer():
    tok = tiny_without(set(words.NAMES[2:]))
    task = ioi(tok, 4, corruption="S2_IO")  # two names suffice without fresh ones
    assert {m["IO"] for m in task.meta} | {m["S"] for m in task.meta} <= set(words.NAMES[:2])
    with pytest.raises(ValueError, match=r"at least 5 words from words\.NAMES.*keeps only 2"):
        ioi(tok, 4, corruption="ABC")


def test_too_few_words_for_colours_objects_and_boxes():
    with pytest.raises(ValueError, match=r"at least 3 words from words\.COLORS"):
        colored_objects(tiny_without(set(words.COLORS[2:])), 2)
    with pytest.raises(ValueError, match=r"words\.COLORED_OBJECTS"):
        colored_objects(tiny_without(set(words.COLORED_OBJECTS[2:])), 2)
    with pytest.raises(ValueError, match=r"n_boxes must be between 2 and 4"):
        entity_tracking(tiny_without(set(words.BOX_LABELS[5:])), 2)


def test_unknown_position_name_lists_the_known_ones():
    task = ioi(tiny_tokenizer(), 2)
    with pytest.raises(ValueError, match=r"no position 'nope'.*'END'"):
        task.position("nope")
    assert torch.equal(task.position("IO"), task.positions["IO"])


def test_a_model_argument_that_is_neither_bridge_nor_tokenizer():
    with pytest.raises(TypeError, match="TransformerBridge .* or a Hugging Face tokenizer"):
        ioi("gpt2", 2)


def test_to_moves_every_tensor_and_keeps_the_rest():
    """CPU-only runs have no second device, so a dtype (also passed to Tensor.to) stands in."""
    task = colored_objects(tiny_tokenizer(), 3)
    moved = task.to(torch.int32)
    tensors = [
        moved.clean_tokens,
        moved.corrupt_tokens,
        moved.attention_mask,
        moved.answers,
        moved.wrong_answers,
        *moved.positions.values(),
        *moved.position_sets.values(),
    ]
    assert all(t.dtype == torch.int32 for t in tensors)
    assert moved.meta == task.meta and moved.clean_prompts == task.clean_prompts
