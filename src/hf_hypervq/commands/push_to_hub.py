"""Push a trained model folder, or a token dataset folder, to the Hugging Face Hub with its card, in one commit.

    hypervq-push outputs/tokenizer --hub_model_id your-name/hypervq-digits
    hypervq-push outputs/digits-tokens --hub_dataset_id your-name/hypervq-digits-tokens
    HF_ENDPOINT=https://hub.example.org hypervq-push outputs/cifar100 --hub_model_id org/hypervq-cifar100 --hub_private_repo

A model folder's card (`README.md`) is the one its run wrote, edits included, or rendered from
`model_cards/<kind>.md` (tokenizer, classifier, VQ-SA or prior) with metadata and a `model-index` read from the
folder's `eval_results.json` and `all_results.json` when it has none or with --regenerate_card. The folder's model,
code, image processor, results and pictures are uploaded; `checkpoints/`, `runs/` and hidden files stay local. A
folder with a `tokenization.json` is a token dataset and goes to a dataset repo (--hub_dataset_id). Log in first
with `hf auth login` (or pass --hub_token). Anything wrong (not a saved model, a malformed repo id, a tokenizer named
by a local folder, no license, a network error) ends with one `error:` line and exit status 1, and nothing is
half-pushed: the upload is a single commit.
"""

import argparse
import sys
from pathlib import Path

from hf_hypervq.training.cli import add_deprecated_alias
from hf_hypervq.training.hub import PublishError, push_to_hub, push_token_dataset, write_model_card
from hf_hypervq.training.token_datasets import METADATA_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a folder written by a training command or by hypervq-tokenize")
    repo = parser.add_mutually_exclusive_group(required=True)
    repo.add_argument("--hub_model_id", default=None, help="the model repo to push to, 'user/name' or 'org/name'")
    repo.add_argument("--hub_dataset_id", default=None, help="the dataset repo a token dataset goes to")
    add_deprecated_alias(repo, "--repo_id", "--hub_model_id or --hub_dataset_id", dest="repo_id")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_revision", default=None, help="branch to push to (created if missing; default: main)")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    parser.add_argument(
        "--commit_message", default=None, help="commit message (default: 'Upload NAME with hf-hypervq')"
    )
    parser.add_argument(
        "--license", default=None,
        help="the license the card declares (a Hub license id, e.g. cc-by-4.0; default: the card's, which is the "
        "training data's where the Hub knows it)",
    )  # fmt: skip
    parser.add_argument(
        "--regenerate_card", action="store_true", help="render the card again, replacing OUTPUT_DIR/README.md"
    )
    parser.add_argument("--card_only", action="store_true", help="only write the card to OUTPUT_DIR/README.md")
    parser.add_argument(
        "--tokenizer_hub_id", default=None,
        help="a prior trained with a local tokenizer: the Hub id that tokenizer was pushed to, recorded (at its "
        "current commit) in the prior's config after checking that its weights are the same",
    )  # fmt: skip
    add_deprecated_alias(parser, "--private", "--hub_private_repo", flag=True)
    add_deprecated_alias(parser, "--revision", "--hub_revision")
    add_deprecated_alias(parser, "--token", "--hub_token")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    dataset = (Path(args.output_dir) / METADATA_FILE).is_file()
    repo_id = args.hub_dataset_id or args.hub_model_id or getattr(args, "repo_id", None)
    options = dict(private=args.hub_private_repo, revision=args.hub_revision, token=args.hub_token,
                   commit_message=args.commit_message, license=args.license, regenerate_card=args.regenerate_card)  # fmt: skip
    try:
        if args.hub_model_id and dataset:
            raise PublishError(f"{args.output_dir} is a token dataset: pass --hub_dataset_id, not --hub_model_id")
        if args.hub_dataset_id and not dataset:
            raise PublishError(f"{args.output_dir} is not a token dataset (it has no {METADATA_FILE})")
        if args.card_only:
            if dataset:
                from hf_hypervq.training.hub import write_dataset_card

                write_dataset_card(args.output_dir, repo_id, license=args.license)
            else:
                write_model_card(args.output_dir, repo_id, license=args.license)
            print(f"wrote {args.output_dir}/README.md")
            return
        if dataset:
            url = push_token_dataset(args.output_dir, repo_id, **options)
        else:
            url = push_to_hub(args.output_dir, repo_id, tokenizer_hub_id=args.tokenizer_hub_id, **options)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pushed {args.output_dir} to {url}")


if __name__ == "__main__":
    main()
