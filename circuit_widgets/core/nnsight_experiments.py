"""Circuit evaluation and cross-model patching on nnsight-served models.

The ablator that ``evaluation``'s ``mean_ablate``, ``faithfulness``, ``completeness`` and
``minimality`` use on an nnsight model (``make_ablator``): the means come from one capture
request per chunk of the reference set (every layer's z in one trace); the circuits to score
then travel as extra batch rows, so a whole faithfulness run (the full model, the circuit and
``n_random`` random circuits) costs ceil((n_random + 2) x examples / 512) requests after the
means.
The requests of ``cmap`` / ``cmap_grid`` (both models nnsight-served; the core's sweep sends
them through ``backends.NNsightBackend``): one captures the fine-tuned model's activations,
then the base model runs with them written in, the patched cells (or groups) as extra batch
rows: a full grid costs at most 1 + n_layers requests, ``cmap`` 2 per batch of examples.
Inside a trace only torch and nnsight run, so NDIF never imports this package; the values
that travel are plain tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.core.nnsight_backend import (
    DEFAULT_ROWS,
    _capture_request,
    _recv_site,
    _where,
    is_nnsight,
)
from circuit_widgets.types import Component

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

# the order a forward reaches a layer's sites: q, k, v projections, then o_proj's input (z)
_SITE_ORDER = {"q": 0, "k": 1, "v": 2, "z": 3}


def _fail(exc: BaseException, partial: Any = None) -> Any:
    from circuit_widgets.nnsight_model import RemoteError, request_error

    err = exc if isinstance(exc, RemoteError) else request_error(exc)
    err.partial = partial
    return err


# ---------------------------------------------------------------------- reading END logits


class _Readout:
    """The task's metric, accuracy and candidate accuracy from a request's compact readout:
    END logits at the answer/wrong-answer columns, the argmax and the log-sum-exp (a request
    returns these, never [rows, vocab])."""

    def __init__(self, task: Task) -> None:
        self.task = task
        ids = torch.cat([task.answers.reshape(-1), task.wrong_answers.reshape(-1)]).cpu()
        self.cols = torch.unique(ids)
        remap = lambda t: torch.searchsorted(self.cols, t.cpu().contiguous())
        self.ans = remap(task.answers)
        self.wrong = remap(task.wrong_answers)

    def scores(self, out: tuple, examples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(metric, accuracy, candidate accuracy) per row; row r is example examples[r]."""
        sub, top, lse = (t.detach().cpu() for t in out)
        sub = sub.float()
        pick = lambda ids: ids[examples] if ids.dim() == 2 else ids[examples][:, None]
        a, w = sub.gather(1, pick(self.ans)), sub.gather(1, pick(self.wrong))
        answers = pick(self.task.answers.cpu())
        acc = (top[:, None] == answers).any(-1).float()
        cand = (a.max(1).values > w.max(1).values).float()
        name = self.task.metric_name
        if name == "logit_diff":
            metric = a.mean(1) - w.mean(1)
        elif name == "accuracy":
            metric = acc
        elif name == "candidate_accuracy":
            metric = cand
        else:  # prob: the answers' share of the softmax over the whole vocabulary
            metric = (a - lse.float()[:, None]).exp().sum(1)
        return metric, acc, cand


# ---------------------------------------------------------------------- mean ablation


def make_ablator(
    model: Any, task: Task, reference_task: Task | None, reference: str, batch_size, means, mem
) -> Any:
    """The ablator ``evaluation``'s mean_ablate, faithfulness, completeness and minimality use
    on an nnsight model: an ``_Ablator`` whose scoring runs every circuit it is asked for
    (``prefetch``) as extra batch rows, in as few requests as the rows allow."""
    from circuit_widgets.core import evaluation as circuits

    parent: Any = circuits._Ablator

    class NNAblator(parent):
        def __init__(self, *args: Any) -> None:
            # id -> (circuit, scores): the circuit is kept, so its id cannot be reused meanwhile
            self._cached: dict[int, tuple] = {}
            self.n_requests = 0
            start = model.requests
            super().__init__(*args)  # takes the means: capture requests
            self.means_requests = model.requests - start

        def _means(self, ref: Any, tokens: Tensor) -> list[Tensor]:
            """As _Ablator._means, but each request sums z per class on the server: it returns
            [classes, H x d_head] per layer, not every token's z."""
            L, H, dh = self.shape.n_layers, self.shape.n_heads, self.shape.d_head
            C = len(self.classes)
            sums = torch.zeros(L, C, H * dh, dtype=torch.float64)
            counts = torch.zeros(C, dtype=torch.float64)
            cls_all = self._class_map(ref, True)
            for sl in self._chunks(ref):
                keep = int(ref.attention_mask[sl].sum(-1).max())
                cls = cls_all[sl, :keep].reshape(-1)
                real = cls >= 0
                onehot = torch.zeros(cls.shape[0], C, dtype=torch.float64)
                onehot[real.nonzero().flatten(), cls[real]] = 1.0
                counts += onehot.sum(0)
                try:
                    parts = _class_sums_request(self.model, tokens[sl, :keep].cpu(), onehot.T)
                except Exception as exc:
                    raise _fail(exc) from exc
                for layer, part in enumerate(parts):
                    sums[layer] += part.detach().cpu().double()
            sums = sums.view(L, C, H, dh)
            overall = sums.sum(1) / counts.sum()
            means = sums / counts.clamp(min=1)[None, :, None, None]
            empty = (counts == 0).nonzero().flatten().tolist()
            for c in empty:
                means[:, c] = overall
            start = circuits.START
            names = [
                self.classes[c] for c in empty if self.classes[c] not in (start, *self.missing)
            ]
            if names:
                self.notes.append(
                    f"no reference tokens in classes {names}: they use the mean over all real "
                    "tokens"
                )
            return [m.float() for m in means]

        def _chunks(self, task: Task) -> list[slice]:
            # requests are sized by rows, not by this machine's memory (NDIF holds the model)
            n = len(task)
            size = self.batch_size or max(n, 1)
            return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]

        def scores(self, circuit: Any) -> Any:
            if circuit is None and self._full is not None:
                return self._full
            if id(circuit) not in self._cached:
                self.prefetch([circuit])
            return self._cached[id(circuit)][1]

        def prefetch(self, circs: list) -> None:
            """Score every circuit (None = the unablated model), several per request."""
            todo = list({id(c): c for c in circs if id(c) not in self._cached}.values())
            if not todo:
                return
            task = self.task
            cls_all = self._class_map(task, False)
            H, dh = self.shape.n_heads, self.shape.d_head
            readout = _Readout(task)
            tables = [m.reshape(m.shape[0], H * dh) for m in self.means]
            parts: dict[int, list[list[Tensor]]] = {id(c): [[], [], []] for c in todo}
            for sl in self._chunks(task):
                idx = torch.arange(len(task))[sl]
                sub = task.subset(idx)
                b, s = sub.clean_tokens.shape
                cls = cls_all[sl, :s]
                cls = torch.where(cls < 0, torch.ones_like(cls), cls)
                per_req = max(1, DEFAULT_ROWS // max(b, 1))  # circuits per request
                for start in range(0, len(todo), per_req):
                    group = todo[start : start + per_req]
                    keeps: dict[int, Tensor] = {}
                    for v, c in enumerate(group):
                        if c is None:
                            continue
                        for layer, k in self._keep(c, task, sl, s).items():
                            full = keeps.setdefault(
                                layer, torch.ones(len(group) * b, s, H, dtype=torch.bool)
                            )
                            full[v * b : (v + 1) * b] = k
                    try:
                        out = _ablate_request(
                            self.model,
                            sub.clean_tokens,
                            sub.positions["END"].cpu(),
                            keeps,
                            tables,
                            cls,
                            len(group),
                            dh,
                            readout.cols,
                        )
                    except Exception as exc:
                        raise _fail(exc) from exc
                    self.n_requests += 1
                    m, a, ca = readout.scores(out, idx.repeat(len(group)))
                    for v, c in enumerate(group):
                        rows = slice(v * b, (v + 1) * b)
                        for j, t in enumerate((m, a, ca)):
                            parts[id(c)][j].append(t[rows])
            for c in todo:
                m, a, ca = (torch.cat(p) for p in parts[id(c)])
                res = (m, a, ca)
                self._cached[id(c)] = (c, res)
                if c is None:
                    self._full = res

        def request_notes(self) -> list[str]:
            return [_requests_note(model, self)]

    return NNAblator(model, task, reference_task, reference, batch_size, means, mem)


def _class_sums_request(nm: Any, tokens: Tensor, onehot_t: Tensor) -> list:
    """One trace: per layer, z summed per class over the batch's tokens ([classes, H x d_head],
    float64); ``onehot_t`` is [classes, tokens] (0 on padding)."""
    lm = nm.lm
    sites = [nm.z_site(layer) for layer in range(nm.cfg.n_layers)]
    from nnsight import save

    with torch.no_grad(), lm.trace(tokens, backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        out = save([])
        for i in range(len(sites)):
            z = sites[i].input
            flat = z.reshape(-1, z.shape[-1]).double()
            out.append((onehot_t.to(z.device) @ flat).save())
    return out


def _ablate_request(
    nm: Any,
    tokens: Tensor,
    end: Tensor,
    keeps: dict[int, Tensor],
    tables: list[Tensor],
    cls: Tensor,
    n: int,
    dh: int,
    cols: Tensor,
) -> tuple:
    """One trace: ``n`` copies of the batch; copy v's z keeps its own value where keeps says,
    its class mean (``tables[layer][cls]``) elsewhere; returns the compact END readout."""
    b = tokens.shape[0]
    inp = tokens.repeat(n, 1)
    rows = torch.arange(n * b)
    end_rows = end.repeat(n)
    layers = sorted(keeps)
    sites = [nm.z_site(layer) for layer in layers]
    masks = [keeps[layer] for layer in layers]
    means = [tables[layer] for layer in layers]
    lm = nm.lm
    with torch.no_grad(), lm.trace(inp, backend=nm.backend()):
        for i in range(len(sites)):
            x = sites[i].input
            # tensors sent along live on the CPU; NDIF runs the model on GPUs
            mean = means[i][cls].repeat(n, 1, 1).to(x.device, x.dtype)
            keep = masks[i].repeat_interleave(dh, dim=-1).to(x.device)
            sites[i].input = torch.where(keep, x, mean)
        # the compact readout, written out here: code inside a trace must not call ours
        logits = lm.output.logits[rows, end_rows]
        sub = logits[:, cols].save()
        top = logits.argmax(-1).save()
        lse = logits.float().logsumexp(-1).save()
    return sub, top, lse


def _requests_note(model: Any, abl: Any) -> str:
    total = abl.means_requests + abl.n_requests
    return (
        f"nnsight ({_where(model)}): {total} request(s): {abl.means_requests} for the means, "
        f"{abl.n_requests} scoring"
    )


# ---------------------------------------------------------------------- cross-model patching

CMAP_COMPONENTS = (Component.Z, Component.Q, Component.K, Component.V)


def check_pair(where: str, base: Any, finetuned: Any) -> None:
    """Both models nnsight-served and alike (the cmap module's checks, read off the configs);
    ValueError naming every difference otherwise."""
    if not (is_nnsight(base) and is_nnsight(finetuned)):
        kinds = [
            f"{label} is {'nnsight-served' if is_nnsight(m) else type(m).__name__}"
            for label, m in (("base", base), ("finetuned", finetuned))
        ]
        raise ValueError(
            f"{where} on the nnsight backend needs both models served through nnsight "
            f"(load_model(..., backend='nnsight')); {', '.join(kinds)}"
        )
    from circuit_widgets.core import cross_model as cm

    a, b = base.cfg, finetuned.cfg
    diffs = [
        f"{name}: base {getattr(a, name)}, finetuned {getattr(b, name)}"
        for name in (
            "architecture",
            "n_layers",
            "n_heads",
            "n_key_value_heads",
            "d_head",
            "d_model",
            "d_vocab",
            "default_prepend_bos",
        )
        if getattr(a, name) != getattr(b, name)
    ]
    diffs += cm._tokenizer_diffs(base, finetuned)
    if diffs:
        raise ValueError(
            "base and finetuned models are not compatible for cross-model patching: "
            + "; ".join(diffs)
        )


def check_components(comps: list) -> None:
    bad = [c.value for c in comps if c not in CMAP_COMPONENTS]
    if bad:
        raise NotImplementedError(
            f"cross-model patching of {bad} is not available on the nnsight backend yet "
            "(a transformers block's attention/MLP output is not TransformerLens's attn_out/"
            "mlp_out on every architecture); use z, q, k or v"
        )


def _width(nm: Any, site: str) -> int:
    heads = nm.cfg.n_key_value_heads if site in ("k", "v") else nm.cfg.n_heads
    return heads * nm.cfg.d_head


def _envoy(nm: Any, layer: int, site: str) -> tuple[Any, bool, int]:
    """(module envoy, True if the activation is its input, column offset of head 0)."""
    if site == "z":
        return nm.z_site(layer), True, 0
    env, off = _recv_site(nm, layer, site)
    return env, False, off


def _capture_ft(ft: Any, tokens: Tensor, keys: list, end: Tensor) -> tuple[Tensor, dict]:
    """One request: the fine-tuned model's END logits and its activations at ``keys``, each
    [b, s, width] (heads concatenated)."""
    order = forward_order(keys)
    logits, raw = _capture_request(ft, tokens.cpu(), order, end)
    acts = {k: t.detach().reshape(t.shape[0], t.shape[1], -1).cpu() for k, t in zip(order, raw)}
    return logits.detach().float().cpu(), acts


def _capture_layers(
    ft: Any, tokens: Tensor, site: str, end: Tensor, at: Tensor | None
) -> tuple[Tensor, list]:
    """One request: the fine-tuned model's END logits and ``site`` at every layer, [b, s, w],
    or at one position per example ([b, w]: the only values a one-position grid uses)."""
    nm = ft
    L = nm.cfg.n_layers
    w = _width(nm, site)
    plan = [_envoy(nm, layer, site) for layer in range(L)]
    ar = torch.arange(tokens.shape[0])
    rows = ar if at is None else at
    lm = nm.lm
    from nnsight import save

    with torch.no_grad(), lm.trace(tokens.cpu(), backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        out = save([])
        for env, as_input, off in plan:
            x = env.input if as_input else env.output
            x = x[:, :, off : off + w]
            if at is not None:
                x = x[ar, rows]
            out.append(x.save())
        logits = lm.output.logits[ar, end].save()
    return logits.detach().float().cpu(), [t.detach().cpu() for t in out]


def _cross_request(
    nm: Any, inp: Tensor, end_rows: Tensor, plan: list, cols: Tensor, dh: int
) -> tuple:
    """One trace of the base model on ``inp``; ``plan`` lists, in forward order, (envoy, is
    input, [(rows from, rows to, column from, column to, source [rows, s, w], mask [rows, s,
    heads], None)]): the source is written where the mask holds; or (..., source [rows, w],
    None, position [rows]): written at each row's position. Returns the compact END readout."""
    rows = torch.arange(inp.shape[0])
    lm = nm.lm
    with torch.no_grad(), lm.trace(inp, backend=nm.backend()):
        for env, as_input, spans in plan:
            x = env.input if as_input else env.output
            new = x.clone()
            for r0, r1, a, b, src, mask, at in spans:
                if at is None:
                    keep = mask.repeat_interleave(dh, dim=-1).to(x.device)
                    new[r0:r1, :, a:b] = torch.where(
                        keep, src.to(x.device, x.dtype), x[r0:r1, :, a:b]
                    )
                else:  # one position per row: src is [rows, w]
                    idx = torch.arange(r0, r1).to(x.device)
                    new[idx, at.to(x.device), a:b] = src.to(x.device, x.dtype)
            if as_input:
                env.input = new
            else:
                env.output = new
        logits = lm.output.logits[rows, end_rows]
        sub = logits[:, cols].save()
        top = logits.argmax(-1).save()
        lse = logits.float().logsumexp(-1).save()
    return sub, top, lse


# ---------------------------------------------------------------------- attribution

GRAD_METRICS = ("logit_diff", "prob")


def _grad_request(
    nm: Any,
    src_tokens: Tensor,
    base_tokens: Tensor,
    end: Tensor,
    sites: list,
    mlps: list,
    frozen: bool,
    cols: Tensor,
    ans: Tensor,
    wrong: Tensor,
    metric_name: str,
    n_cols: int,
    dh: int,
) -> tuple[tuple, list]:
    """One trace: rows [source | base]; the metric at the base rows (written out in torch: the
    server runs no code of ours) differentiated w.r.t. each layer's activation. Returns the
    compact END readout and, per layer, (source - base) . grad as [b, s, columns]."""
    b = base_tokens.shape[0]
    inp = torch.cat([src_tokens, base_tokens])
    rows = torch.arange(2 * b)
    end_rows = end.repeat(2)
    ans2 = ans if ans.dim() == 2 else ans[:, None]
    wrong2 = wrong if wrong.dim() == 2 else wrong[:, None]
    prob = metric_name == "prob"
    lm = nm.lm
    from nnsight import save

    with lm.trace(inp, backend=nm.backend()):
        # built and saved in the block: NDIF sends back only the block's saved variables
        contribs = save([])
        acts = []
        for i in range(len(sites)):
            env, as_input, off = sites[i]
            x = env.input if as_input else env.output
            if (
                frozen
            ):  # a leaf of its own: the gradient reaches it only along path patching's paths
                x = x.detach().requires_grad_(True)
                env.input = x
            else:
                x.requires_grad_(True)
            acts.append((x, off))
            if mlps:
                mlps[i].output = mlps[i].output.detach()
        logits = lm.output.logits
        final = logits[rows, end_rows]
        sub = final[:, cols].save()
        top = final.argmax(-1).save()
        lse = final.float().logsumexp(-1).save()
        fin = final[b:].float()
        a = fin[:, cols].gather(1, ans2.to(fin.device))
        w = fin[:, cols].gather(1, wrong2.to(fin.device))
        if prob:
            metric = (a - fin.logsumexp(-1)[:, None]).exp().sum(1)
        else:
            metric = a.mean(1) - w.mean(1)
        # autograd.grad, not ``with loss.backward()``: NDIF's local simulation recompiles the
        # block from its own source, and a nested with-block is then looked up at a wrong line
        grads = torch.autograd.grad(metric.sum(), [x for x, _ in acts])
        for j in range(len(acts)):
            x, off = acts[j]
            g = grads[j][b:, :, off : off + n_cols * dh]
            xs = x[:, :, off : off + n_cols * dh].detach()
            c = ((xs[:b] - xs[b:]) * g).reshape(b, g.shape[1], n_cols, dh).sum(-1)
            contribs.append(c.save())
    return (sub, top, lse), contribs


# the names backends.NNsightBackend uses (attribution, cmap and cmap_grid run the core's loop)
Readout = _Readout
grad_request = _grad_request
envoy = _envoy
cross_request = _cross_request
capture_layers = _capture_layers
capture_ft = _capture_ft
width = _width


def forward_order(keys: list) -> list:
    """(layer, site) keys in the order the forward reaches them (an nnsight trace's order)."""
    return sorted(keys, key=lambda k: (k[0], _SITE_ORDER[k[1]]))
