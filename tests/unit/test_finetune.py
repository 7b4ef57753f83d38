"""The arithmetic task and the LoRA fine-tune recipe, on a digit-per-token tokenizer and a tiny Llama."""

from __future__ import annotations

import json
import random

import pytest
import torch

from circuit_widgets.finetune import (
    ArithmeticRecipe,
    answer_loss,
    lora_model,
    train_arithmetic,
    training_batch,
)
from circuit_widgets.tasks.arithmetic import arithmetic, held_out, solve

DIGITS = "0123456789"


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """A tiny Llama checkpoint whose tokenizer writes one token per digit, like SmolLM2's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<unk>", *DIGITS, "+", "-", "=", " "])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(
        Regex("."), behavior="isolated"
    )  # every character alone
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>"
    )
    folder = tmp_path_factory.mktemp("digits")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(digit_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(digit_folder)


def test_task_answers_are_first_digits_of_held_out_problems(tok):
    task = arithmetic(tok, n=20, seed=3, digits=2, ops=("+", "-"))
    assert task.metric_name == "accuracy" and task.wrong_answers.shape == (20, 9)
    for i, m in enumerate(task.meta):
        a, op, b = m["a"], m["op"], m["b"]
        assert held_out(a, op, b) and 10 <= a <= 99 and 10 <= b <= 99
        assert task.clean_prompts[i] == f"{a}{op}{b}="
        first = str(solve(a, op, b))[0]
        assert tok.convert_ids_to_tokens(int(task.answers[i])) == first
        assert first not in tok.convert_ids_to_tokens(task.wrong_answers[i].tolist())
        assert str(m["corrupt_answer"])[0] != first  # the corrupt problem's answer starts elsewhere
        toks = tok.convert_ids_to_tokens(task.clean_tokens[i, : int(task.lengths[i])].tolist())
        p = {k: int(v[i]) for k, v in task.positions.items()}
        assert toks[p["END"]] == "=" and toks[p["op"]] == op
        assert toks[p["a_first"]] + toks[p["a_last"]] == str(a)
        assert toks[p["b_first"]] + toks[p["b_last"]] == str(b)
    train = arithmetic(tok, n=20, seed=3, split="train")
    assert not any(held_out(m["a"], m["op"], m["b"]) for m in train.meta)


def test_task_validation(tok):
    from circuit_widgets.models import tiny_tokenizer

    with pytest.raises(ValueError, match="each digit as its own token"):
        arithmetic(tiny_tokenizer(), n=2)  # word-level: "37" is not two tokens
    with pytest.raises(ValueError, match="ops"):
        arithmetic(tok, n=2, ops=("*",))
    with pytest.raises(ValueError, match="digits"):
        arithmetic(tok, n=2, digits=0)
    with pytest.raises(ValueError, match="split"):
        arithmetic(tok, n=2, split="dev")


def test_split_is_about_a_fifth_and_training_never_sees_held_out(tok):
    share = sum(held_out(a, "+", b) for a in range(100) for b in range(100)) / 10_000
    assert 0.15 < share < 0.25
    recipe = ArithmeticRecipe(batch_size=64, digits=(1, 2))
    ids, attn, target = training_batch(tok, random.Random(0), recipe, tok.bos_token_id)
    for row, mask, t in zip(ids.tolist(), attn.tolist(), target.tolist()):
        text = "".join(tok.convert_ids_to_tokens(row[1 : sum(mask) - 1]))
        lhs, rhs = text.split("=")
        op = "+" if "+" in lhs else "-"
        a, b = map(int, lhs.split(op))
        assert not held_out(a, op, b) and int(rhs) == solve(a, op, b)
        # The loss reads the answer's digits and the EOS, nothing of the prompt.
        assert sum(t) == len(rhs) + 1 and t[len(lhs) + 2 : len(lhs) + 2 + len(rhs)] == [1] * len(
            rhs
        )


def test_recipe_validation():
    with pytest.raises(ValueError, match="steps"):
        ArithmeticRecipe(steps=0)
    with pytest.raises(ValueError, match="target modules"):
        ArithmeticRecipe(target_modules=("attn",))
    with pytest.raises(ValueError, match="ops"):
        ArithmeticRecipe(ops=("/",))


def test_answer_loss_matches_full_cross_entropy(digit_folder, tok):
    from transformers import AutoModelForCausalLM

    recipe = ArithmeticRecipe(batch_size=4, first_layer=0)
    model = lora_model(AutoModelForCausalLM.from_pretrained(digit_folder), recipe)
    ids, attn, target = training_batch(tok, random.Random(1), recipe, tok.bos_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits[target[:, 1:]], ids[:, 1:][target[:, 1:]])
        got = answer_loss(model, ids, attn, target)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_saves_a_safetensors_adapter_and_lowers_the_loss(digit_folder, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    recipe = ArithmeticRecipe(
        steps=12, batch_size=8, lr=1e-2, warmup=2, first_layer=1, threads=1, digits=(1,)
    )
    log = train_arithmetic(
        tmp_path, recipe, base_folder=digit_folder, progress=False, command="test"
    )
    assert log.steps_done == 12 and not log.interrupted
    assert sum(log.losses[-3:]) < sum(log.losses[:3])
    assert not list(tmp_path.glob("*.bin"))  # weights never pickled
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights and all(".layers.1." in k for k in weights)  # first_layer=1: layer 0 untouched
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == 8 and set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.base_model_name_or_path == "circuit_widgets:demo"
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["steps_done"] == 12 and meta["recipe"]["seed"] == 0 and meta["command"] == "test"


def test_time_budget_stops_and_still_saves(digit_folder, tmp_path):
    recipe = ArithmeticRecipe(steps=50, batch_size=4, max_minutes=1e-9, threads=1, first_layer=0)
    log = train_arithmetic(tmp_path, recipe, base_folder=digit_folder, progress=False)
    assert log.interrupted and log.steps_done == 0
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "metadata.json").read_text())["interrupted"] is True


def test_command_line(digit_folder, tmp_path):
    from circuit_widgets.finetune.__main__ import main

    assert (
        main(
            [
                "arithmetic",
                "--out",
                str(tmp_path),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--base",
                str(digit_folder),
                "--threads",
                "1",
                "--first-layer",
                "0",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["steps_done"] == 2 and meta["command"].startswith(
        "python -m circuit_widgets.finetune arithmetic"
    )
    with pytest.raises(SystemExit):
        main(["arithmetic"])  # --out is required


def test_greedy_answers_match_one_prompt_at_a_time(digit_folder, tok):
    from circuit_widgets import load_model
    from circuit_widgets.tasks.arithmetic import exact_match, greedy_answers

    model = load_model(digit_folder)
    task = arithmetic(model, n=6, seed=0, digits=1, ops=("+", "-"))
    got = greedy_answers(model, task, max_digits=3, batch_size=4)
    digit = {tok.convert_tokens_to_ids(d): d for d in DIGITS}
    for i, text in enumerate(got):  # reference: unpadded, one example, one token at a time
        ids = task.clean_tokens[i, : int(task.lengths[i])].tolist()
        want = ""
        for _ in range(3):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt not in digit:
                break
            want += digit[nxt]
            ids.append(nxt)
        assert text == want
    assert exact_match(model, task).tolist() == [
        float(g == str(m["answer"])) for g, m in zip(got, task.meta)
    ]
