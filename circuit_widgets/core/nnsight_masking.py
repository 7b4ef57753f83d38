"""DCM (``dcm`` / ``dcm_sweep``) on an nnsight-served model, the mask trained server-side.

A run is a few requests, each one nnsight session:

1. the source prompts' z at the position, per trained head (every split, ``batch_size`` rows
   a forward), and the test split's accuracy with no head patched and with every trained head
   patched; the source z travel back ([examples, heads, d_head] per layer);
2. per lambda, the whole training loop: the mask is a leaf tensor created in the session, each
   step is one trace whose loss is differentiated w.r.t. the mask only (``torch.autograd.grad``
   inside the trace), then Adam steps and clamps it in the session; the rounded mask is checked
   on the validation split at the same steps as the fast engine, the best check is kept, and
   its train and test accuracies are measured before the session ends.

So ``dcm`` costs 2 requests and ``dcm_sweep`` 1 + len(lams), whatever the epochs. Progress
advances per request and ``should_stop`` is asked between requests: a stopped sweep keeps the
lambdas it finished, a stopped ``dcm`` returns ``complete=False`` with the reference
accuracies when the first request finished. A failed request raises ``RemoteError`` (one
sentence) whose ``partial`` holds the result so far. Code inside a session runs only torch
and nnsight (NDIF never imports this package); the values that travel are plain tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.core.common import Progress, Stop
from circuit_widgets.core.nnsight_backend import _where
from circuit_widgets.core.nnsight_experiments import _fail

if TYPE_CHECKING:
    from circuit_widgets.core.masking import MaskResult, SweepResult


def _masking() -> Any:
    from circuit_widgets.core import masking

    return masking


def dcm(
    model: Any,
    plan: Any,
    lam: float,
    settings: tuple[int, float, int, int | None],
    on_progress: Progress,
    should_stop: Stop,
) -> MaskResult:
    """``masking.dcm``'s run on an nnsight model, its arguments checked and ``plan`` built
    there: 2 requests (the source activations and reference accuracies, then the whole
    training loop in one session). ``settings``: (epochs, lr, seed, eval_every)."""
    M = _masking()
    run = _Run(model, plan, on_progress, should_stop, total=2)
    # weights frozen here as on a local model: autograd then keeps no inputs for their gradients
    with M._frozen(model.lm._module):
        if not run.prepare():
            return run.unfinished(lam, *settings)
        if run.stop_requested():
            return run.unfinished(lam, *settings)
        try:
            result = run.train(lam, *settings)
        except Exception as exc:
            err = _fail(exc)
            err.partial = run.unfinished(lam, *settings, extra=[str(err)])
            raise err from exc
    return result


def dcm_sweep(
    model: Any,
    plan: Any,
    lams: list[float],
    settings: tuple[int, float, int, int | None],
    on_progress: Progress,
    should_stop: Stop,
    on_result: Callable[[MaskResult], None] | None,
) -> SweepResult:
    """``masking.dcm_sweep``'s run on an nnsight model, its arguments checked and ``plan``
    built there: one request for the source activations and reference accuracies, then one
    session per lambda (1 + len(lams) requests)."""
    M = _masking()
    run = _Run(model, plan, on_progress, should_stop, total=1 + len(lams))
    results: list[MaskResult] = []

    def sweep(complete: bool) -> SweepResult:
        return M.SweepResult(lams, list(results), run.base, run.full, complete)

    with M._frozen(model.lm._module):
        if run.prepare():
            _sweep_lams(run, lams, results, sweep, on_result, settings)
    return sweep(len(results) == len(lams) and not run.stopped)


def _sweep_lams(
    run: _Run,
    lams: list[float],
    results: list[MaskResult],
    sweep: Callable[[bool], SweepResult],
    on_result: Callable[[MaskResult], None] | None,
    settings: tuple[int, float, int, int | None],
) -> None:
    """Train each lambda in turn (one request each) until stopped; a failed request raises
    with the sweep so far."""
    epochs, lr, seed, eval_every = settings
    for each in lams:
        if run.stop_requested():
            break
        try:
            results.append(run.train(each, epochs, lr, seed, eval_every))
        except Exception as exc:
            err = _fail(exc)
            err.partial = sweep(False)
            raise err from exc
        if on_result is not None:
            on_result(results[-1])


class _Run:
    """A plan (split, heads, positions) and what its requests have returned so far."""

    def __init__(self, nm: Any, plan: Any, on_progress: Progress, should_stop: Stop, total: int):
        self.nm, self.plan = nm, plan
        self.on_progress, self.should_stop = on_progress, should_stop
        self.total, self.done, self.stopped = total, 0, False
        self.base = self.full = math.nan
        self.src: list[list[Tensor]] | None = None  # per part, per trained layer [n, k_l, dh]
        cfg = nm.cfg
        self.H, self.dh = int(cfg.n_heads), int(cfg.d_head)
        self.sites = [nm.z_site(layer) for layer in plan.layers]
        self.cols = [plan.cols[layer].cpu()[None] for layer in plan.layers]
        self.slots = [plan.slots[layer].cpu() for layer in plan.layers]
        self.parts = [part.d.to("cpu") for part in plan.parts]
        self.sizes = [len(d) for d in self.parts]
        # per part, the fast engine's evaluation batches as ready-made trace inputs
        self.evals = [[self.job(d, r.cpu()) for r in plan._ranges(len(d))] for d in self.parts]

    def job(self, d: Any, rows: Tensor) -> tuple:
        """One trace's inputs for base prompts ``rows`` of ``d``: tokens (trimmed of padding
        no row needs), row index [b, 1], position [b, 1], END [b], targets [b], rows."""
        pos, end = d.base_positions[self.plan.position][rows], d.base_positions["END"][rows]
        w = int(torch.maximum(pos, end).max()) + 1
        ar = torch.arange(len(rows))[:, None]
        return d.base_tokens[rows, :w], ar, pos[:, None], end, d.targets[rows], rows

    def source_jobs(self, d: Any) -> list[tuple]:
        """Per evaluation batch: source tokens (trimmed), row index [b, 1], position [b, 1]."""
        out = []
        for rows in self.plan._ranges(len(d)):
            pos, end = d.source_positions[self.plan.position][rows], d.source_positions["END"]
            w = int(torch.maximum(pos, end[rows]).max()) + 1
            out.append((d.source_tokens[rows, :w], torch.arange(len(rows))[:, None], pos[:, None]))
        return out

    def stop_requested(self) -> bool:
        if not self.stopped and self.should_stop is not None and self.should_stop():
            self.stopped = True
        return self.stopped

    def _tick(self) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def note(self) -> str:
        return (
            f"nnsight ({_where(self.nm)}): {self.done} request(s): 1 for the source activations "
            "and reference accuracies, then 1 per lambda (its whole training loop in one "
            "session, the gradient taken w.r.t. the mask only)"
        )

    # ---- request 1

    def prepare(self) -> bool:
        """Source z and reference accuracies (one request). False if stopped before it."""
        if self.stop_requested():
            return False
        try:
            src, counts = _prepare_request(
                self.nm, [self.source_jobs(d) for d in self.parts], self.evals[2], self.sites,
                self.cols, self.slots, len(self.plan.heads), self.H, self.dh,
            )  # fmt: skip
        except Exception as exc:
            raise _fail(exc) from exc
        self.src = [[t.detach().cpu() for t in part] for part in src]
        base, full = counts.tolist()
        self.base, self.full = int(base) / self.sizes[2], int(full) / self.sizes[2]
        self._tick()
        return True

    # ---- one request per lambda

    def train(
        self, lam: float, epochs: int, lr: float, seed: int, eval_every: int | None
    ) -> MaskResult:
        M, plan = _masking(), self.plan
        assert self.src is not None
        n_train, bs = self.sizes[0], plan.bs
        gen = torch.Generator().manual_seed(seed)
        steps, epoch_of = [], []
        for epoch in range(epochs):  # the fast engine's batch order for this seed
            order = torch.randperm(n_train, generator=gen)
            for a in range(0, n_train, bs):
                steps.append(self.job(self.parts[0], order[a : a + bs]))
                epoch_of.append(epoch)
        when = set(plan.eval_steps(epochs, eval_every))
        checks = [s + 1 in when for s in range(len(steps))]
        out = _train_request(
            self.nm, steps, checks, self.evals, self.src, self.sites, self.cols, self.slots,
            len(plan.heads), self.H, self.dh, lam, lr, self.sizes[1],
        )  # fmt: skip
        self._tick()
        masks, losses, logits, val, best, accs = (t.detach().cpu() for t in out)
        n_tr, n_val, n_te = self.sizes
        val_acc = [int(h) / n_val for h in val[:, 0].tolist()]
        val_loss = [-(t / n_val) + lam * z for t, z in val[:, 1:].tolist()]
        best_i = int(best)
        kept = masks[best_i] if best_i >= 0 else masks[-1]
        rounded = (kept >= 0.5).float()
        step = torch.arange(1, len(steps) + 1)
        return M.MaskResult(
            mask=plan._grid(kept),
            final_mask=plan._grid(masks[-1]),
            heads=list(plan.heads),
            selected=[h for h, r in zip(plan.heads, rounded.tolist()) if r == 0.0],
            position=plan.position,
            desideratum=plan.name,
            lam=lam,
            train_accuracy=int(accs[0]) / n_tr,
            val_accuracy=val_acc[sum(checks[: best_i + 1]) - 1] if best_i >= 0 else math.nan,
            test_accuracy=int(accs[1]) / n_te,
            baseline_accuracy=self.base,
            full_patch_accuracy=self.full,
            curve=M.TrainingCurve(
                step=step,
                epoch=torch.tensor(epoch_of, dtype=torch.long),
                loss=losses.float(),
                target_logit=logits.float(),
                mask_size=(1 - masks).sum(1).float(),
                n_selected=(masks < 0.5).sum(1).long(),
                val_step=step[torch.tensor(checks, dtype=torch.bool)],
                val_accuracy=torch.tensor(val_acc),
                val_loss=torch.tensor(val_loss),
            ),
            best_step=best_i + 1 if best_i >= 0 else len(steps),
            n_examples=tuple(self.sizes),
            complete=True,
            settings=plan.settings(lr, epochs, seed, eval_every),
            notes=[self.note()],
        )

    def unfinished(
        self,
        lam: float,
        epochs: int,
        lr: float,
        seed: int,
        eval_every: int | None,
        extra: Sequence[str] = (),
    ) -> MaskResult:
        """A run stopped (or failed) before its mask was trained."""
        r = self.plan.unfinished(lam, epochs, lr, seed, eval_every)
        return replace(
            r,
            baseline_accuracy=self.base,
            full_patch_accuracy=self.full,
            notes=[self.note(), *r.notes, *extra],
        )


# ---------------------------------------------------------------------- the requests
# A session body runs as plain Python (loops, Adam steps) with only torch and nnsight. It must
# keep one statement per line, with no comments or blank lines: it travels as ast.unparse'd
# source, and NDIF's local simulation finds each nested trace by a line number of that text
# in the original file, so any line the unparse drops shifts every later trace off its `with`.


def _prepare_request(
    nm: Any,
    src_jobs: list[list[tuple]],
    test_jobs: list[tuple],
    sites: list,
    cols: list[Tensor],
    slots: list[Tensor],
    k: int,
    H: int,
    dh: int,
) -> tuple[list[list[Tensor]], Tensor]:
    """One session: per part and trained layer, the source z at the position [n, k_l, dh];
    then the test split's correct predictions with every mask 1 (no patch) and 0 (all heads
    patched) [2]."""
    from nnsight import save

    lm, n = nm.lm, len(sites)
    with lm.session(backend=nm.backend()):
        srcs = []
        for p in range(len(src_jobs)):
            got: list[list[Tensor]] = [[] for _ in range(n)]
            for tok, r, sp in src_jobs[p]:
                with torch.no_grad(), lm.trace(tok):
                    for i in range(n):
                        z = sites[i].input
                        zz, dev = z.reshape(z.shape[0], z.shape[1], H, dh), z.device
                        got[i].append(zz[r.to(dev), sp.to(dev), cols[i].to(dev)].detach())
            srcs.append([torch.cat(g).cpu() for g in got])
        counts = []
        for mk in (torch.ones(k), torch.zeros(k)):
            hits = 0
            for tok, r, bp, end, tgt, rows in test_jobs:
                with torch.no_grad(), lm.trace(tok):
                    for i in range(n):
                        z = sites[i].input
                        zz, dev = z.reshape(z.shape[0], z.shape[1], H, dh), z.device
                        at = (r.to(dev), bp.to(dev), cols[i].to(dev))
                        m = mk[slots[i]].to(dev, z.dtype)[None, :, None]
                        new = m * zz[at] + (1 - m) * srcs[2][i][rows].to(dev, z.dtype)
                        sites[i].input = zz.index_put(at, new).reshape(z.shape)
                    final = lm.output.logits[r[:, 0], end]
                    hit = final.argmax(-1) == tgt.to(final.device)
                hits += int(hit.sum())
            counts.append(hits)
        out = save(srcs)
        refs = save(torch.tensor(counts))
    return out, refs


def _train_request(
    nm: Any,
    steps: list[tuple],
    checks: list[bool],
    evals: list[list[tuple]],
    src: list[list[Tensor]],
    sites: list,
    cols: list[Tensor],
    slots: list[Tensor],
    k: int,
    H: int,
    dh: int,
    lam: float,
    lr: float,
    n_val: int,
) -> tuple:
    """One session: DCM's whole training loop (see the module docstring). Returns the mask
    after every step [steps, k], the loss and mean target logit per step, per check (correct
    predictions, summed target logit, sum(1 - rounded)) [checks, 3], the kept step's index
    (-1: none) and the kept mask's correct predictions on train and test [2]."""
    from nnsight import save

    lm, n = nm.lm, len(sites)
    with lm.session(backend=nm.backend()):
        mask = torch.ones(k, requires_grad=True)
        opt = torch.optim.Adam([mask], lr=lr)
        masks, losses, means, vals = [], [], [], []
        best_key, best_i = (float("-inf"), float("-inf")), -1
        for s in range(len(steps)):
            tok, r, bp, end, tgt, rows = steps[s]
            with lm.trace(tok):
                for i in range(n):
                    z = sites[i].input
                    zz, dev = z.reshape(z.shape[0], z.shape[1], H, dh), z.device
                    at = (r.to(dev), bp.to(dev), cols[i].to(dev))
                    m = mask[slots[i]].to(dev, z.dtype)[None, :, None]
                    new = m * zz[at] + (1 - m) * src[0][i][rows].to(dev, z.dtype)
                    sites[i].input = zz.index_put(at, new).reshape(z.shape)
                final = lm.output.logits[r[:, 0], end]
                logit = final[r[:, 0].to(final.device), tgt.to(final.device)].float()
                loss = -logit.mean() + (lam * (1 - mask).sum()).to(logit.device)
                (grad,) = torch.autograd.grad(loss, [mask])
            opt.zero_grad()
            mask.grad = grad
            opt.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
            soft = mask.detach().clone()
            masks.append(soft)
            losses.append(loss.detach().float().cpu())
            means.append(logit.detach().mean().cpu())
            if checks[s]:
                rounded = (soft >= 0.5).float()
                hits, total = 0, 0.0
                for tok, r, bp, end, tgt, rows in evals[1]:
                    with torch.no_grad(), lm.trace(tok):
                        for i in range(n):
                            z = sites[i].input
                            zz, dev = z.reshape(z.shape[0], z.shape[1], H, dh), z.device
                            at = (r.to(dev), bp.to(dev), cols[i].to(dev))
                            m = rounded[slots[i]].to(dev, z.dtype)[None, :, None]
                            new = m * zz[at] + (1 - m) * src[1][i][rows].to(dev, z.dtype)
                            sites[i].input = zz.index_put(at, new).reshape(z.shape)
                        final = lm.output.logits[r[:, 0], end]
                        target = tgt.to(final.device)
                        vlogit = final[r[:, 0].to(final.device), target].float()
                        hit = final.argmax(-1) == target
                    hits += int(hit.sum())
                    total += float(vlogit.sum())
                size = float((1 - rounded).sum())
                vals.append(torch.tensor([float(hits), total, size], dtype=torch.float64))
                key = (hits / n_val, -(-(total / n_val) + lam * size))
                if key > best_key:
                    best_key, best_i = key, s
        rounded = ((masks[best_i] if best_i >= 0 else masks[-1]) >= 0.5).float()
        accs = []
        for p in (0, 2):
            hits = 0
            for tok, r, bp, end, tgt, rows in evals[p]:
                with torch.no_grad(), lm.trace(tok):
                    for i in range(n):
                        z = sites[i].input
                        zz, dev = z.reshape(z.shape[0], z.shape[1], H, dh), z.device
                        at = (r.to(dev), bp.to(dev), cols[i].to(dev))
                        m = rounded[slots[i]].to(dev, z.dtype)[None, :, None]
                        new = m * zz[at] + (1 - m) * src[p][i][rows].to(dev, z.dtype)
                        sites[i].input = zz.index_put(at, new).reshape(z.shape)
                    final = lm.output.logits[r[:, 0], end]
                    hit = final.argmax(-1) == tgt.to(final.device)
                hits += int(hit.sum())
            accs.append(hits)
        curves = save((torch.stack(masks), torch.stack(losses), torch.stack(means)))
        rest = save((torch.stack(vals), torch.tensor(best_i), torch.tensor(accs)))
    return (*curves, *rest)
