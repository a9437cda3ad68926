"""The mutation check's list (tests/mutations/mutations.py) stays applicable: every bug's snippet
occurs exactly once in shardml/ and every test it names exists. Fails here, in the default suite,
as soon as a change rewords a snippet, so the bug is re-anchored (never dropped)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutations"))

from mutations import AREAS, MUTATIONS  # noqa: E402
from run import locate, source_files  # noqa: E402


def test_every_area_has_bugs_and_ids_are_unique():
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert {m.area for m in MUTATIONS} == set(AREAS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_each_snippet_occurs_exactly_once_and_its_tests_exist(mutation):
    path, why = locate(mutation, source_files(ROOT))
    assert path is not None, f"{mutation.id}: {why}; re-anchor it in tests/mutations/mutations.py"
    for selection in mutation.tests:
        file, _, name = selection.split()[0].partition("::")
        assert (ROOT / file).exists(), f"{mutation.id}: {file} does not exist"
        name = name.split("[")[0]
        assert not name or f"def {name}(" in (ROOT / file).read_text(), f"{mutation.id}: no test {name} in {file}"
