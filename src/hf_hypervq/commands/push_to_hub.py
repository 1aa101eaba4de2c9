"""Push a trained model folder to the Hugging Face Hub with a generated model card, in one commit.

    python scripts/push_to_hub.py outputs/tokenizer --repo_id your-name/hypervq-digits
    HF_ENDPOINT=https://hub.example.org python scripts/push_to_hub.py outputs/cifar100 --repo_id org/hypervq-cifar100 --private

The card (`README.md`) is rendered from `model_cards/<kind>.md` (tokenizer, classifier, VQ-SA or prior) with metadata and a
`model-index` read from the folder's `eval_results.json` and `all_results.json`. The folder's model, code, image
processor, results and pictures are uploaded; `checkpoints/` and `runs/` stay local. Log in first with
`hf auth login` (or set HF_TOKEN). Anything wrong (not a saved model, a malformed repo id, a network error) ends with
one `error:` line and exit status 1, and nothing is half-pushed: the upload is a single commit.
"""

import argparse
import sys

from hf_hypervq.training.hub import PublishError, build_model_card, push_to_hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a folder written by one of the training scripts")
    parser.add_argument("--repo_id", required=True, help="the Hub repo to push to, 'user/name' or 'org/name'")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default: main)")
    parser.add_argument(
        "--commit_message", default=None, help="commit message (default: 'Upload NAME with hf-hypervq')"
    )
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    parser.add_argument("--card_only", action="store_true", help="only write the card to OUTPUT_DIR/README.md")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.card_only:
            build_model_card(args.output_dir, args.repo_id).save(f"{args.output_dir}/README.md")
            print(f"wrote {args.output_dir}/README.md")
            return
        url = push_to_hub(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pushed {args.output_dir} to {url}")


if __name__ == "__main__":
    main()
