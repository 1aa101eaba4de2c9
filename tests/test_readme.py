"""The README is the contract with users: every Python snippet in it runs, its links resolve, PyPI can show it, and
CI runs its test command."""

import json
import re
import subprocess
import sys
from pathlib import Path

from hub_server import LocalHub

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
# The tokenizer the README loads from the Hub: the main job's, pushed under the README's example name.
HUB_TOKENIZER = "your-name/hypervq-digits"
PUSH = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[2])
api.upload_folder(folder_path=sys.argv[1], repo_id=sys.argv[2])
"""
RUN_BLOCKS = """
import json, sys
namespace = {"__name__": "__readme__"}
for index, block in enumerate(json.loads(sys.argv[1])):
    try:
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    except Exception as error:
        raise AssertionError(f"README python block {index} failed:\\n{block}") from error
"""


def test_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 1
    assert HUB_TOKENIZER in README


def test_readme_python_snippets_run_in_order(tmp_path):
    """The snippets tell one story: run them in order, in one folder and one namespace, as a reader would paste them,
    in a fresh process whose Hub is the tests' server, holding a digits-sized tokenizer (16×16 images, 4×4 tokens)
    under the name the README loads."""
    folder = tmp_path / "tokenizer"
    config = HyperVQVAEConfig(embedding_dim=8, codebook_size=16, hidden_size=16, residual_hidden_size=8)
    HyperVQVAEModel(config).save_pretrained(folder)
    HyperVQImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")
        push = subprocess.run([sys.executable, "-c", PUSH, str(folder), HUB_TOKENIZER], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert push.returncode == 0, push.stderr[-3000:]
        (tmp_path / "reader").mkdir()
        run = subprocess.run([sys.executable, "-c", RUN_BLOCKS, json.dumps(PYTHON_BLOCKS)], env=env, cwd=tmp_path / "reader",
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "reader" / "decoded.png").is_file()


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    test_commands = [
        line.strip() for block in bash_blocks for line in block.splitlines() if line.startswith("python -m pytest")
    ]
    assert test_commands, "the README shows no test command"
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_landing_page():
    """The reference lives in docs/; the README stays short enough to read at once."""
    assert len(README) <= 15_000


def test_links_pypi_shows_are_absolute():
    """The README is the package's PyPI description, where a relative link or image breaks."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README) + re.findall(r'<img[^>]*\ssrc="([^"]+)"', README)
    assert targets
    relative = [target for target in targets if not re.match(r"https?://", target)]
    assert not relative, f"relative links in the README: {relative}"
