"""Push one of hf-hypervq's metric modules to the Hub as an `evaluate` metric (a Space repo), in one commit.

    hypervq-push-metric codebook_usage --hub_space_id your-name/hypervq-codebook-usage
    python -c 'import evaluate; print(evaluate.load("your-name/hypervq-codebook-usage").compute(
        predictions=[0, 1, 1, 3], codebook_size=4))'

The Space gets the module script (named after the repo, as `evaluate.load` looks for it), its metric card
(README.md), the usual `app.py` widget of evaluate's own metrics and a `requirements.txt`. Modules: codebook_usage,
reconstruction, cluster_quality, mean_corruption_error, fid_inception_score. Anything wrong ends with one `error:`
line and exit status 1.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from hf_hypervq.metrics import MODULES, module_path
from hf_hypervq.training.cli import add_deprecated_alias
from hf_hypervq.training.hub import PublishError, check_repo_id, push_failed


# What each module imports beyond evaluate and datasets (the Space installs these).
REQUIREMENTS = {
    "codebook_usage": ["numpy"],
    "reconstruction": ["numpy", "scikit-image"],
    "cluster_quality": ["torch"],
    "mean_corruption_error": ["numpy"],
    "fid_inception_score": ["torch"],
}
APP = """import evaluate
from evaluate.utils import launch_gradio_widget


module = evaluate.load("{repo_id}")
launch_gradio_widget(module)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metric", choices=MODULES, help="the metric module to push")
    repo = parser.add_mutually_exclusive_group(required=True)
    repo.add_argument("--hub_space_id", default=None, help="the Space to push to, 'user/name' or 'org/name'")
    add_deprecated_alias(repo, "--repo_id", "--hub_space_id", dest="hub_space_id")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the Space as private")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    add_deprecated_alias(parser, "--private", "--hub_private_repo", flag=True)
    add_deprecated_alias(parser, "--token", "--hub_token")
    return parser


def push_metric(metric: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Stage the module under the repo's name and upload it in one commit; returns the commit URL."""
    check_repo_id(repo_id, "--hub_space_id")
    source = module_path(metric)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        shutil.copy2(source / f"{metric}.py", staging / f"{repo_id.split('/')[-1]}.py")
        shutil.copy2(source / "README.md", staging / "README.md")
        (staging / "app.py").write_text(APP.format(repo_id=repo_id))
        (staging / "requirements.txt").write_text("\n".join(["evaluate", "datasets", *REQUIREMENTS[metric]]) + "\n")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, repo_type="space", folder_path=staging,
                commit_message=f"Upload the {metric} metric of hf-hypervq",
            )  # fmt: skip
        except Exception as error:  # HTTP errors, refused connections, timeouts: one clear line
            raise push_failed(repo_id, error) from None
    return commit.commit_url


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        url = push_metric(args.metric, args.hub_space_id, private=args.hub_private_repo, token=args.hub_token)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pushed the {args.metric} metric to {url}")


if __name__ == "__main__":
    main()
