"""The test suite's own layout: pytest imports each test file as a top-level module (the tiers' folders are
not packages), so two files of one name in two tiers stop the whole run at collection."""

import collections
import glob
import os

import pytest

pytestmark = pytest.mark.unit

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_file_names_are_unique_across_tiers():
    by_name = collections.defaultdict(list)
    for path in glob.glob(os.path.join(TESTS, "*", "test_*.py")):
        by_name[os.path.basename(path)].append(os.path.relpath(path, TESTS))
    assert {n: p for n, p in by_name.items() if len(p) > 1} == {}
