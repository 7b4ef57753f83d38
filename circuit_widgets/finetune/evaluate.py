"""Accuracy of the demo model with and without an adapter, on held-out problems/vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def load_with_adapter(adapter: str | Path, *, merge: bool = True):
    """The demo model with the LoRA adapter in ``adapter`` (safetensors), as a bridge."""
    from transformers import AutoTokenizer

    from circuit_widgets.models import load_model, lora_demo

    folder, peft_model = lora_demo(Path(adapter))
    hf = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    return load_model(hf, tokenizer=AutoTokenizer.from_pretrained(folder))


def accuracies(model: Any, *, n: int = 200, seed: int = 1) -> dict[str, float]:
    """First-digit and whole-answer accuracy on held-out 2-digit + and -, and entity tracking."""
    from circuit_widgets.tasks import entity_tracking
    from circuit_widgets.tasks.arithmetic import arithmetic, exact_match

    out: dict[str, float] = {}
    with torch.no_grad():
        for op, name in (("+", "add"), ("-", "sub")):
            task = arithmetic(model, n=n, seed=seed, digits=2, ops=(op,))
            logits = torch.cat([model(task.clean_tokens[i : i + 64]) for i in range(0, n, 64)])
            out[f"arith_{name}_first_digit"] = float(task.accuracy(logits).mean())
            out[f"arith_{name}_exact"] = float(exact_match(model, task).mean())
        et = entity_tracking(model, n=n, seed=seed)
        logits = torch.cat([model(et.clean_tokens[i : i + 32]) for i in range(0, n, 32)])
        out["entity_tracking"] = float(et.accuracy(logits).mean())
    return {k: round(v, 4) for k, v in out.items()}


BOXES = (3, 5, 7)


def _end_logits(model: Any, task: Any, a: int, b: int) -> torch.Tensor:
    """Logits at END of examples a..b, [batch, vocab]; right padding never precedes END."""
    logits = model(task.clean_tokens[a:b])
    end = task.positions["END"][a:b].to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), end].float().cpu()


def boxes_accuracies(
    model: Any, *, n: int = 200, seed: int = 1, boxes=BOXES, split: str = "test"
) -> dict[str, float]:
    """Entity-tracking accuracy at each box count on ``split`` prompts: argmax over the
    vocabulary (``boxes7_vocab``) and among the context's objects (``boxes7_objects``)."""
    from circuit_widgets.tasks import entity_tracking

    out: dict[str, float] = {}
    with torch.no_grad():
        for nb in boxes:
            task = entity_tracking(model, n=n, seed=seed, n_boxes=nb, split=split)
            final = torch.cat([_end_logits(model, task, i, i + 32) for i in range(0, n, 32)])
            out[f"boxes{nb}_vocab"] = float(task.accuracy(final).mean())
            out[f"boxes{nb}_objects"] = float(task.candidate_accuracy(final).mean())
    return {k: round(v, 4) for k, v in out.items()}


def evaluate(
    adapter: str | Path, *, n: int = 200, seed: int = 1, task: str = "arithmetic"
) -> dict[str, Any]:
    """Base vs fine-tuned accuracies, also written into ``adapter/metadata.json``.

    ``task="arithmetic"``: held-out arithmetic and 7-box entity tracking (``accuracy``);
    ``task="entity_tracking"``: 3, 5 and 7 boxes on the test split (``accuracy``).
    """
    from circuit_widgets.models import load_model

    if task not in ("arithmetic", "entity_tracking"):
        raise ValueError(f"task must be 'arithmetic' or 'entity_tracking', got {task!r}")
    torch.set_num_threads(2)
    score = accuracies if task == "arithmetic" else boxes_accuracies
    result = {
        "n": n,
        "seed": seed,
        "task": task,
        "split": "test",
        "base": score(load_model("demo"), n=n, seed=seed),
        "finetuned": score(load_with_adapter(adapter), n=n, seed=seed),
    }
    path = Path(adapter) / "metadata.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta["accuracy"] = result
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return result
