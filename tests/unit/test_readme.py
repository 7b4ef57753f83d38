"""Every python block of the README runs, as a reader would paste them: in order, in one
namespace (issue 15, item 4).

The examples are written for the demo model, but its every-head sweeps take many minutes on 2
CPU cores, so ``load_model("demo")`` (and ``"demo-arith"``) give a random model of the demo's
shape here: 30 layers x 9 query heads on 3 key/value heads, as tiny as the unit tests' models.
Every name, argument, head index and position name runs as written; example counts are shrunk
(``n=`` to at most 8, ``n_random=`` to 1). A block whose first line is
``# not run in tests: <reason>`` is left out (hub access, minutes of work).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = "# not run in tests:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    ]


def shrink(code: str) -> str:
    code = re.sub(r"\bn=(\d+)", lambda m: f"n={min(int(m.group(1)), 8)}", code)
    return re.sub(r"\bn_random=\d+", "n_random=1", code)


def test_readme_has_python_blocks_and_every_skip_says_why():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    for line, code in blocks:
        first = code.splitlines()[0]
        if first.startswith(SKIP):
            assert first[len(SKIP) :].strip(), f"README line {line}: the skip needs a reason"


BLOCKS = [
    (line, code) for line, code in python_blocks(README.read_text()) if not code.startswith(SKIP)
]


@pytest.fixture(scope="module")
def readme_namespace():
    """One namespace for the blocks, run in order, with the demo-shaped stand-ins."""
    import circuit_widgets as cw

    def demo_shaped(seed: int):
        return cw.tiny_model("llama", n_layers=30, n_heads=9, n_kv_heads=3, d_model=36, seed=seed)

    stand_ins = {"demo": 0, "demo-arith": 1}  # the fine-tuned model: other weights, same shape

    def load_model(name, **kw):
        if name in stand_ins and not kw:
            return demo_shaped(stand_ins[name])
        raise AssertionError(
            f"README loads {name!r}{kw or ''}: not a model this test can stand in for"
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cw, "load_model", load_model)
        yield {}


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(readme_namespace, line, code, one_thread):
    try:
        exec(compile(shrink(code), f"README.md:{line}", "exec"), readme_namespace)  # noqa: S102 - the README's own code
    except Exception as exc:
        raise AssertionError(
            f"README block at line {line} fails: {type(exc).__name__}: {exc}"
        ) from exc


def test_readme_set_up_answers_a_newcomer():
    """Issue 15 item 10: what set-up installs and with which rights, the `setup` command, how
    long the tests take, the model cache's size and removal, which cache clear_cache clears."""
    import circuit_widgets as cw

    text = " ".join(README.read_text().split())
    for needed in (
        "bash scripts/dev setup",
        "`nodejs` / `npm` (Node.js 18 or later)",
        "`npm ci`",
        "The whole suite takes",
        "the demo about 0.5 GB",
        "rm -rf ~/.cache/circuit_widgets",
        "cw.clear_activation_cache()",
    ):
        assert needed in text, needed
    assert cw.clear_cache is cw.clear_activation_cache  # the old name keeps working
    for name in set(re.findall(r"\bcw\.([a-z_]+)\(", text)):  # every function the README names
        assert hasattr(cw, name), f"README names cw.{name}, which does not exist"
