"""The test suite's own switches: RUN_SLOW for the slow tests, HF_HYPERVQ_STRICT_SKIPS for missing optional parts."""

from types import SimpleNamespace

import conftest
import optional_parts
import pytest


def test_a_missing_part_is_a_skip_with_its_reason(monkeypatch):
    monkeypatch.setattr(optional_parts, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match="needs chromium: apt-get install chromium"):
        optional_parts.missing("needs chromium: apt-get install chromium")
    with pytest.raises(pytest.skip.Exception, match=r"needs no_such_module_hf_hypervq: pip install -e"):
        optional_parts.require_modules("pytest", "no_such_module_hf_hypervq", install='pip install -e ".[dev]"')
    optional_parts.require_modules("pytest", install="-")  # present: nothing happens


def test_under_strict_skips_a_missing_part_fails(monkeypatch):
    monkeypatch.setattr(optional_parts, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="needs chromium.*HF_HYPERVQ_STRICT_SKIPS"):
        optional_parts.missing("needs chromium")
    with pytest.raises(pytest.fail.Exception, match="/no/such/chromedriver"):
        optional_parts.require_executables("/no/such/chromedriver", install="apt-get install chromium-driver")


def test_flags_are_read_as_transformers_reads_run_slow(monkeypatch):
    for value, expected in (("1", True), ("yes", True), ("True", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("HF_HYPERVQ_TEST_FLAG", value)
        assert optional_parts.env_flag("HF_HYPERVQ_TEST_FLAG") is expected, value


class Item(SimpleNamespace):
    def get_closest_marker(self, name):
        return name if name in self.marks else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.parametrize("run_slow", [False, True])
def test_slow_tests_are_skipped_unless_run_slow(run_slow, monkeypatch):
    monkeypatch.setattr(conftest, "RUN_SLOW", run_slow)
    slow, fast = Item(marks={"slow"}, added=[]), Item(marks=set(), added=[])
    conftest.pytest_collection_modifyitems(None, [slow, fast])
    assert fast.added == []
    if run_slow:
        assert slow.added == []
    else:
        [marker] = slow.added
        assert marker.name == "skip" and "RUN_SLOW=1" in marker.kwargs["reason"]
