"""Publishing to the Hub: a model card generated from a template and the run's result files, and the model folder
pushed in one commit (`create_repo` + `upload_folder`); a token dataset the same way, with a dataset card generated
from its `tokenization.json` (`push_token_dataset`).

Numbers in a card are read from `eval_results.json` / `all_results.json`, never typed. The templates (one per model
kind) ship inside the package, `hf_hypervq/model_cards/` (the checkout's `model_cards/` links there), so publishing
works from any install.
"""

import json
import shutil
import tempfile
from pathlib import Path

from accelerate.logging import get_logger
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..models.hypervq.quantizers import QUANTIZERS
from .data import DataError
from .evaluation import protocol_line
from .token_datasets import DATA_DIR, METADATA_FILE, PROCESSOR_SETTINGS, read_metadata, shard_path


TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "model_cards"
# architecture -> (template / kind, pipeline tag, training script)
MODEL_KINDS = {
    "HyperVQVAEModel": ("tokenizer", "image-feature-extraction", "scripts/train_vqvae.py"),
    "HyperVQVAEForImageClassification": ("classifier", "image-classification", "scripts/train_classifier.py"),
    "HyperVQSAForImageClassification": ("vqsa", "image-classification", "scripts/train_vqsa.py"),
    "HyperVQPriorModel": ("prior", "unconditional-image-generation", "scripts/train_prior.py"),
}
# Files of an output folder that are not published.
PRIVATE_PARTS = ("checkpoints", "runs")
METRIC_NAMES = {
    "reconstruction_mse": "Reconstruction MSE",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "perplexity": "Codebook perplexity",
    "codes_used": "Fraction of codes used",
    "dead_codes": "Dead codes (never chosen on the eval split)",
    "mean_max_probability": "Mean max code probability",
    "silhouette": "Silhouette (latents by code)",
    "davies_bouldin": "Davies-Bouldin (latents by code)",
    "noisy_silhouette": "Silhouette under noise",
    "noisy_davies_bouldin": "Davies-Bouldin under noise",
    "accuracy": "Top-1 accuracy",
    "known_accuracy": "Accuracy under the 15 known corruptions",
    "unknown_accuracy": "Accuracy under the 4 unknown corruptions",
    "mCE": "mCE (15 known corruptions)",
    "unknown_mCE": "mCE (4 unknown corruptions)",
    # every model kind's `eval_loss` is a cross-entropy: of the labels for a classifier, of the tokens for a prior
    "eval_loss": "Evaluation cross-entropy (nats)",
    "bits_per_token": "Bits per token",
}


class PublishError(ValueError):
    """Something stops a push before anything is sent (or the Hub refused it)."""


def read_model_folder(folder) -> tuple[dict, str]:
    """The config of a saved hf-hypervq model and its kind; `PublishError` if `folder` is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    if not (folder / "config.json").exists():
        raise PublishError(f"{folder} is not a saved model: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise PublishError(f"{folder} is not a saved model: it has no .safetensors weights")
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in MODEL_KINDS:
        raise PublishError(f"{folder} holds a {architecture or config.get('model_type')!r}, not an hf-hypervq model")
    return config, MODEL_KINDS[architecture][0]


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def _is_hub_id(name) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return isinstance(name, str) and "/" in name and not Path(name).exists()


def build_model_card(folder, repo_id: str, template_dir=TEMPLATES_DIR) -> ModelCard:
    """The model card of a saved model, from `template_dir/<kind>.md` and the folder's result files."""
    config, kind = read_model_folder(folder)
    architecture = config["architectures"][0]
    _, pipeline_tag, script = MODEL_KINDS[architecture]
    evaluation = _read_json(Path(folder) / "eval_results.json")
    everything = _read_json(Path(folder) / "all_results.json")
    dataset = evaluation.get("dataset") or everything.get("dataset") or "unknown"
    split = evaluation.get("split", "test")
    metrics = {  # in METRIC_NAMES' order: reconstruction, then usage, then the rest
        k: evaluation[k] for k in METRIC_NAMES if isinstance(evaluation.get(k), (int, float))
    }
    protocol = evaluation.get("protocol") or {}
    protocol_summary = protocol_line(protocol) if protocol else None
    base_model = everything.get("resnet") if kind == "vqsa" else everything.get("tokenizer")
    spec = QUANTIZERS.get(config.get("quantizer_type"))
    quantizer = spec.paper_name if spec else config.get("quantizer_type")  # None for a prior
    tags = ["hf-hypervq", "hypervq", "vector-quantization", "hyperbolic", *([quantizer.lower()] if quantizer else [])]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        tags=[*tags, kind],
        datasets=[dataset] if _is_hub_id(dataset) else None,
        base_model=base_model if _is_hub_id(base_model) else None,
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=name,
                metric_name=METRIC_NAMES[name],
                metric_value=value,
                metric_config=protocol_summary,  # how it was measured, beside every number
                metric_args=protocol or None,
            )
            for name, value in metrics.items()
        ]
        or None,
    )
    arguments = everything.get("args", {})
    hyperparameters = {
        k: v for k, v in arguments.items() if v not in (None, False) and k not in ("output_dir", "hub_model_id")
    }
    return ModelCard.from_template(
        card_data,
        template_path=Path(template_dir) / f"{kind}.md",
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1],
        quantizer=quantizer,
        quantizer_type=config.get("quantizer_type"),
        config=config,
        metrics={METRIC_NAMES[k]: v for k, v in metrics.items()},
        eval_dataset=dataset,
        eval_split=split,
        num_eval_samples=evaluation.get("num_eval_samples"),
        command=everything.get("command") or f"{script} ...",
        hyperparameters=hyperparameters,
        num_processes=everything.get("num_processes"),
        steps=everything.get("step"),
        base_model_name=base_model,
        corruption_errors=evaluation.get("corruption_errors"),
        usage=codebook_usage_summary(config, evaluation, everything),
        protocol=protocol,
        protocol_summary=protocol_summary,
    )


def codebook_usage_summary(config: dict, evaluation: dict, everything: dict) -> dict | None:
    """The card's "Codebook usage" numbers (the first thing people ask of a VQ model), or None without results."""
    if "perplexity" not in evaluation or "codebook_size" not in config:
        return None
    size = config["codebook_size"]
    return {
        "codebook_size": size,
        "codes_used": round(evaluation.get("codes_used", 0.0) * size),
        "dead_codes": evaluation.get("dead_codes"),
        "perplexity": evaluation["perplexity"],
        "train_perplexity": everything.get("train_perplexity"),
        "mean_max_probability": evaluation.get("mean_max_probability"),
    }


def push_to_hub(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    template_dir=TEMPLATES_DIR,
) -> str:
    """Push a saved model folder with a generated `README.md` card to `repo_id`, in one commit; returns its URL.

    Everything is checked before the first request (the repo id, the folder, the card), and the files go up in a
    single commit, so a failure never leaves a half-pushed model. Checkpoints and TensorBoard runs stay local.
    """
    check_repo_id(repo_id)
    card = build_model_card(folder, repo_id, template_dir)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        for path in Path(folder).iterdir():
            if path.name in PRIVATE_PARTS or path.name.startswith(".") or path.name == "README.md":
                continue
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging / path.name)
        card.save(staging / "README.md")
        api = HfApi(token=token)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_url.repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or f"Upload {card.data.model_name} with hf-hypervq",
            )
        except Exception as error:  # HTTP errors, refused connections, timeouts: one clear line
            raise push_failed(repo_id, error) from None
    return commit.commit_url


def check_repo_id(repo_id: str) -> None:
    """`PublishError` unless `repo_id` is a valid 'user/name' or 'org/name'; checked before any request."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"--repo_id {repo_id!r} is not a valid repo id ({error})") from None
    if "/" not in repo_id:
        raise PublishError(f"--repo_id {repo_id!r} must be 'user/name' or 'org/name'")


def push_failed(repo_id: str, error: Exception) -> PublishError:
    """A failed request to the Hub (HTTP error, refused connection, timeout) as one line."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PublishError(f"pushing to {repo_id} failed: {reason}")


def build_dataset_card(folder, repo_id: str, template_dir=TEMPLATES_DIR) -> DatasetCard:
    """The dataset card of a token dataset folder, from `template_dir/token_dataset.md` and its `tokenization.json`:
    the tokenizer and how the tokens were made, each split's codebook usage, and how to decode the tokens."""
    try:
        metadata = read_metadata(folder)
    except DataError as error:
        raise PublishError(str(error)) from None
    tokenizer, source = metadata["tokenizer"], metadata["source"]["dataset"]
    spec = QUANTIZERS.get(tokenizer.get("quantizer_type"))
    quantizer = spec.paper_name if spec else tokenizer.get("quantizer_type")
    splits = sorted(metadata["splits"], key=lambda split: split != "train")  # train first, as load_dataset lists them
    files = [{"split": split, "path": f"{DATA_DIR}/{split}-*"} for split in splits]
    card_data = DatasetCardData(
        pretty_name=repo_id.split("/")[-1],
        tags=["hf-hypervq", "image-tokens", "vector-quantization", *([quantizer.lower()] if quantizer else [])],
        source_datasets=[source] if _is_hub_id(source) else None,
        configs=[{"config_name": "default", "data_files": files}],  # which files hold which split, for load_dataset
    )
    processor = metadata["processor"]
    return DatasetCard.from_template(
        card_data,
        template_path=Path(template_dir) / "token_dataset.md",
        repo_id=repo_id,
        pretty_name=repo_id.split("/")[-1],
        metadata=metadata,
        tokenizer=tokenizer,
        tokenizer_is_hub=_is_hub_id(tokenizer["name_or_path"]),
        quantizer=quantizer,
        processor={k: processor[k] for k in PROCESSOR_SETTINGS if processor.get(k) not in (None, False)},
        has_labels=_has_labels(folder, metadata),
        split_order=splits,
    )


def _has_labels(folder, metadata: dict) -> bool:
    import pyarrow.parquet as pq

    split, shards = next(iter(metadata["splits"].items()))
    return "label" in pq.read_schema(shard_path(folder, split, 0, shards["num_shards"])).names


def push_token_dataset(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    template_dir=TEMPLATES_DIR,
) -> str:
    """Push a token dataset folder (its Parquet shards and `tokenization.json`) with a generated `README.md` dataset
    card to the Hub dataset repository `repo_id`, in one commit; returns its URL. Shards of an earlier push that this
    one does not have are deleted in the same commit. Everything is checked before the first request."""
    check_repo_id(repo_id)
    card = build_dataset_card(folder, repo_id, template_dir)
    metadata = read_metadata(folder)
    files = [shard_path(folder, split, index, s["num_shards"])
             for split, s in metadata["splits"].items() for index in range(s["num_shards"])]  # fmt: skip
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise PublishError(f"{folder} is damaged: {missing[0]} is missing")
    uploads = {f"{DATA_DIR}/{path.name}": str(path) for path in files}
    uploads[METADATA_FILE] = str(Path(folder) / METADATA_FILE)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_url.repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        there = api.list_repo_files(repo_url.repo_id, repo_type="dataset", revision=revision)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in uploads.items()]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        operations += [CommitOperationDelete(path_in_repo=name) for name in there
                       if name.startswith(f"{DATA_DIR}/") and name not in uploads]  # fmt: skip
        commit = api.create_commit(
            repo_url.repo_id,
            operations,
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with hf-hypervq",
            repo_type="dataset",
            revision=revision,
        )
    except Exception as error:  # HTTP errors, refused connections, timeouts: one clear line
        raise push_failed(repo_id, error) from None
    return commit.commit_url


def push_if_asked(args) -> None:
    """With --push_to_hub: push a training script's output folder with a generated model card (`push_to_hub`)."""
    if args.push_to_hub:
        url = push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private)
        get_logger(__name__).info(f"pushed to {url}", main_process_only=True)
