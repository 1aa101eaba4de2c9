"""Publishing to the Hub: a model card generated from a template and the run's result files, written into the output
folder by every run (`write_model_card`), and the folder pushed in one commit with `upload_folder`; a token dataset
the same way, with a dataset card generated from its `tokenization.json` (`push_token_dataset`).

Numbers in a card are read from `eval_results.json` / `all_results.json`, never typed; `dataset_info` and `configs`
come from datasets' own helpers. The templates (one per model kind) ship inside the package,
`hf_hypervq/model_cards/` (the checkout's `model_cards/` links there), so publishing works from any install.

What is pushed must work on a machine that never saw this one's folders: a token dataset or a prior that names its
tokenizer by a local path is refused before any request, with what to do instead.

Atomicity: `upload_folder` uploads the large (LFS) files first and then makes one commit that lists every file, so a
push is all or nothing. The Hub advises fewer than about 100 files per commit; size the shards (`--max_shard_size`)
so that a data set stays within it. Beyond that, `hf upload-large-folder` resumes but makes several commits.
"""

import json
import math
from pathlib import Path

from accelerate.logging import get_logger
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..models.hypervq.quantizers import QUANTIZERS
from .data import DataError
from .evaluation import protocol_line
from .recipes import describe as describe_recipe
from .token_datasets import (
    CARD_FILE,
    DATA_DIR,
    METADATA_FILE,
    PROCESSOR_SETTINGS,
    is_hub_id,
    read_metadata,
    shard_path,
)


TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "model_cards"
# architecture -> (template / kind, pipeline tag, training command)
MODEL_KINDS = {
    "HyperVQVAEModel": ("tokenizer", "image-feature-extraction", "hypervq-train-vqvae"),
    "HyperVQVAEForImageClassification": ("classifier", "image-classification", "hypervq-train-classifier"),
    "HyperVQSAForImageClassification": ("vqsa", "image-classification", "hypervq-train-vqsa"),
    "HyperVQPriorModel": ("prior", "unconditional-image-generation", "hypervq-train-prior"),
}
# Files of an output folder that are not published: checkpoints, TensorBoard runs, hidden and temporary files.
PRIVATE_PATTERNS = ["checkpoints/**", "runs/**", ".*", "**/.*"]
# Remote files a model push replaces: an earlier push's weights, code and pictures that this folder no longer has.
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "*.py", "*.png"]
# Data sets whose name reads as a Hub id but that are not on the Hub: the embedded digits, Debian's Fashion-MNIST.
NOT_ON_THE_HUB = ("scikit-learn/digits", "fashion_mnist")
# The licenses of the data sets that ship without the Hub (scikit-learn's copy of UCI's digits; Fashion-MNIST).
KNOWN_LICENSES = {"scikit-learn/digits": "cc-by-4.0", "fashion_mnist": "mit"}
UNKNOWN_LICENSE = "unknown"
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
    return is_hub_id(name) and name not in NOT_ON_THE_HUB


def dataset_license(name, revision: str | None = None) -> str | None:
    """The license of a data set as the Hub knows it (its card's `license`), or None where it is unknown."""
    if name in KNOWN_LICENSES:
        return KNOWN_LICENSES[name]
    if not _is_hub_id(name):
        return None
    try:
        card_data = HfApi().dataset_info(name, revision=revision).card_data
    except Exception:  # offline, private, not found: unknown
        return None
    license = card_data.license if card_data is not None else None
    return license[0] if isinstance(license, list) and license else license


def build_model_card(folder, repo_id: str, template_dir=TEMPLATES_DIR, license: str | None = None) -> ModelCard:
    """The model card of a saved model, from `template_dir/<kind>.md` and the folder's result files. `license`
    defaults to the training data's license where the Hub knows it, else "unknown" (which a push refuses)."""
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
    # the Hub reads `base_model` as "fine-tuned (or adapted) from": VQ-SA fine-tunes its ResNet, a classifier adds a
    # head to a frozen tokenizer; a prior is trained from scratch, so its tokenizer is only named in the card's text
    relation = {"vqsa": None, "classifier": "adapter"}.get(kind, "none")
    spec = QUANTIZERS.get(config.get("quantizer_type"))
    quantizer = spec.paper_name if spec else config.get("quantizer_type")  # None for a prior
    tags = ["hf-hypervq", "hypervq", "vector-quantization", "hyperbolic", *([quantizer.lower()] if quantizer else [])]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license or dataset_license(dataset) or UNKNOWN_LICENSE,
        tags=[*tags, kind],
        datasets=[dataset] if _is_hub_id(dataset) else None,
        base_model=base_model if _is_hub_id(base_model) and relation != "none" else None,
        base_model_relation=relation if _is_hub_id(base_model) and relation not in (None, "none") else None,
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                dataset_revision=evaluation.get("dataset_revision"),
                metric_type=name,
                metric_name=METRIC_NAMES[name],
                metric_value=value,  # how it was measured is said once, in the card's text
            )
            for name, value in metrics.items()
        ]
        or None,
    )
    arguments = everything.get("args", {})
    hyperparameters = {
        k: v
        for k, v in arguments.items()
        if v not in (None, False) and k not in ("output_dir", "hub_model_id", "hub_token", "push_to_hub")
    }
    processor = _read_json(Path(folder) / "preprocessor_config.json")
    images = training_images(processor, arguments) if kind == "tokenizer" else None
    # runs made before `--recipe` existed say nothing about one
    recipe = describe_recipe(config["quantizer_type"], arguments["recipe"]) if "recipe" in arguments else None
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
        base_model_is_hub=_is_hub_id(base_model),
        token_dataset_revision=everything.get("token_dataset_revision"),
        corruption_errors=evaluation.get("corruption_errors"),
        usage=codebook_usage_summary(config, evaluation, everything),
        protocol=protocol,
        protocol_summary=protocol_summary,
        training_images=images,
        recipe=recipe if kind == "tokenizer" else None,
    )


def image_rule(processor: dict) -> str | None:
    """What a saved image processor (its `preprocessor_config.json`) does to an image's size, in words; None without
    one."""
    size, crop, pad = processor.get("size") or {}, processor.get("crop_size") or {}, processor.get("pad_size") or {}
    if not processor.get("do_resize", True):
        rule = "kept at its size"
    elif "shortest_edge" in size:
        rule = f"the shorter side resized to {size['shortest_edge']}"
    elif "height" in size and "width" in size:
        rule = f"resized to {size['height']}×{size['width']}"
    else:
        return None
    if processor.get("do_center_crop") and crop:
        rule += f", then the centre {crop['height']}×{crop['width']} crop"
    if processor.get("do_pad") and pad:
        rule += f", then centred on a {pad['height']}×{pad['width']} black canvas"
    return rule


def training_images(processor: dict, arguments: dict) -> str | None:
    """The tokenizer card's sentence on its training images: the augmentation (`--train_augmentation`; runs made
    before the flag had none) and the saved image processor's rule, which evaluation used."""
    rule = image_rule(processor)
    augmentation = arguments.get("train_augmentation", "none")
    if rule is None:
        return None
    if augmentation == "none":
        return (
            "no augmentation (`--train_augmentation none`): every training image went through the evaluation rule, "
            f"that of the saved image processor: {rule}."
        )
    if augmentation == "crop_flip":  # `data.RandomCropFlip`, before the processor (whose resize is then a no-op)
        n = arguments.get("image_size")
        pad = processor.get("pad_size") if processor.get("do_pad") else None
        canvas = f", then centred on a {pad['height']}×{pad['width']} black canvas" if pad else ""
        augmentation = (
            f"random crop and flip (`--train_augmentation crop_flip`): the shorter side resized to {n}, a random "
            f"{n}×{n} crop, flipped horizontally half the time{canvas}"
        )
    else:
        augmentation = f"`--train_augmentation {augmentation}`"
    return f"{augmentation}. Evaluation used the saved image processor's rule: {rule}."


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


def default_repo_id(folder) -> str:
    """The repo id a card names before its folder is pushed anywhere: `your-name/<folder name>`."""
    return f"your-name/{Path(folder).resolve().name}"


def _kept_card(card_class, path: Path, repo_id: str, license: str | None):
    """The card in `path`, edits included, naming `repo_id` where a run wrote the placeholder (`default_repo_id`)."""
    card = card_class(path.read_text().replace(default_repo_id(path.parent), repo_id))
    if license:
        card.data.license = license
    return card


def write_model_card(folder, repo_id: str, *, license: str | None = None, regenerate: bool = True) -> ModelCard:
    """`folder/README.md`: the card of a saved model, rendered (`build_model_card`) unless the folder has one and
    `regenerate` is False, in which case that one is kept (with `license` set when given, and `repo_id` where the run
    that wrote it could only name a placeholder)."""
    path = Path(folder) / CARD_FILE
    if path.is_file() and not regenerate:
        card = _kept_card(ModelCard, path, repo_id, license)
    else:
        card = build_model_card(folder, repo_id, license=license)
    card.save(path)
    return card


def check_portable_model(folder) -> None:
    """`PublishError` unless everything the folder's model refers to can be found from another machine: a prior's
    tokenizer must be a Hub id."""
    config, kind = read_model_folder(folder)
    if kind == "prior":
        tokenizer = config.get("tokenizer_name_or_path")
        if tokenizer and not _is_hub_id(tokenizer):
            raise PublishError(
                f"the prior in {folder} names its tokenizer by the local folder {tokenizer}, which no other machine "
                "has: push the tokenizer first (hypervq-push TOKENIZER_DIR --hub_model_id ORG/NAME), then pass "
                "--tokenizer_hub_id ORG/NAME to this push"
            )


def relink_tokenizer(folder, hub_id: str, revision: str | None = None) -> str:
    """Make a prior that names its tokenizer by a local folder name it by `hub_id` instead, at the commit `revision`
    (default main) resolves to, once the Hub copy is checked to have the same weights (SHA-256): its `config.json`
    and `all_results.json` are rewritten. Returns the commit."""
    from .generation import load_tokenizer, weights_sha256
    from .outputs import write_json
    from .token_datasets import resolve_commit

    config, kind = read_model_folder(folder)
    recorded = config.get("tokenizer_name_or_path")
    if kind != "prior":
        raise PublishError(f"--tokenizer_hub_id applies to a prior; {folder} holds a {kind}")
    try:
        check_repo_id(hub_id, "--tokenizer_hub_id")
        commit = resolve_commit(hub_id, revision, filename="config.json", flag="--tokenizer_hub_id")
        published = weights_sha256(load_tokenizer(hub_id, "--tokenizer_hub_id", revision=commit)[0])
        if recorded and not _is_hub_id(recorded):
            local = weights_sha256(load_tokenizer(recorded, "the prior's tokenizer", "; it is needed to check")[0])
            if local != published:
                raise PublishError(
                    f"--tokenizer_hub_id {hub_id} is not the tokenizer the prior was trained with ({recorded}): "
                    f"its weights differ (SHA-256 {published[:12]}…, the prior's {local[:12]}…)"
                )
    except (DataError, OSError, ValueError) as error:
        raise PublishError(str(error)) from None
    write_json(
        Path(folder) / "config.json", {**config, "tokenizer_name_or_path": hub_id, "tokenizer_revision": commit}
    )
    everything = _read_json(Path(folder) / "all_results.json")
    if everything:
        write_json(
            Path(folder) / "all_results.json", {**everything, "tokenizer": hub_id, "tokenizer_revision": commit}
        )
    return commit


def check_license(card, flag: str = "--license") -> None:
    license = card.data.license
    if not license or license == UNKNOWN_LICENSE:
        raise PublishError(
            f"the card does not say under which license this is published (the training data's license is not "
            f"known to the Hub): pass {flag}, e.g. {flag} cc-by-4.0, or 'other'"
        )


def push_to_hub(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    regenerate_card: bool = False,
    tokenizer_hub_id: str | None = None,
) -> str:
    """Push a saved model folder with its `README.md` card to `repo_id`, in one commit; returns its URL.

    The folder's own card is kept (edits included) unless `regenerate_card`; a folder without one gets a generated
    one. Everything is checked before the first request (the repo id, the folder, its references, the license), and
    `upload_folder` makes a single commit, so a failure never leaves a half-pushed model. Checkpoints and TensorBoard
    runs stay local; weights, code and pictures of an earlier push that the folder no longer has are deleted. A prior
    trained with a local tokenizer is first relinked to `tokenizer_hub_id` (`relink_tokenizer`), its card rendered
    again."""
    check_repo_id(repo_id)
    read_model_folder(folder)
    if tokenizer_hub_id:
        relink_tokenizer(folder, tokenizer_hub_id)
        regenerate_card = True  # the card names the tokenizer
    check_portable_model(folder)
    card = write_model_card(folder, repo_id, license=license, regenerate=regenerate_card)
    check_license(card)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            revision=revision,
            ignore_patterns=PRIVATE_PATTERNS,
            delete_patterns=MODEL_FILES,
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with hf-hypervq",
        )
    except Exception as error:  # HTTP errors, refused connections, timeouts: one clear line
        raise push_failed(repo_id, error) from None
    return commit.commit_url


def check_repo_id(repo_id: str, flag: str = "--hub_model_id") -> None:
    """`PublishError` unless `repo_id` is a valid 'user/name' or 'org/name'; checked before any request."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"{flag} {repo_id!r} is not a valid repo id ({error})") from None
    if "/" not in repo_id:
        raise PublishError(f"{flag} {repo_id!r} must be 'user/name' or 'org/name'")


def push_failed(repo_id: str, error: Exception) -> PublishError:
    """A failed request to the Hub (HTTP error, refused connection, timeout) as one line."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PublishError(f"pushing to {repo_id} failed: {reason}")


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for a data set of `rows` rows."""
    bounds = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T"]
    if rows < 1000:
        return "n<1K"
    order = min(int(math.log10(rows)) - 3, len(bounds) - 1)
    return f"{bounds[order]}<n<{bounds[order + 1]}" if order + 1 < len(bounds) else "n>1T"


def dataset_info(folder, metadata: dict):
    """The token dataset's `datasets.DatasetInfo` (features, splits with rows and bytes, sizes) from its Parquet
    files' metadata, without reading the data: what `Dataset.push_to_hub` writes as `dataset_info`."""
    import pyarrow.parquet as pq
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    splits, download_size, features = SplitDict(), 0, None
    for split in sorted(metadata["splits"], key=lambda split: split != "train"):  # as load_dataset lists them
        usage, num_bytes = metadata["splits"][split], 0
        for index in range(usage["num_shards"]):
            parquet = pq.ParquetFile(shard_path(folder, split, index, usage["num_shards"]))
            features = features or Features.from_arrow_schema(parquet.schema_arrow)
            num_bytes += sum(parquet.metadata.row_group(i).total_byte_size for i in range(parquet.num_row_groups))
            download_size += shard_path(folder, split, index, usage["num_shards"]).stat().st_size
        splits.add(SplitInfo(split, num_bytes=num_bytes, num_examples=usage["num_images"]))
    dataset_size = sum(split.num_bytes for split in splits.values())
    return DatasetInfo(features=features, splits=splits, download_size=download_size, dataset_size=dataset_size)


def build_dataset_card(
    folder, repo_id: str, template_dir=TEMPLATES_DIR, *, metadata: dict | None = None, license: str | None = None
) -> DatasetCard:
    """The dataset card of a token dataset folder, from `template_dir/token_dataset.md` and its `tokenization.json`
    (or `metadata`): the tokenizer and how the tokens were made, each split's codebook usage, and how to decode the
    tokens. `dataset_info` and `configs` come from datasets' own helpers; `license` defaults to the source's license
    where the Hub knows it, else "unknown" (which a push refuses)."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    if metadata is None:
        try:
            metadata = read_metadata(folder)
        except DataError as error:
            raise PublishError(str(error)) from None
    tokenizer, source = metadata["tokenizer"], metadata["source"]
    spec = QUANTIZERS.get(tokenizer.get("quantizer_type"))
    quantizer = spec.paper_name if spec else tokenizer.get("quantizer_type")
    splits = sorted(metadata["splits"], key=lambda split: split != "train")  # train first, as load_dataset lists them
    has_labels = _has_labels(folder, metadata)
    rows = sum(split["num_images"] for split in metadata["splits"].values())
    card_data = DatasetCardData(
        pretty_name=repo_id.split("/")[-1],
        license=license or source.get("license") or dataset_license(source["dataset"], source.get("revision"))
        or UNKNOWN_LICENSE,
        task_categories=["unconditional-image-generation", *(["image-classification"] if has_labels else [])],
        size_categories=[size_category(rows)],
        tags=["hf-hypervq", "image-tokens", "vector-quantization", *([quantizer.lower()] if quantizer else [])],
        source_datasets=[source["dataset"]] if _is_hub_id(source["dataset"]) else None,
        # searchable without opening tokenization.json
        tokenizer=tokenizer["name_or_path"] if _is_hub_id(tokenizer["name_or_path"]) else None,
        codebook_size=metadata["codebook_size"],
        grid=metadata["grid"],
    )  # fmt: skip
    files = [{"split": split, "path": f"{DATA_DIR}/{split}-*"} for split in splits]
    DatasetInfosDict({"default": dataset_info(folder, metadata)}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": files}}).to_dataset_card_data(card_data)  # which files hold which split
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
        processor={k: _setting(k, processor[k]) for k in PROCESSOR_SETTINGS if processor.get(k) not in (None, False)},
        has_labels=has_labels,
        split_order=splits,
        source_is_hub=_is_hub_id(source["dataset"]),
    )


def _setting(name: str, value):
    if name == "resample":  # PIL's number for it, by name
        from transformers.image_utils import PILImageResampling

        return PILImageResampling(value).name.lower()
    return value


def _has_labels(folder, metadata: dict) -> bool:
    import pyarrow.parquet as pq

    split, shards = next(iter(metadata["splits"].items()))
    return "label" in pq.read_schema(shard_path(folder, split, 0, shards["num_shards"])).names


def source_record(args) -> dict:
    """Where a token dataset's images came from, as `tokenization.json` and the card record it: a Hub id with the
    commit --dataset_revision (default main) is at, resolved once so that every split is read at it; a local folder
    or file by its name only (a path names nothing on another machine)."""
    from .outputs import portable

    name, revision = args.dataset or "scikit-learn/digits", args.dataset_revision
    if _is_hub_id(name):
        try:
            revision = HfApi().dataset_info(name, revision=revision).sha
        except Exception:  # offline (read from the cache at the revision given) or not found (datasets says so)
            pass
    elif args.dataset is not None:
        name = portable(str(Path(name).expanduser().resolve())) if Path(name).expanduser().exists() else name
    return {
        "dataset": name,
        "revision": revision,
        "config": args.dataset_config,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "streaming": args.streaming,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
    }


def check_portable_dataset(folder, metadata: dict) -> None:
    """`PublishError` unless a token dataset names its tokenizer so that another machine can load it: a Hub id."""
    tokenizer = metadata["tokenizer"]["name_or_path"]
    if not _is_hub_id(tokenizer):
        raise PublishError(
            f"the tokens in {folder} name their tokenizer by the local folder {tokenizer}, which no other machine has: "
            "push the tokenizer first (hypervq-push TOKENIZER_DIR --hub_model_id ORG/NAME), then rerun "
            "hypervq-tokenize with --tokenizer ORG/NAME into the same folder (its shards are kept)"
        )


def write_dataset_card(folder, repo_id: str, *, metadata=None, license=None, regenerate=True) -> DatasetCard:
    """`folder/README.md`: the card of a token dataset, rendered (`build_dataset_card`) unless the folder has one and
    `regenerate` is False, in which case that one is kept (with `license` set when given)."""
    path = Path(folder) / CARD_FILE
    if path.is_file() and not regenerate:
        card = _kept_card(DatasetCard, path, repo_id, license)
    else:
        card = build_dataset_card(folder, repo_id, metadata=metadata, license=license)
    card.save(path)
    return card


def push_token_dataset(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    regenerate_card: bool = False,
) -> str:
    """Push a token dataset folder (its Parquet shards, `tokenization.json` and its `README.md` card, kept unless
    `regenerate_card`) to the Hub dataset repository `repo_id`, in one commit; returns its URL. Shards of an earlier
    push that this one does not have are deleted in the same commit. Everything is checked before the first request:
    the repo id, that the folder is complete, that its tokenizer is on the Hub, the license."""
    check_repo_id(repo_id, "--hub_dataset_id")
    try:
        metadata = read_metadata(folder)
    except DataError as error:
        raise PublishError(str(error)) from None
    check_portable_dataset(folder, metadata)
    files = [shard_path(folder, split, index, s["num_shards"])
             for split, s in metadata["splits"].items() for index in range(s["num_shards"])]  # fmt: skip
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise PublishError(f"{folder} is damaged: {missing[0]} is missing")
    card = write_dataset_card(folder, repo_id, license=license, regenerate=regenerate_card)
    check_license(card)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_url.repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            repo_type="dataset",
            folder_path=folder,
            revision=revision,
            allow_patterns=[f"{DATA_DIR}/*.parquet", METADATA_FILE, CARD_FILE],
            ignore_patterns=PRIVATE_PATTERNS,
            delete_patterns=[f"{DATA_DIR}/*"],
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with hf-hypervq",
        )
    except Exception as error:  # HTTP errors, refused connections, timeouts: one clear line
        raise push_failed(repo_id, error) from None
    return commit.commit_url


def push_if_asked(args) -> None:
    """The end of every training run: write the model card into the output folder (`write_model_card`; kept where
    the folder has one already), and with --push_to_hub push the folder (`push_to_hub`)."""
    repo_id = args.hub_model_id or default_repo_id(args.output_dir)
    write_model_card(args.output_dir, repo_id, license=args.license, regenerate=True)
    if args.push_to_hub:
        url = push_to_hub(
            args.output_dir, args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision,
            token=args.hub_token, license=args.license,
        )  # fmt: skip
        get_logger(__name__).info(f"pushed to {url}", main_process_only=True)
