"""The README is the contract with users: every Python snippet in it runs, and CI runs its test command."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 1


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    """The snippets tell one story (a tokenizer saved in one is loaded in the next): run them in order, in one
    folder and one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(PYTHON_BLOCKS):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {index} failed:\n{block}") from error


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    test_commands = [
        line.strip() for block in bash_blocks for line in block.splitlines() if line.startswith("python -m pytest")
    ]
    assert test_commands, "the README shows no test command"
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_results_table_is_the_committed_report():
    """The README's results are copied from results/REPORT.md, never typed: each row must stand in the report."""
    section = README.split("## Results")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    report = (ROOT / "results" / "REPORT.md").read_text()
    assert len(rows) >= 10  # the header, five quantizers, three with the diversity term, the anchor
    assert all(row in report for row in rows)
