"""The IOI study and the HTML replication report on tiny random models.

References are computed here with the bridge's own forward and attention hooks, never through
circuit_widgets.core, so they check ioi_study and what the report prints independently.
"""

from __future__ import annotations

import json

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets.report import DEFAULT_SIZES, QUICK_SIZES, STUDIES, build_report, main
from circuit_widgets.studies.ioi import CLASSES, SCORES, IOIResult, _classify, ioi_study
from circuit_widgets.tasks import Task

PRE = "<script>alert('x')</script> "
SIZES = {"ioi": {"n": 4}, "reuse": {"n": 4, "n_random": 1, "intervention_heads": ["1.0"]}}


def script_task(model) -> Task:
    """IOI-shaped prompts that start with a <script> tag (positions as the IOI generator names them)."""
    clean = [
        PRE + "When Mary and John went to the store, John gave a drink to",
        PRE + "When Anna and Paul went to the store, Paul gave a drink to",
        PRE + "When Paul and Mary went to the store, Mary gave a drink to",
    ]
    corrupt = [
        PRE + "When Alice and Mark went to the store, Peter gave a drink to",
        PRE + "When Jacob and Sarah went to the store, Grace gave a drink to",
        PRE + "When Alice and Mark went to the store, Peter gave a drink to",
    ]
    return Task.from_pairs(
        model,
        clean,
        corrupt,
        [" Mary", " Anna", " Paul"],
        [" John", " Paul", " Mary"],
        positions={
            "IO": ["Mary", "Anna", "Paul"],
            "S1": ["John", "Paul", "Mary"],
            "S1+1": [-10] * 3,
            "S2": [-5] * 3,
        },
        name="ioi-script",
    )


def reference_scores(model, task):
    """(accuracy, IO > S, logit diff) from the bridge's plain forward, read at each END."""
    with torch.no_grad():
        logits = model(task.clean_tokens).float()
    end = logits[torch.arange(len(task)), task.positions["END"]]
    io, s = task.answers.reshape(-1), task.wrong_answers.reshape(-1)
    ar = torch.arange(len(task))
    ld = end[ar, io] - end[ar, s]
    return (
        float((end.argmax(-1) == io).float().mean()),
        float((ld > 0).float().mean()),
        float(ld.mean()),
    )


def reference_attention(model, task, query: str, keys: tuple[str, ...]) -> torch.Tensor:
    """[L, H] mean attention from ``query`` to the distinct ``keys``, from the bridge's hook_pattern."""
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(task.clean_tokens)
    out = []
    for l in range(n_layers):
        pat = cache[f"blocks.{l}.attn.hook_pattern"].float()  # [b, H, q, k]
        per = []
        for b in range(len(task)):
            q = int(task.positions[query][b])
            ks = sorted({int(task.positions[k][b]) for k in keys})
            per.append(pat[b, :, q, ks].sum(-1))
        out.append(torch.stack(per).mean(0))
    return torch.stack(out)


# ------------------------------------------------------------------ ioi_study


@pytest.fixture(scope="module")
def study(tiny_llama):
    seen = []
    res = ioi_study(tiny_llama, n=6, seed=1, on_progress=lambda d, t: seen.append((d, t)))
    return res, seen


def test_ioi_study_numbers_match_a_plain_forward(study, tiny_llama):
    res, seen = study
    assert isinstance(res, IOIResult) and res.complete
    assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    task = cw.tasks.ioi(tiny_llama, n=6, seed=1)
    acc, cand, ld = reference_scores(tiny_llama, task)
    assert res.accuracy == pytest.approx(acc)
    assert res.candidate_accuracy == pytest.approx(cand)
    assert res.logit_diff == pytest.approx(ld, abs=1e-4)
    for name, (q, keys) in SCORES.items():
        torch.testing.assert_close(
            res.attention[name],
            reference_attention(tiny_llama, task, q, keys),
            atol=1e-5,
            rtol=1e-4,
        )


def test_ioi_head_classes_follow_their_rules(study):
    res, _ = study
    pipe = res.pipeline
    picked = {(g.name, h) for g in pipe.circuit.groups for h in g.heads if g.name in pipe.grids}
    assert {(c.stage, c.head) for c in res.head_classes} == picked
    for c in res.head_classes:
        assert c.effect == pytest.approx(
            float(pipe.grids[c.stage].normalized[c.head.layer, c.head.head])
        )
        a = {k: float(v[c.head.layer, c.head.head]) for k, v in res.attention.items()}
        assert c.attention == pytest.approx(a)
        assert c.label == _classify(c.stage, c.effect, a, res.min_attention)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert sum(len(v) for v in d["head_classes"].values()) == len(res.head_classes)
    assert set(d["head_classes"]) == set(CLASSES)
    figs = res.figures()
    assert {"ioi_activation_patching", "ioi_path_patching", "ioi_attention_scores"} <= set(figs)


def att(io=0.0, s=0.0, s2=0.0, ind=0.0, dup=0.0, prev=0.0) -> dict[str, float]:
    return {
        "END->IO": io,
        "END->S": s,
        "END->S2": s2,
        "S2->S1+1": ind,
        "S2->S1": dup,
        "S1+1->S1": prev,
    }


@pytest.mark.parametrize(
    "stage,effect,attention,label",
    [
        # Name movers attend from END to IO more than to S; the sign of the effect splits them.
        ("movers", 0.4, att(io=0.6, s=0.2), "name_mover"),
        ("movers", -0.3, att(io=0.6, s=0.2), "negative_mover"),
        ("movers", 0.0, att(io=0.6, s=0.2), "unclassified"),
        ("movers", 0.4, att(io=0.2, s=0.6), "unclassified"),
        ("movers", 0.4, att(io=0.3, s=0.3), "unclassified"),
        # S-inhibition heads attend from END to S2 more than to IO.
        ("inhibition", 0.2, att(io=0.1, s2=0.5), "s_inhibition"),
        ("inhibition", 0.2, att(io=0.5, s2=0.1), "unclassified"),
        ("inhibition", 0.2, att(io=0.3, s2=0.3), "unclassified"),
        # Induction (S2 -> S1+1) vs duplicate-token (S2 -> S1), above the attention floor 0.1.
        ("induction", 0.2, att(ind=0.4, dup=0.2), "induction"),
        ("induction", 0.2, att(ind=0.2, dup=0.4), "duplicate_token"),
        ("induction", 0.2, att(ind=0.3, dup=0.3), "induction"),
        ("induction", 0.2, att(ind=0.05, dup=0.09), "unclassified"),
        # Previous-token heads attend from S1+1 to S1 at least the floor.
        ("previous_token", 0.2, att(prev=0.1), "previous_token"),
        ("previous_token", 0.2, att(prev=0.05), "unclassified"),
        ("other", 0.9, att(io=1.0, s2=1.0, ind=1.0, prev=1.0), "unclassified"),
    ],
)
def test_ioi_head_classifier_by_hand(stage, effect, attention, label):
    assert _classify(stage, effect, attention, 0.1) == label


def test_ioi_study_reuses_a_pipeline_and_stops(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, n=4, seed=0)
    pipe = cw.circuit_pipeline(tiny_gpt2, task)
    a = ioi_study(tiny_gpt2, n=4, seed=0)
    b = ioi_study(tiny_gpt2, n=4, seed=0, pipeline=pipe)
    assert a.circuit == b.circuit == pipe.circuit
    with pytest.raises(ValueError, match="not run on this task"):
        ioi_study(tiny_gpt2, n=6, seed=0, pipeline=pipe)
    calls = []
    stopped = ioi_study(tiny_gpt2, n=4, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert not stopped.complete and stopped.head_classes == []
    assert "STOPPED EARLY" in stopped.summary()


def test_ioi_study_rejects_bad_input(tiny_gpt2):
    with pytest.raises(ValueError, match=r"top_frac must be in \(0, 1\]"):
        ioi_study(tiny_gpt2, n=4, top_frac=0)
    with pytest.raises(ValueError, match="min_attention"):
        ioi_study(tiny_gpt2, n=4, min_attention=2)
    colored = cw.tasks.colored_objects(tiny_gpt2, n=2)
    with pytest.raises(ValueError, match=r"lacks \['IO', 'S1', 'S1\+1', 'S2'\]"):
        ioi_study(tiny_gpt2, task=colored)
    with pytest.raises(TypeError):
        ioi_study(tiny_gpt2, n=4, bogus=1)


# ------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def report(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    task = script_task(tiny_gpt2)
    rep = build_report(
        out,
        model=tiny_gpt2,
        finetuned="no-such-model-xyz",
        quick=True,
        only="ioi,reuse,finetune",
        sizes={**SIZES, "ioi": {"task": task}},
    )
    return rep, task


def test_report_files(report):
    rep, _ = report
    out = rep.out
    page = (out / "index.html").read_text(encoding="utf-8")
    data = json.loads(
        (out / "results.json").read_text(encoding="utf-8"),
        parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"),
    )
    assert list(data["studies"]) == ["ioi", "reuse", "finetune"]
    ioi = data["studies"]["ioi"]
    assert ioi["status"] == "ok" and ioi["figures"]
    for rel in ioi["figures"].values():
        png = (out / rel).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        assert rel in page
    assert page.count("data:image/png;base64,") == sum(
        len(s["figures"]) for s in data["studies"].values()
    )
    meta = data["meta"]
    assert meta["model"] == "tiny-gpt2" and meta["seed"] == 0 and meta["quick"] is True
    assert meta["versions"]["torch"] == torch.__version__
    for key in ("date", "total_seconds", "platform"):
        assert meta[key]
    reuse = data["studies"]["reuse"]
    assert reuse["params"] == {
        **QUICK_SIZES["reuse"].given(),
        **SIZES["reuse"],
        "seed": 0,
        "top_frac": 0.02,  # the study's default, recorded from its result
        "n_eval": reuse["result"]["intervention"]["n_eval"],
    }
    assert data["studies"]["ioi"]["params"]["task"] == "ioi-script (3 prompts)"
    assert data["studies"]["ioi"]["params"]["n"] == 3  # what ran, not QUICK_SIZES' n


def test_report_escapes_prompts(report):
    rep, task = report
    page = rep.index.read_text(encoding="utf-8")
    assert (
        "<script" not in page.lower()
    )  # the page itself runs no script, and no prompt injects one
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    ex = json.loads(rep.results_json.read_text())["studies"]["ioi"]["result"]["examples"]
    assert [e["prompt"] for e in ex] == task.clean_prompts
    assert "&lt;unk&gt;" in page or "<unk>" not in str(ex)  # decoded tokens are escaped too


def test_report_shows_measured_and_paper_numbers(report, tiny_gpt2):
    rep, task = report
    ioi = json.loads(rep.results_json.read_text())["studies"]["ioi"]["result"]
    acc, cand, ld = reference_scores(tiny_gpt2, task)
    assert ioi["accuracy"] == pytest.approx(acc) and ioi["candidate_accuracy"] == pytest.approx(
        cand
    )
    assert ioi["logit_diff"] == pytest.approx(ld, abs=1e-4)
    page = rep.index.read_text(encoding="utf-8")
    # The comparison row: the measured logit diff beside Wang et al.'s.
    assert f"<td class=num>{ld:.3f}</td><td class=num>3.56</td>" in page
    reuse = json.loads(rep.results_json.read_text())["studies"]["reuse"]["result"]
    assert f"<td class=num>{reuse['colored_accuracy']:.1%}</td><td class=num>49.6%</td>" in page
    iv = reuse["intervention"]
    assert f"{iv['accuracy_before']:.1%} -&gt; {iv['accuracy_after']:.1%}" in page


def test_a_failing_study_is_reported_and_the_others_run(report):
    rep, _ = report
    runs = rep.runs
    assert runs["ioi"].status == "ok" and runs["reuse"].status == "ok"
    assert runs["finetune"].status == "failed" and "no-such-model-xyz" in runs["finetune"].error
    assert not rep.ok
    page = rep.index.read_text(encoding="utf-8")
    assert "status-failed" in page and "no-such-model-xyz" in page and "traceback" in page


def test_bad_study_arguments_fail_that_study_only(tiny_gpt2, tmp_path):
    rep = build_report(
        tmp_path,
        model=tiny_gpt2,
        finetuned=None,
        only=["ioi", "reuse", "finetune"],
        figures=False,
        sizes={"ioi": {"n": 4}, "reuse": {"n": 4, "top_frac": 5.0}},
    )
    assert rep.runs["ioi"].status == "ok"
    assert rep.runs["reuse"].status == "failed" and "top_frac" in rep.runs["reuse"].error
    assert rep.runs["finetune"].status == "skipped" and "fine-tuned" in rep.runs["finetune"].error
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["studies"]["reuse"]["traceback"] and data["studies"]["ioi"]["result"]["n"] == 4
    assert data["studies"]["ioi"]["figures"] == {} and "data:image" not in rep.index.read_text()


def test_metadata_comes_from_what_ran(tiny_gpt2, tmp_path):
    """Issue 15 item 9: a given task's size, not the default n; no fine-tuned model unless the
    fine-tuning study ran."""
    task = script_task(tiny_gpt2)
    rep = build_report(
        tmp_path, model=tiny_gpt2, only="ioi", figures=False, sizes={"ioi": {"task": task}}
    )
    data = json.loads(rep.results_json.read_text())
    meta = data["meta"]
    assert meta["sizes"]["ioi"]["n"] == len(task) == data["studies"]["ioi"]["result"]["n"]
    assert meta["sizes"]["ioi"]["task"] == f"ioi-script ({len(task)} prompts)"
    assert meta["finetuned"] is None  # demo-arith is the default, but nothing used it
    assert f"n={len(task)} prompts" in rep.runs["ioi"].summary
    assert "n=32" not in rep.index.read_text()


def test_full_sizes_are_the_studies_own_defaults():
    import inspect

    from circuit_widgets.report.build import SIZE_TYPES
    from circuit_widgets.studies.entity_tracking import entity_tracking_study
    from circuit_widgets.studies.finetuning import finetuning_study
    from circuit_widgets.studies.reuse import circuit_reuse

    assert all(not s.given() for s in DEFAULT_SIZES.values())
    fns = {
        "ioi": ioi_study,
        "reuse": circuit_reuse,
        "entity": entity_tracking_study,
        "finetune": finetuning_study,
    }
    for key, cls in SIZE_TYPES.items():  # every field the report sets is a keyword of the study
        params = inspect.signature(fns[key]).parameters
        assert {f for f in cls.__dataclass_fields__} <= set(params), key


def test_unknown_size_names_are_refused(tiny_gpt2, tmp_path):
    with pytest.raises(ValueError, match=r"sizes\['ioi'\] names \['bogus'\]"):
        build_report(tmp_path, model=tiny_gpt2, only="ioi", sizes={"ioi": {"bogus": 1}})


def test_a_model_that_does_not_load_is_reported(tmp_path):
    rep = build_report(tmp_path, model="<em>no-such-model</em>", only="ioi")
    assert rep.runs["ioi"].status == "failed" and "did not load" in rep.runs["ioi"].error
    page = rep.index.read_text()
    assert "<em>" not in page and "&lt;em&gt;no-such-model&lt;/em&gt;" in page


def test_arguments_are_checked(tmp_path, tiny_gpt2, capsys):
    with pytest.raises(ValueError, match="unknown studies"):
        build_report(tmp_path, model=tiny_gpt2, only="ioi,bogus")
    with pytest.raises(ValueError, match="sizes names unknown studies"):
        build_report(tmp_path, model=tiny_gpt2, sizes={"nope": {}})
    assert main(["--out", str(tmp_path), "--only", "bogus"]) == 2
    assert "choose from " + ", ".join(STUDIES) in capsys.readouterr().err
    assert not (tmp_path / "index.html").exists()
