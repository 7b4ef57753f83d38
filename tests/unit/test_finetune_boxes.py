"""The entity-tracking (boxes) LoRA recipe behind "demo-boxes", on a tiny Llama checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch

from circuit_widgets.finetune import (
    EntityTrackingRecipe,
    answer_loss,
    boxes_batch,
    lora_model,
    train_entity_tracking,
)
from circuit_widgets.tasks import entity_tracking, words
from circuit_widgets.tasks.entity_tracking import split_words


@pytest.fixture(scope="module")
def box_folder(tmp_path_factory):
    """A tiny random Llama checkpoint with the word-level tokenizer every task word fits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuit_widgets.models import tiny_tokenizer

    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("boxes")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(box_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(box_folder)


def test_batches_use_train_words_only_and_the_loss_reads_the_answer(tok):
    recipe = EntityTrackingRecipe(batch_size=64, boxes=(2, 7))
    ids, attn, target = boxes_batch(tok, random.Random(0), recipe)
    train_o = {" " + w for w in split_words(words.BOX_OBJECTS, "train")}
    train_l = {" " + w for w in split_words(words.BOX_LABELS, "train")}
    test_o = {" " + w for w in split_words(words.BOX_OBJECTS, "test")}
    lengths = set()
    for row, mask, t in zip(ids.tolist(), attn.tolist(), target.tolist()):
        n = sum(mask)
        lengths.add(n)
        pieces = [tok.decode([i]) for i in row[:n]]
        text = "".join(pieces[1:-1])  # BOS first, the answer last
        assert pieces[0] == tok.bos_token and text.endswith(" contains the")
        assert sum(t) == 1 and t[n - 1] == 1  # the loss reads the answer token alone
        objects = [p for p in pieces if p in train_o | test_o]
        assert set(objects) <= train_o
        query = text.split(". Box ")[-1].split(" ")[0]
        assert " " + query in train_l
        # The answer is the object of the box whose label the question names.
        box_of = {
            seg.split(" is in Box ")[1]: seg.split(" is in Box ")[0].split(" ")[-1]
            for seg in text.split(". Box ")[0].split(", ")
        }
        assert pieces[n - 1] == " " + box_of[query]
    assert len(lengths) == 2  # two box counts: two lengths, right-padded


def test_batches_are_tokenised_as_the_task_tokenises_them(tok):
    recipe = EntityTrackingRecipe(batch_size=1, boxes=(3,))
    ids, _, _ = boxes_batch(tok, random.Random(5), recipe)
    text = tok.decode(ids[0, 1:-1])
    task = entity_tracking(tok, 1, seed=0, n_boxes=3, split="train")
    assert len(ids[0]) - 1 == task.clean_tokens.shape[1]
    assert text.startswith("The ") and task.clean_prompts[0].startswith("The ")


def test_recipe_validation():
    with pytest.raises(ValueError, match="boxes"):
        EntityTrackingRecipe(boxes=(1, 3))
    with pytest.raises(ValueError, match="boxes"):
        EntityTrackingRecipe(boxes=())
    with pytest.raises(ValueError, match="steps"):
        EntityTrackingRecipe(steps=0)
    with pytest.raises(ValueError, match="target modules"):
        EntityTrackingRecipe(target_modules=("mlp",))


def test_answer_loss_matches_full_cross_entropy(box_folder, tok):
    from transformers import AutoModelForCausalLM

    recipe = EntityTrackingRecipe(batch_size=4, boxes=(2, 4))
    model = lora_model(AutoModelForCausalLM.from_pretrained(box_folder), recipe)
    ids, attn, target = boxes_batch(tok, random.Random(1), recipe)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits[target[:, 1:]], ids[:, 1:][target[:, 1:]])
        got = answer_loss(model, ids, attn, target)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_saves_a_complete_adapter_and_lowers_the_loss(box_folder, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    recipe = EntityTrackingRecipe(
        steps=15, batch_size=8, lr=1e-2, warmup=2, threads=1, boxes=(2,), rank=4
    )
    log = train_entity_tracking(tmp_path, recipe, base_folder=box_folder, progress=False)
    assert log.steps_done == 15 and not log.interrupted
    assert sum(log.losses[-3:]) < sum(log.losses[:3])
    weights = load_file(tmp_path / "adapter_model.safetensors")
    # Both layers, four projections, A and B each.
    assert len(weights) == 2 * 4 * 2 and not list(tmp_path.glob("*.bin"))
    assert LoraConfig.from_pretrained(tmp_path).r == 4
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["task"] == "entity_tracking" and meta["recipe"]["boxes"] == [2]


def test_command_line(box_folder, tmp_path):
    from circuit_widgets.finetune.__main__ import main

    argv = ["entity_tracking", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2"]
    argv += ["--base", str(box_folder), "--threads", "1", "--boxes", "2,3", "--rank", "2"]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["steps_done"] == 2 and meta["recipe"]["boxes"] == [2, 3]
    assert meta["recipe"]["rank"] == 2 and meta["task"] == "entity_tracking"
    assert meta["command"].startswith("python -m circuit_widgets.finetune entity_tracking")
    with pytest.raises(SystemExit):
        main(["entity_tracking"])  # --out is required
