"""The README is the contract with users: every Python snippet in it runs, and CI runs its test command."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    test_commands = [
        line.strip() for block in bash_blocks for line in block.splitlines() if line.startswith("python -m pytest")
    ]
    assert test_commands, "the README shows no test command"
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()
