"""`python -m circuit_widgets.report --quick` on the demo model, in a subprocess, end to end.

Asserts what the page and results.json must hold, not the papers' numbers: whatever the demo
model gives is the result (the page prints both side by side).
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys

import pytest
import torch

from circuit_widgets.report import QUICK_SIZES

pytestmark = pytest.mark.integration

# The entity-tracking and fine-tuning studies have their own demo tests; with them this
# command would run well past CI's budget on 2 cores.
ONLY = ("ioi", "reuse")


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuit_widgets.report",
            "--out",
            str(out),
            "--quick",
            "--only",
            ",".join(ONLY),
            "--threads",
            str(min(2, os.cpu_count() or 1)),
            "--no-progress",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    return proc, out


def test_cli_writes_the_report(cli_report):
    proc, out = cli_report
    assert (out / "index.html").is_file() and (out / "results.json").is_file(), proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    meta, studies = data["meta"], data["studies"]
    assert list(studies) == list(ONLY)
    assert meta["model"] == "demo" and meta["quick"] is True and meta["studies"] == list(ONLY)
    assert meta["model_shape"] == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_head": 64}
    for key, run in studies.items():
        assert run["status"] == "ok", (key, run["error"], run["traceback"])
        given = {k: v for k, v in QUICK_SIZES[key].given().items()}
        assert run["params"].items() >= {**given, "seed": 0}.items()  # plus what the result records
        assert run["figures"]
        for rel in run["figures"].values():
            assert (out / rel).read_bytes()[:4] == b"\x89PNG"
    assert proc.returncode == 0, proc.stderr[-3000:]
    print("\n" + proc.stdout)


def test_ioi_numbers_are_the_models(cli_report, demo_model):
    """The report's IOI numbers equal a plain forward of the demo model on the same prompts."""
    from circuit_widgets import tasks

    _, out = cli_report
    ioi = json.loads((out / "results.json").read_text())["studies"]["ioi"]["result"]
    task = tasks.ioi(demo_model, n=QUICK_SIZES["ioi"].n, seed=0)
    with torch.no_grad():
        logits = demo_model(task.clean_tokens).float()
    ar = torch.arange(len(task))
    end = logits[ar, task.positions["END"]]
    ld = end[ar, task.answers] - end[ar, task.wrong_answers]
    assert ioi["accuracy"] == pytest.approx(float((end.argmax(-1) == task.answers).float().mean()))
    assert ioi["logit_diff"] == pytest.approx(float(ld.mean()), abs=2e-3)
    assert [e["prompt"] for e in ioi["examples"]] == task.clean_prompts[: len(ioi["examples"])]
    per_stage = max(1, round(0.02 * 30 * 9))
    groups = ioi["circuit"]["groups"]
    assert [g["name"] for g in groups] == ["movers", "inhibition", "induction", "previous_token"]
    assert all(len(g["heads"]) == per_stage for g in groups)
    reuse = json.loads((out / "results.json").read_text())["studies"]["reuse"]["result"]
    assert reuse["ioi_circuit"] == ioi["circuit"]  # the same prompts give the same circuit


def test_page_shows_numbers_beside_the_papers(cli_report):
    _, out = cli_report
    page = (out / "index.html").read_text(encoding="utf-8")
    data = json.loads((out / "results.json").read_text())
    ioi = data["studies"]["ioi"]["result"]
    assert "<script" not in page.lower()
    assert "30 layers x 9 heads (3 key/value heads)" in page
    assert f"<td class=num>{ioi['logit_diff']:.3f}</td><td class=num>3.56</td>" in page
    reuse = data["studies"]["reuse"]["result"]
    assert f"<td class=num>{reuse['overlap']['frac_a']:.1%}</td><td class=num>78%</td>" in page
    assert page.count("data:image/png;base64,") == sum(
        len(s["figures"]) for s in data["studies"].values()
    )
    for run in data["studies"].values():
        assert f"<pre>{html.escape(run['summary'])}</pre>" in page
