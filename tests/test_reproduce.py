"""`scripts/reproduce.py --quick`: the whole reproduction pipeline, end to end, in a few minutes."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_quick_reproduction_writes_the_report(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--output_dir", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    report = (results / "REPORT.md").read_text()
    for name in ("mse_vs_k.png", "accuracy_vs_k.png", "codebook_usage.png", "embedding_scatter.png", "results.json"):
        assert (results / name).exists(), name
    assert "Quick mode" in report and "## The paper's claims, one by one" in report
    for quantizer in ("HyperVQ", "KmeansVQ", "GumbelVQ", "HyperKmeansVQ", "HyperEmbMatVQ"):
        assert f"| {quantizer} | 16 |" in report
    assert report.count("scripts/train_vqvae.py") >= 7 and report.count("scripts/train_classifier.py") == 5
    runs = json.loads((results / "results.json").read_text())["runs"]
    assert len(runs) == 5 and all(0 <= run["accuracy"] <= 1 for run in runs)

    again = subprocess.run(  # a rerun reuses every finished run
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--output_dir", str(results)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((results / "results.json").read_text())["runs"] == runs  # wall times included
