"""Test helpers: seeded tasks, tiny models with sharp attention, a planted-circuit micro model,
and plain reference implementations of activation patching, path patching and attribution.

The references are deliberately naive: one head (or layer) per forward pass, the bridge's own
``run_with_hooks``, explicit per-example loops. They never import ``circuit_widgets.core``, so
they are an independent check on it. Every reference run is under ``torch.no_grad()`` except
the attribution one, whose hooks are checked under autograd in ``test_patching_reference``.
"""

from __future__ import annotations

import torch

from circuit_widgets.models import model_shape, tiny_model
from circuit_widgets.tasks.base import Task

PER_HEAD = ("z", "q", "pattern")  # columns are query heads
PER_KV_HEAD = ("k", "v")  # columns are key/value heads (shared by a group on GQA models)
PER_LAYER = ("attn_out", "mlp_out", "resid_pre")  # one column per layer
COMPONENTS = PER_HEAD[:2] + PER_KV_HEAD + PER_HEAD[2:] + PER_LAYER


def hook_name(component: str, layer: int) -> str:
    return {
        "z": f"blocks.{layer}.attn.hook_z",
        "q": f"blocks.{layer}.attn.hook_q",
        "k": f"blocks.{layer}.attn.hook_k",
        "v": f"blocks.{layer}.attn.hook_v",
        "pattern": f"blocks.{layer}.attn.hook_pattern",
        "attn_out": f"blocks.{layer}.hook_attn_out",
        "mlp_out": f"blocks.{layer}.hook_mlp_out",
        "resid_pre": f"blocks.{layer}.hook_resid_pre",
    }[component]


def n_columns(model, component: str) -> int:
    shape = model_shape(model)
    if component in PER_KV_HEAD:
        return shape.n_kv_heads
    if component in PER_HEAD:
        return shape.n_heads
    return 1


# --------------------------------------------------------------------------- models


def sharp_tiny_model(
    arch: str,
    *,
    n_layers: int = 2,
    seed: int = 0,
    qk_scale: float = 10.0,
    n_kv_heads: int | None = None,
):
    """The conftest tiny model (4 heads, llama with 2 KV heads; 2 layers unless told), with
    W_Q and W_K scaled so attention is far from uniform: at init std 0.02 every pattern is ~uniform and
    q/k/pattern patches move the metric by ~1e-4, too little for a 1e-5 tolerance to mean much.
    A private instance: the session fixtures are never modified.
    """
    # Llama shares each key/value head between 2 query heads, Gemma 3 (as the real 270M) one among all.
    kv = None if arch == "gpt2" else (n_kv_heads or {"llama": 2, "gemma3": 1}[arch])
    model = tiny_model(arch, n_layers=n_layers, n_heads=4, n_kv_heads=kv, d_model=32, seed=seed)
    with torch.no_grad():
        if arch == "gemma3":
            return model  # q and k are RMS-normalised per head: scores are O(1) already, no need
        for block in model.blocks:
            # GPT-2's bridge computes q/k/v with split copies of c_attn, so scale those.
            for lin in (block.attn.q, block.attn.k):
                lin.weight.mul_(qk_scale)
                if getattr(lin, "bias", None) is not None:
                    lin.bias.mul_(qk_scale)
    return model


def planted_micro_model(seed: int = 0, const: float = 20.0, unembed_scale: float = 60.0):
    """Llama 2x4 (2 KV heads); residual dims: token 0:8 | moved 8:16 | answer 16:24 | const 31.
    All W_Q, W_K, MLP outputs = 0 (uniform causal attention, no MLP effect). Head 0.1 copies
    token -> moved, head 1.2 copies moved -> answer (identity V/O); every other W_O = 0. Token t
    unembeds as its embedding in 'answer', so a prompt token raises its own logit via 0.1 -> 1.2;
    the big constant dim makes each RMSNorm a near-constant scale (the model is near linear).
    """
    model = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=seed)
    hf = model.original_model
    d_vocab = model.cfg.d_vocab
    gen = torch.Generator().manual_seed(1000 + seed)
    tok_emb = torch.randn(d_vocab, 8, generator=gen)
    eye = torch.eye(8)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0:8] = tok_emb
        emb[:, 31] = const
        for i, layer in enumerate(hf.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.down_proj):
                lin.weight.zero_()
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            if i == 0:
                attn.v_proj.weight[0:8, 0:8] = eye  # KV head 0 reads token dims
                attn.o_proj.weight[8:16, 8:16] = eye  # head 1 writes 'moved'
            else:
                attn.v_proj.weight[8:16, 8:16] = eye  # KV head 1 reads 'moved'
                attn.o_proj.weight[16:24, 16:24] = eye  # head 2 writes 'answer'
        hf.model.norm.weight.fill_(1.0)
        head = hf.lm_head
        head.weight.zero_()
        head.weight[:, 16:24] = unembed_scale * tok_emb
        bias = getattr(head.original_component, "bias", None)
        if bias is not None:
            bias.zero_()
    return model


PLANTED_HEADS = {(0, 1), (1, 2)}
"""Heads of ``planted_micro_model`` with a non-zero W_O."""


# --------------------------------------------------------------------------- tasks


def random_task(
    model,
    *,
    n: int = 4,
    seq_len: int = 7,
    lengths=(7, 5, 6, 4),
    seed: int = 0,
    extra_position: str = "S",
) -> Task:
    """Random clean prompts, right-padded to different lengths; the corrupt prompt resamples
    the token at S and about half the other real tokens. END = last real index."""
    gen = torch.Generator().manual_seed(seed)
    pad = model.tokenizer.pad_token_id
    vocab = model.cfg.d_vocab
    lengths = torch.tensor(lengths[:n])
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    clean = torch.randint(1, vocab, (n, seq_len), generator=gen)
    corrupt = clean.clone()
    s_pos = torch.stack([torch.randint(0, int(ln) - 1, (1,), generator=gen)[0] for ln in lengths])
    resample = torch.rand(n, seq_len, generator=gen) < 0.5
    resample[torch.arange(n), s_pos] = True
    corrupt[resample] = torch.randint(1, vocab, (int(resample.sum()),), generator=gen)
    clean[mask == 0] = pad
    corrupt[mask == 0] = pad
    answers = torch.randint(1, vocab, (n,), generator=gen)
    wrong = (answers + torch.randint(1, vocab - 1, (n,), generator=gen)) % vocab
    return Task(
        name="random",
        clean_tokens=clean,
        corrupt_tokens=corrupt,
        attention_mask=mask,
        answers=answers,
        wrong_answers=wrong,
        positions={"END": lengths - 1, extra_position: s_pos},
    )


def late_diff_task(model, *, seed: int = 0, n_answers: int = 1, n_wrong: int = 1) -> Task:
    """Clean and corrupt differ at ONE token per example, late and at a different index in
    each (S = length - 2 or - 3), so every early position is shared; k answers per example."""
    task = random_task(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 99)
    n, vocab = len(task), model.cfg.d_vocab
    s_pos = task.lengths - 2 - torch.arange(n) % 2
    corrupt = task.clean_tokens.clone()
    corrupt[torch.arange(n), s_pos] = (
        task.clean_tokens[torch.arange(n), s_pos] + torch.randint(1, vocab - 2, (n,), generator=gen)
    ) % (vocab - 1) + 1
    ids = torch.randperm(vocab - 1, generator=gen)[: n * (n_answers + n_wrong)] + 1
    ids = ids.reshape(n, n_answers + n_wrong)
    answers, wrong = ids[:, :n_answers], ids[:, n_answers:]
    return Task(
        name="late-diff",
        clean_tokens=task.clean_tokens,
        corrupt_tokens=corrupt,
        attention_mask=task.attention_mask,
        answers=answers if n_answers > 1 else answers[:, 0].clone(),
        wrong_answers=wrong if n_wrong > 1 else wrong[:, 0].clone(),
        positions={"END": task.positions["END"], "S": s_pos},
    )


def planted_task(
    model, *, n: int = 5, seq_len: int = 8, lengths=(8, 6, 7, 5, 8), seed: int = 0
) -> Task:
    """Clean prompts hold the answer token at S, corrupt ones the wrong answer; every other
    real token is shared. The planted circuit makes logit_diff(clean) > logit_diff(corrupt)."""
    gen = torch.Generator().manual_seed(seed)
    pad = model.tokenizer.pad_token_id
    vocab = model.cfg.d_vocab
    lengths = torch.tensor(lengths[:n])
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.randperm(vocab - 1, generator=gen)[: n * (seq_len + 2)].reshape(n, seq_len + 2) + 1
    clean, answers, wrong = (
        ids[:, :seq_len].clone(),
        ids[:, seq_len].clone(),
        ids[:, seq_len + 1].clone(),
    )
    s_pos = torch.stack([torch.randint(0, int(ln) - 1, (1,), generator=gen)[0] for ln in lengths])
    corrupt = clean.clone()
    clean[torch.arange(n), s_pos] = answers
    corrupt[torch.arange(n), s_pos] = wrong
    clean[mask == 0] = pad
    corrupt[mask == 0] = pad
    return Task(
        name="planted",
        clean_tokens=clean,
        corrupt_tokens=corrupt,
        attention_mask=mask,
        answers=answers,
        wrong_answers=wrong,
        positions={"END": lengths - 1, "S": s_pos},
    )


# --------------------------------------------------------------------------- reference runs


@torch.no_grad()
def run_metric(model, tokens, task: Task, hooks=()) -> torch.Tensor:
    """task.metric of one forward pass with the given (hook_name, fn) list, per example."""
    logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks))
    return task.metric(logits).float()


@torch.no_grad()
def cache_of(model, tokens, names=None) -> dict[str, torch.Tensor]:
    """Activations of one clean forward pass (only `names`, if given), cloned."""
    keep = None if names is None else set(names)
    _, cache = model.run_with_cache(
        tokens, names_filter=None if keep is None else (lambda name: name in keep)
    )
    return {name: cache[name].clone() for name in cache}


def copy_slice(act, source, component, column, pos, valid=None):
    """act with source copied into one column (head / kv head / whole layer), at every
    position (pos None) or at pos[b] of each example b where valid[b]."""
    out = act.clone()
    for b in range(act.shape[0]):
        if valid is not None and not bool(valid[b]):
            continue
        p = slice(None) if pos is None else int(pos[b])
        if component == "pattern":  # [batch, head, query, key]: the query row(s)
            out[b, column, p] = source[b, column, p]
        elif component in PER_LAYER:  # [batch, pos, d_model]
            out[b, p] = source[b, p]
        else:  # [batch, pos, head, d_head]
            out[b, p, column] = source[b, p, column]
    return out


def position_specs(task: Task, positions):
    """[(per-example index or None for all, valid mask or None)] and whether the grid has a
    position axis."""
    if positions == "all":
        return [(None, None)], False
    if positions == "each":
        n = len(task)
        return [(torch.full((n,), p), p < task.lengths) for p in range(task.seq_len)], True
    if isinstance(positions, str):
        return [(task.positions[positions], None)], False
    return [(task.positions[name], None) for name in positions], True


def ref_activation_patch(
    model, task: Task, component: str, positions="all", direction: str = "noise"
):
    """Per-example metric_patched - metric_clean: [batch, L, C] or [batch, L, P, C].

    noise: clean run with corrupt activations; denoise: corrupt run with clean activations.
    """
    base, source = (
        (task.clean_tokens, task.corrupt_tokens)
        if direction == "noise"
        else (task.corrupt_tokens, task.clean_tokens)
    )
    metric_clean = run_metric(model, task.clean_tokens, task)
    n_layers, n_col = model_shape(model).n_layers, n_columns(model, component)
    src_cache = cache_of(model, source, [hook_name(component, l) for l in range(n_layers)])
    specs, has_pos = position_specs(task, positions)
    out = torch.full((len(task), n_layers, len(specs), n_col), float("nan"))
    for layer in range(n_layers):
        name = hook_name(component, layer)
        for pi, (pos, valid) in enumerate(specs):
            for col in range(n_col):

                def hook(act, hook, name=name, col=col, pos=pos, valid=valid):
                    return copy_slice(act, src_cache[name], component, col, pos, valid)

                out[:, layer, pi, col] = (
                    run_metric(model, base, task, [(name, hook)]) - metric_clean
                )
    return out if has_pos else out[:, :, 0]


def ref_path_patch_one(
    model, task: Task, sender, receivers="logits", position="all", freeze_mlps=False, *, caches=None
):
    """Per-example metric - metric_clean for one sender head (Wang et al. path patching).

    Run A: clean tokens; every head's z frozen to its clean z except the sender, which takes its
    corrupt z at `position`; MLPs recompute or are frozen to clean. Logits: metric of run A.
    Receivers [(layer, head, 'q'|'k'|'v')]: their q (query head) / k, v (its KV head) are
    captured in run A and written into an otherwise normal clean run B.
    """
    shape = model_shape(model)
    clean_cache, corrupt_cache = caches or path_caches(model, task)
    metric_clean = run_metric(model, task.clean_tokens, task)
    s_layer, s_head = sender
    pos = None if position == "all" else task.positions[position]

    # hook.name is the bridge's canonical name (blocks.L.attn.o.hook_in for hook_z): bind ours.
    hooks_a = []
    for layer in range(shape.n_layers):
        zname, mname = hook_name("z", layer), hook_name("mlp_out", layer)

        def freeze_z(act, hook, layer=layer, zname=zname):
            new = clean_cache[zname].clone()
            if layer == s_layer:
                new = copy_slice(new, corrupt_cache[zname], "z", s_head, pos)
            return new

        hooks_a.append((zname, freeze_z))
        if freeze_mlps:
            hooks_a.append((mname, lambda act, hook, mname=mname: clean_cache[mname].clone()))

    if receivers == "logits":
        return run_metric(model, task.clean_tokens, task, hooks_a) - metric_clean

    def index_of(r):
        layer, head, inp = r
        return hook_name(inp, layer), (head if inp == "q" else head // shape.group_size)

    captured = {}
    for r in receivers:
        name, idx = index_of(r)

        def capture(act, hook, name=name, idx=idx):
            captured[(name, idx)] = act[:, :, idx].clone()
            return act

        hooks_a.append((name, capture))
    run_metric(model, task.clean_tokens, task, hooks_a)

    hooks_b = []
    for r in receivers:
        name, idx = index_of(r)

        def write(act, hook, name=name, idx=idx):
            new = act.clone()
            new[:, :, idx] = captured[(name, idx)]
            return new

        hooks_b.append((name, write))
    return run_metric(model, task.clean_tokens, task, hooks_b) - metric_clean


def path_caches(model, task: Task):
    """The clean and corrupt z and mlp_out path patching needs."""
    names = [hook_name(c, l) for c in ("z", "mlp_out") for l in range(model_shape(model).n_layers)]
    return cache_of(model, task.clean_tokens, names), cache_of(model, task.corrupt_tokens, names)


def ref_path_patch(
    model, task: Task, receivers="logits", senders=None, position="all", freeze_mlps=False
):
    """[batch, L, H] of ref_path_patch_one, NaN outside the senders. senders=None: every head
    below the lowest receiver layer (every head for logits)."""
    shape = model_shape(model)
    if senders is None:
        top = shape.n_layers if receivers == "logits" else min(r[0] for r in receivers)
        senders = [(l, h) for l in range(top) for h in range(shape.n_heads)]
    caches = path_caches(model, task)
    out = torch.full((len(task), shape.n_layers, shape.n_heads), float("nan"))
    for s in senders:
        out[:, s[0], s[1]] = ref_path_patch_one(
            model, task, s, receivers, position, freeze_mlps, caches=caches
        )
    return out


def ref_attribution(model, task: Task, component: str, direction: str = "noise"):
    """Per-example first-order estimate [batch, L, C]: (source_act - base_act) . d metric_b /
    d act at the base run (noise: base clean, source corrupt; denoise: the reverse).

    Computed as a directional derivative: the hooked activation becomes act + t * delta with a
    per-(example, column) scalar t = 0, and d metric / d t is read off t.grad. One layer per
    backward pass; act is the live tensor, so paths through later layers are kept.
    """
    base, source = (
        (task.clean_tokens, task.corrupt_tokens)
        if direction == "noise"
        else (task.corrupt_tokens, task.clean_tokens)
    )
    n_layers, n_col = model_shape(model).n_layers, n_columns(model, component)
    names = [hook_name(component, l) for l in range(n_layers)]
    base_cache, src_cache = cache_of(model, base, names), cache_of(model, source, names)
    out = torch.zeros(len(task), n_layers, n_col)
    for layer in range(n_layers):
        name = hook_name(component, layer)
        delta = src_cache[name] - base_cache[name]
        t = torch.zeros(len(task), n_col, requires_grad=True)
        if component == "pattern":
            t_b = t[:, :, None, None]
        elif component in PER_LAYER:
            t_b = t[:, :, None]  # [batch, 1, 1] against [batch, pos, d_model]
        else:
            t_b = t[:, None, :, None]

        def hook(act, hook, t_b=t_b, delta=delta):
            return act + t_b * delta

        with torch.enable_grad():
            logits = model.run_with_hooks(base, fwd_hooks=[(name, hook)])
            task.metric(logits).float().sum().backward()
        out[:, layer] = t.grad
    return out


@torch.no_grad()
def ref_direct_effect(model, task: Task, layer: int, head: int, position="all"):
    """Per-example metric change when only head (layer, head)'s output at `position` moves
    from clean to corrupt and nothing downstream reacts but the final norm: logits =
    unembed(final_norm(resid_clean + (z_corrupt - z_clean)[head] @ W_O[head])), from the
    HF weights, with the norm written out by hand."""
    shape = model_shape(model)
    dh = shape.d_head
    names = [hook_name("z", layer), f"blocks.{shape.n_layers - 1}.hook_resid_post"]
    clean_cache = cache_of(model, task.clean_tokens, names)
    corrupt_cache = cache_of(model, task.corrupt_tokens, names)
    hf = model.original_model
    gemma = type(hf).__name__.startswith("Gemma3")
    if hasattr(hf, "transformer"):  # GPT-2: Conv1D weight is [in, out]
        w_o = hf.transformer.h[layer].attn.c_proj.weight[head * dh : (head + 1) * dh, :]
        ln = hf.transformer.ln_f.original_component

        def norm(x):
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    elif not gemma:  # Llama: Linear weight is [out, in]
        w_o = hf.model.layers[layer].self_attn.o_proj.weight[:, head * dh : (head + 1) * dh].T
        ln = hf.model.norm.original_component

        def norm(x):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight
    else:  # Gemma 3: norms scale by (1 + w); the attention branch is normalised before it is added
        o_proj = hf.model.layers[layer].self_attn.o_proj.weight
        w_o = o_proj[:, head * dh : (head + 1) * dh].T
        post = _raw_module(hf.model.layers[layer].post_attention_layernorm)
        ln = _raw_module(hf.model.norm)

        def gemma_norm(x, m):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * (1.0 + m.weight)

        def norm(x):
            return gemma_norm(x, ln)

    unembed = hf.lm_head.original_component
    zname = hook_name("z", layer)
    dz = corrupt_cache[zname][:, :, head] - clean_cache[zname][:, :, head]  # [batch, pos, d_head]
    if position != "all":
        keep = torch.zeros_like(dz)
        idx = task.positions[position]
        for b in range(len(task)):
            keep[b, int(idx[b])] = 1.0
        dz = dz * keep
    resid = clean_cache[f"blocks.{shape.n_layers - 1}.hook_resid_post"]
    if gemma:  # the head's change reaches the residual through its layer's post-attention norm
        z_all = clean_cache[zname].flatten(2)  # [batch, pos, heads * d_head]
        moved = z_all.clone()
        moved[:, :, head * dh : (head + 1) * dh] += dz
        branch_delta = gemma_norm(moved @ o_proj.T, post) - gemma_norm(z_all @ o_proj.T, post)

    def logits_of(x):
        out = norm(x) @ unembed.weight.T
        out = out + unembed.bias if unembed.bias is not None else out
        cap = getattr(hf.config, "final_logit_softcapping", None)
        return torch.tanh(out / cap) * cap if cap else out

    clean_logits = logits_of(resid)
    patched_logits = logits_of(resid + (branch_delta if gemma else dz @ w_o))
    return task.metric(patched_logits) - task.metric(clean_logits)


def _raw_module(module):
    """The HF module under a bridge component (or the module itself)."""
    return getattr(module, "original_component", module)
