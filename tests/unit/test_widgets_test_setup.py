"""The test set-up itself (issue 15, item 11): a private model cache for every test, and no
machine's absolute paths in the tests."""

from __future__ import annotations

import re
from pathlib import Path

import platformdirs

from circuit_widgets.models import cache_dir

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_gets_a_private_model_cache():
    user = Path(platformdirs.user_cache_dir("circuit_widgets")).resolve()
    private = cache_dir()
    assert private.resolve() != user and user not in private.resolve().parents
    for link in (private / "models").glob("*"):  # the user's models, reused read-only
        assert link.is_symlink() and link.resolve().parent == user / "models"


def test_tests_name_no_absolute_paths_of_a_machine():
    pattern = re.compile(r"(?<![\w.])/(work|root|home|Users|tmp)/")
    hits = [
        f"{p.relative_to(TESTS)}:{i}"
        for p in TESTS.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and p.name != Path(__file__).name
    ]
    assert not hits, hits
