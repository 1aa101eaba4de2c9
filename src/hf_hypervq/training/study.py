"""The experiment runner that `study/ablate.py` and `study/reproduce.py` share: one protocol for every quantizer.

A *setting* (a dict, `DEFAULTS` overridden per row) fixes the data set, the quantizer, its options, the Gumbel
temperature rule and the number of updates. `run_one(setting, seed)` trains the library's `HyperVQVAEModel` with it,
in this process on preloaded tensors (the batches `scripts/train_vqvae.py` would see, without its start-up cost),
then measures it and trains frozen-feature classifiers on its codes. Same model, data order, optimizer (AdamW,
learning rate 1e-3, batch 128) and seeds for every setting; nothing is tuned per quantizer.

The data sets (`DATASETS`), read through the library's data path (`load_image_dataset`):

- `fashion_mnist`: Fashion-MNIST (Debian's `dataset-fashion-mnist`), 60,000 training and 10,000 test images, 28×28
  centred on a 32×32 canvas by the image processor (an 8×8 token grid, as the paper's CIFAR runs);
- `digits`: scikit-learn's digits, 1,437 training and 360 test images at 16×16 (a 4×4 grid).

A fixed, class-stratified tenth of each training split is the *validation* split (6,000 and 144 images): the
tokenizers train on the rest, every choice (defaults, recipes, "best" rows) is made on validation numbers, and the
test split is only measured, once per run, for the report. Each run's file holds both: the test numbers at its top
level, the validation numbers under `validation`.

The classifier protocols, all on the frozen tokenizer's eval-mode quantized latents, each measured on the validation
and the test split. The head learns from a fixed, seeded, class-stratified subset of the tokenizers' training part
(`classifier_images` in `DATASETS`: all of digits' 1,293, 6,250 of Fashion-MNIST's 54,000, to fit the budget), of
which 20% is held out for early stopping; every quantizer's head starts from the same weights for a given seed:

- `accuracy`: `scripts/train_classifier.py`'s defaults: features standardised per channel by a BatchNorm without
  affine parameters (`classifier_normalize_features=True`), 20 epochs at a constant learning rate of 1e-3 (AdamW, no
  weight decay, batch 128), on the 80%;
- `accuracy_unnormalized`: the same without the BatchNorm (the paper's head, the script's default until this study);
- `accuracy_early_stopping`: the paper's head with early stopping (hf-hypervq 0.2's study): for each learning rate
  of `CLASSIFIER_LEARNING_RATES` (3e-4 to 1e-1: wide enough that no quantizer picks an edge) the head trains on the
  80% until accuracy on the held-out 20% has not improved for `EARLY_STOPPING_PATIENCE` epochs (at most
  `MAX_EARLY_STOPPING_EPOCHS`), its best weights are kept, and the learning rate with the best held-out accuracy
  is the one measured. The test split never chooses anything.

Each finished run is a JSON file (and, beside it, a PNG of its decoded codes: `decoded_codebook`) named by a hash of
its setting, its model sizes, `code_fingerprint()` (the code that computes it) and `run_environment()` (the CPU
kernel path and build actually used, the `HF_HYPERVQ_*` variables, the SHA-256 of the data files and the versions
of every package that computes), and by its seed. A rerun (or the other script) with the same setting on the same code reuses it,
and an interrupted study resumes where it stopped; after a change to any of that code every run is recomputed, and
runs of other code are never read back (their fingerprint is inside each file, with the package versions, and is
checked too). The code that counts is `FINGERPRINT_SOURCES`, this module among them; a run of the anchor row (below) is also
keyed by the version of vector-quantize-pytorch, whose code is not in this repository (the dev extra pins it).

Besides the library's five quantizers, a setting may name `ANCHOR` (`"vq_pytorch"`): vector-quantize-pytorch's
`VectorQuantize`, the quantizer practitioners reach for, in the same VQ-VAE with the same budget, as a reference row.
`VectorQuantizeAnchor` adapts it to the library's quantizer interface for this study only; the library itself never
imports vector-quantize-pytorch (a dev dependency).
"""

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path

import sklearn
import torch
import torch.nn.functional as F
from PIL import Image

import hf_hypervq
from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEForImageClassification, HyperVQVAEModel
from hf_hypervq.models.hypervq import kernels
from hf_hypervq.models.hypervq.quantizers import QUANTIZER_TYPES, VectorQuantizer, decay_for_run
from hf_hypervq.training.data import FASHION_MNIST, FASHION_MNIST_FOLDER, load_image_dataset
from hf_hypervq.training.evaluation import cluster_scores, metric
from hf_hypervq.training.metrics import logit_confidence_per_row, perturb
from hf_hypervq.training.outputs import write_text
from hf_hypervq.training.report import scatter_points


TAU_MAX, TAU_MIN, PER_UPDATE_DECAY = 2.0, 0.5, 0.999995
MODEL = {"hidden_size": 64, "residual_hidden_size": 32, "embedding_dim": 64}
QUICK_MODEL = {"hidden_size": 16, "residual_hidden_size": 8, "embedding_dim": 16}
DEFAULTS = {
    "dataset": FASHION_MNIST,
    "quantizer": "hyperbolic",
    "codebook_size": 512,
    "commitment_weight": None,  # the quantizer's own default
    "schedule": "run_length",
    "offset_init_scale": 1.0,
    "normal_init_scale": 1.0,
    "curvature": 1.0,
    "diversity_weight": 0.0,
    "feature_clip": None,
    "steps": 2000,
    "embedding_dim": None,  # MODEL's (64); the paper's Table 5 setting is 3
    # HyperVQ only, the search for what closes its gap to the anchor (`train_tokenizer`):
    "tau_min": TAU_MIN,  # the Gumbel temperature at the last update
    "quantizer_lr_scale": 1.0,  # the quantizer's learning rate, as a multiple of the model's
    "hyperplane_init": "random",  # or "kmeans": representative points at k-means centroids of the first batch
    "restart_dead_after": None,  # updates after which a hyperplane no training sample chose restarts at a latent
}
CLASSIFIER_LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # early stopping's grid: 1e-2 was its edge
VALIDATION_SHARE = 0.1  # of each training split, stratified: where every choice is made
CLASSIFIER_EPOCHS = 20  # scripts/train_classifier.py's default
EARLY_STOPPING_PATIENCE, MAX_EARLY_STOPPING_EPOCHS = 5, 50
BATCH_SIZE = 128
EVAL_CHUNK = 1000  # test images per forward pass: Fashion-MNIST's 10,000 at once would hold GBs of activations


@dataclasses.dataclass(frozen=True)
class StudyData:
    """How a data set enters the study: its image processor's resize and padding, and how many training images the
    frozen-feature classifier learns from (None: all of them)."""

    description: str
    image_size: int
    pad_to: int | None = None
    classifier_images: int | None = None

    def image_processor(self) -> HyperVQImageProcessor:
        """The processor of the study's images: `image_size` pixels a side (centred on a `pad_to` canvas), mapped to
        [-1, 1]."""
        size = {"height": self.image_size, "width": self.image_size}
        if self.pad_to is None:
            return HyperVQImageProcessor(size=size)
        return HyperVQImageProcessor(size=size, do_pad=True, pad_size={"height": self.pad_to, "width": self.pad_to})


DATASETS = {
    FASHION_MNIST: StudyData(
        "Fashion-MNIST (60,000 training / 10,000 test images, 28×28 padded to 32×32, 8×8 tokens)",
        image_size=28, pad_to=32, classifier_images=6_250,
    ),
    "digits": StudyData("scikit-learn's handwritten digits (1,437 training / 360 test images, 16×16, 4×4 tokens)",
                        image_size=16),
}  # fmt: skip
ANCHOR, ANCHOR_PACKAGE = "vq_pytorch", "vector-quantize-pytorch"  # the reference row from outside the library
STUDY_QUANTIZERS = (*QUANTIZER_TYPES, ANCHOR)  # what a setting's "quantizer" may name


# The library code a study run's numbers come from, this module included: a change to any of it changes
# `code_fingerprint()`, and with it every run's file name. Paths are relative to the `hf_hypervq` package.
FINGERPRINT_SOURCES = (
    "models/hypervq/quantizers.py",  # the five quantizers, their losses and temperature rule
    "models/hypervq/kernels.py",  # the fused kernels and their eager twins
    "models/hypervq/cpu_kernels.py",  # the native CPU kernels: their C source is a string in this file
    "models/hypervq/hyperbolic.py",  # the Poincaré-ball math
    "models/hypervq/checks.py",
    "models/hypervq/configuration_hypervq.py",  # the defaults a setting leaves to the library
    "models/hypervq/modeling_hypervq.py",  # encoder, decoder, training loss, classifier head
    "models/hypervq/image_processing_hypervq.py",  # the pixels the model sees
    "training/data.py",  # the embedded digits and their train/test split
    "training/evaluation.py",  # cluster scores
    "training/metrics.py",  # logit confidence, the noise of the noisy cluster scores
    "metrics/__init__.py",  # the loader of the `evaluate` modules below
    "metrics/codebook_usage/codebook_usage.py",
    "metrics/reconstruction/reconstruction.py",
    "metrics/cluster_quality/cluster_quality.py",
    "training/study.py",  # this module: the protocol constants, the training loop and the measurements
)


def _code_of(path: Path) -> str:
    """A Python file's code without its comments, docstrings and layout (through `ast`): editing documentation
    keeps the finished runs, any change to what runs (string constants, such as the C source, included) does not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the code of `FINGERPRINT_SOURCES` (this module among them): what a study run's numbers
    depend on besides its setting. (`ast`'s rendering of a file may change with the Python version; a run is then
    recomputed, never wrongly reused.)"""
    package = Path(hf_hypervq.__file__).resolve().parent
    files = [(name, package / name) for name in FINGERPRINT_SOURCES]
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(f"{name}\0{_code_of(path)}\0".encode())
    return digest.hexdigest()[:16]


@functools.cache
def anchor_version() -> str | None:
    """The installed vector-quantize-pytorch's version (None when it is not installed)."""
    try:
        return importlib.metadata.version(ANCHOR_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


# The packages whose code computes a run's numbers (besides this repository's): a run is keyed by their versions.
COMPUTING_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pillow", "datasets", "evaluate", "transformers",
                      "geoopt")  # fmt: skip


def package_versions() -> dict:
    """The versions a run was computed with, recorded in its file."""
    return {"hf-hypervq": hf_hypervq.__version__, **computing_versions(),
            ANCHOR_PACKAGE: anchor_version() or "not installed"}  # fmt: skip


@functools.cache
def computing_versions() -> dict:
    """The versions of `COMPUTING_PACKAGES` and of Python."""

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {**{name: version(name) for name in COMPUTING_PACKAGES}, "python": platform.python_version()}


@functools.cache
def data_sha256(dataset: str) -> str:
    """SHA-256 of the files a data set is read from: Fashion-MNIST's four IDX files, scikit-learn's digits file."""
    if dataset == FASHION_MNIST:
        paths = sorted(Path(FASHION_MNIST_FOLDER).glob("*-ubyte.gz"))
    else:
        paths = [Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_environment(dataset: str) -> dict:
    """What changes a run's numbers besides its setting and this repository's code: the CPU kernel path and build
    actually taken (`kernels.cpu_kernel_path`), the `HF_HYPERVQ_*` variables, the data files' SHA-256 and the
    versions of the packages that compute (`computing_versions`)."""
    return {
        "cpu_kernels": kernels.cpu_kernel_path(),
        "variables": {name: value for name, value in sorted(os.environ.items()) if name.startswith("HF_HYPERVQ_")},
        "data_sha256": data_sha256(dataset),
        "versions": computing_versions(),
    }


def keyed_versions(setting: dict) -> dict:
    """The package versions that key a run besides `code_fingerprint()`: vector-quantize-pytorch's for the anchor row
    (its numbers come from that package's code), none for the library's quantizers."""
    return {ANCHOR_PACKAGE: anchor_version()} if setting["quantizer"] == ANCHOR else {}


def provenance(runs: list[dict]) -> str:
    """The code fingerprint and versions of `runs`, as a report states them: one line when all agree, else each
    combination with its number of runs."""
    groups: dict = {}
    for run in runs:
        versions = run.get("versions", {})
        key = (run.get("code_fingerprint", "unknown"), *(f"{k} {v}" for k, v in versions.items()))
        groups[key] = groups.get(key, 0) + 1
    parts = [f"code fingerprint {key[0]} ({', '.join(key[1:])})" + (f", {count} runs" if len(groups) > 1 else "")
             for key, count in groups.items()]  # fmt: skip
    return "; ".join(parts)


def temperature_for(schedule: str, steps: int, tau_min: float = TAU_MIN) -> list[float]:
    """`(tau_max, tau_min, decay)` of a schedule rule, the same rule for every Gumbel quantizer: `run_length` goes
    from 2 at the first update to 0.5 at the last (`train_tokenizer` calls `set_num_updates(step)` after each
    update, as the training loop does, which is what `decay_for_run` counts with), `per_update` is vq-wav2vec's
    0.999995 per update, `constant_1` keeps τ = 1."""
    if schedule == "per_update":
        return [TAU_MAX, TAU_MIN, PER_UPDATE_DECAY]
    if schedule == "run_length":
        return [TAU_MAX, tau_min, decay_for_run(TAU_MAX, tau_min, steps)]
    if schedule == "constant_1":
        return [1.0, 1.0, 1.0]
    raise ValueError(f"unknown schedule {schedule!r}")


def _stratified_sample(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A seeded mask of `fraction` of each class's examples."""
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        chosen[members[: round(fraction * len(members))]] = True
    return chosen


@functools.cache
def load_tensors(dataset: str) -> dict:
    """A data set's splits as `[-1, 1]` tensors (its image processor's output), read through the library's data path:
    `train` (what the tokenizers train on) and `validation` (a fixed, stratified `VALIDATION_SHARE` of the training
    split), `test`, and the classifier's: a fixed, stratified subset of `train` (`classifier_images`), divided 80/20
    (stratified, seeded) into `classifier_train` and `classifier_held_out` (early stopping's). Cached: a worker
    process loads each data set once."""
    spec = DATASETS[dataset]
    processor = spec.image_processor()
    tensors = {}
    for split in ("train", "test"):
        data = load_image_dataset(None if dataset == "digits" else dataset, split=split, require_labels=True)
        images = [image.convert("RGB") for image in data["image"]]
        tensors[split] = (processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(data["label"]))
    pixels, labels = tensors["train"]
    generator = torch.Generator().manual_seed(0)
    validation = _stratified_sample(labels, VALIDATION_SHARE, generator)
    tensors["validation"] = (pixels[validation], labels[validation])
    tensors["train"] = pixels, labels = (pixels[~validation], labels[~validation])
    if spec.classifier_images is not None:
        subset = _stratified_sample(labels, spec.classifier_images / len(labels), generator)
        pixels, labels = pixels[subset], labels[subset]
    held_out = _stratified_sample(labels, 0.2, generator)
    tensors["classifier_train"] = (pixels[~held_out], labels[~held_out])
    tensors["classifier_held_out"] = (pixels[held_out], labels[held_out])
    return tensors


def batches(num_samples: int, seed: int, epoch: int):
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order.split(BATCH_SIZE)


class VectorQuantizeAnchor(VectorQuantizer):
    """vector-quantize-pytorch's `VectorQuantize` behind the library's quantizer interface, so that it runs inside
    `HyperVQVAEModel` (`build_tokenizer` swaps it in) for the study's anchor row; nothing in the library uses it.

    The base class gives it the same contract as the five quantizers: channel-last `z` `(..., dim)` checked, computed
    in float32, a `QuantizerOutput` (`logits=None`: a nearest-neighbour quantizer has none), `code_perplexity`,
    `indices_to_codes` and `codebook` (read by the classifier's features and by `decode_codebook`, the paper's
    Figure 5). In training `VectorQuantize` moves its codebook by EMA (a buffer: the optimizer never sees it),
    replaces dead codes and returns its weighted commitment loss; in eval it only looks codes up (loss 0).

    Configured as vector-quantize-pytorch's README recommends for a VQ-VAE (checked against its README and 1.32's
    `VectorQuantize.__init__`): `kmeans_init=True, kmeans_iters=10` ("Initialization": SoundStream's k-means on the
    first batch), `threshold_ema_dead_code=2` ("Expiring stale codes": a code whose EMA cluster size drops below 2
    is replaced by a random vector of the batch), `rotation_trick=True` ("Gradient Computation"; the package's
    default for dim > 1, stated so that a change of default cannot change the row), and the VQ-VAE paper's EMA
    decay 0.99 and commitment weight β = 0.25 (the README's first example shows decay 0.8 and weight 1; a setting's
    `commitment_weight` overrides 0.25).
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25):
        super().__init__(dim, codebook_size)
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError:
            raise ImportError(f"the {ANCHOR!r} row needs {ANCHOR_PACKAGE}: pip install -e '.[dev]'") from None
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            decay=0.99,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=2,
            commitment_weight=commitment_weight,
            rotation_trick=True,
        )

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.codebook.float()  # (K, dim); a buffer, so no gradient flows into it

    def _quantize(self, z):
        # Its k-means initialisation runs on the first batch it sees, in whichever mode: an evaluation before any
        # training would silently set the codebook from evaluation data (a host sync, but only in eval).
        if not self.training and not bool(self.vq._codebook.initted):
            raise RuntimeError(f"{type(self).__name__}: train it before evaluating: its codebook is set by k-means "
                               "on its first training batch")  # fmt: skip
        quantized, indices, loss = self.vq(z[None])  # VectorQuantize takes (batch, tokens, dim); (N, dim) is one row
        return quantized[0], indices[0], loss.reshape(()), None


def build_config(setting: dict, model_options: dict) -> HyperVQVAEConfig:
    return HyperVQVAEConfig(
        quantizer_type=setting["quantizer"],
        codebook_size=setting["codebook_size"],
        commitment_weight=setting["commitment_weight"],
        curvature=setting["curvature"],
        offset_init_scale=setting["offset_init_scale"],
        normal_init_scale=setting["normal_init_scale"],
        diversity_weight=setting["diversity_weight"],
        feature_clip=setting["feature_clip"],
        gumbel_temperature=temperature_for(setting["schedule"], setting["steps"], setting["tau_min"]),
        **model_options,
    )


def build_tokenizer(setting: dict, model_options: dict) -> HyperVQVAEModel:
    """The VQ-VAE of a setting. For the anchor row it is KmeansVQ's model (the same encoder, decoder and initial
    weights under the same seed) with its quantizer replaced by `VectorQuantizeAnchor`; the config's quantizer fields
    then describe nothing that runs."""
    if setting["quantizer"] not in STUDY_QUANTIZERS:
        raise ValueError(f"setting['quantizer'] must be one of {STUDY_QUANTIZERS}, got {setting['quantizer']!r}")
    if setting["quantizer"] != ANCHOR:
        return HyperVQVAEModel(build_config(setting, model_options))
    model = HyperVQVAEModel(build_config({**setting, "quantizer": "kmeans"}, model_options))
    weight = setting["commitment_weight"]
    model.quantizer = VectorQuantizeAnchor(
        model.config.embedding_dim,
        setting["codebook_size"],
        **({} if weight is None else {"commitment_weight": weight}),
    )
    return model


HYPERPLANE_OPTIONS = ("quantizer_lr_scale", "hyperplane_init", "restart_dead_after")


@torch.no_grad()
def _latents(model, pixels) -> torch.Tensor:
    """The encoder's latents of `pixels` `(N, dim)`: the space HyperVQ's code vectors live in (each hyperplane's
    representative point mapped back to the tangent space, `r_k a_k / ||a_k||`)."""
    return model.encode(pixels).latents.permute(0, 2, 3, 1).reshape(-1, model.config.embedding_dim).float()


@torch.no_grad()
def _place_hyperplanes(quantizer, codes: torch.Tensor, points: torch.Tensor) -> None:
    """Move hyperplanes `codes` so that their code vectors are `points` (their representative points are then those
    latents' images on the ball), keeping their normals' lengths (the logits' sharpness)."""
    quantizer.normal_directions[codes] = points
    quantizer.offsets[codes] = points.norm(dim=-1)


@torch.no_grad()
def kmeans_init_hyperplanes(model, pixels, seed: int, iterations: int = 10) -> None:
    """Data-dependent initialisation (SoundStream's k-means init, for hyperplanes): the code vectors at k-means
    centroids of a batch's latents, started from distinct latents drawn with `seed`."""
    points = _latents(model, pixels)
    k = model.quantizer.codebook_size
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(-1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    _place_hyperplanes(model.quantizer, torch.arange(k), centroids)


def train_tokenizer(setting: dict, model_options: dict, seed: int, data: dict):
    """Train one tokenizer; return it (in eval mode) and the codes its training steps used in the last epoch.
    HyperVQ's search options (`HYPERPLANE_OPTIONS`): the quantizer's learning rate, a k-means initialisation of the
    hyperplanes on the first batch, and restarting, every `restart_dead_after` updates, the hyperplanes that won no
    training latent's argmax since the last check at latents of the current batch (as vector-quantize-pytorch expires
    codes)."""
    torch.manual_seed(seed)
    model = build_tokenizer(setting, model_options).train()
    searched = [name for name in HYPERPLANE_OPTIONS if setting.get(name, DEFAULTS[name]) != DEFAULTS[name]]
    if searched and setting["quantizer"] != "hyperbolic":
        raise ValueError(f"{', '.join(searched)} apply to HyperVQ (quantizer 'hyperbolic') only")
    quantizer_parameters = list(model.quantizer.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in quantizer_parameters)]
    groups = [
        {"params": others},
        {"params": quantizer_parameters, "lr": 1e-3 * setting.get("quantizer_lr_scale", 1.0)},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    pixels = data["train"][0]
    steps_per_epoch = math.ceil(len(pixels) / BATCH_SIZE)
    train_tokens, step = [], 0
    restart_after = setting.get("restart_dead_after")
    chosen = torch.zeros(setting["codebook_size"], dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(math.ceil(setting["steps"] / steps_per_epoch)):
        for index in batches(len(pixels), seed, epoch):
            if step == 0 and setting.get("hyperplane_init") == "kmeans":
                kmeans_init_hyperplanes(model, pixels[index], seed)
            out = model(pixels[index])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            model.set_num_updates(step)
            if restart_after:
                chosen[out.logits.detach().argmax(-1).reshape(-1)] = (
                    True  # the argmax: Gumbel samples reach every code
                )
                if step % restart_after == 0 and not chosen.all():
                    dead = (~chosen).nonzero()[:, 0]
                    points = _latents(model, pixels[index])
                    draw = torch.randint(len(points), (len(dead),), generator=generator)
                    _place_hyperplanes(model.quantizer, dead, points[draw])
                    chosen[:] = False
            if setting["steps"] - step < steps_per_epoch:
                train_tokens.append(out.image_tokens.detach())
            if step == setting["steps"]:
                break
    return model.eval(), torch.cat(train_tokens)


def usage(tokens: torch.Tensor, codebook_size: int) -> dict:
    """Perplexity, codes used and dead codes of code ids, by the `codebook_usage` module."""
    result = metric("codebook_usage").compute(predictions=tokens.reshape(-1).numpy(), codebook_size=codebook_size)
    return {k: result[k] for k in ("perplexity", "codes_used", "dead_codes")}


VALIDATION_METRICS = ("reconstruction_mse", "perplexity", "codes_used", "dead_codes", "silhouette", "davies_bouldin")


@torch.no_grad()
def tokenizer_metrics(model, train_tokens, data, split: str = "test", noisy: bool = True) -> dict:
    """A split's quality (MSE, eval-argmax usage, cluster scores on clean and, with `noisy`, perturbed inputs) and the
    mechanism numbers: training-sample perplexity, latent norms, code-vector norms, logit margin and max
    probability."""
    pixels = data[split][0]
    quantizer, config = model.quantizer, model.config
    reconstructions, latents, tokens, max_probabilities, margins = [], [], [], [], []
    for chunk in pixels.split(EVAL_CHUNK):
        out = model(chunk)  # carries the latents, codes and logits too
        reconstructions.append(out.reconstruction)
        latents.append(out.latents.permute(0, 2, 3, 1).reshape(-1, config.embedding_dim))
        tokens.append(out.image_tokens)
        if out.logits is not None:
            for store, values in zip((max_probabilities, margins), logit_confidence_per_row(out.logits)):
                store.append(values)
    latents, tokens = torch.cat(latents), torch.cat(tokens)
    results = {
        "reconstruction_mse": metric("reconstruction").compute(
            predictions=torch.cat(reconstructions).flatten(1).numpy(),
            references=pixels.flatten(1).numpy(),
            image_shape=tuple(pixels.shape[1:]),
            data_range=2.0,
        )["mse"],
        **usage(tokens, config.codebook_size),
        "train_perplexity": usage(train_tokens, config.codebook_size)["perplexity"],
        "latent_norm": latents.norm(dim=-1).mean().item(),
        "code_vector_norm": quantizer.codebook.norm(dim=-1).mean().item(),
        "code_counts": torch.bincount(tokens.reshape(-1), minlength=config.codebook_size).tolist(),
    }
    if hasattr(quantizer, "curvature"):  # distance from the origin on the ball, in units of its radius
        ball = quantizer._to_ball(latents)
        results["ball_norm"] = (ball.norm(dim=-1) * quantizer.curvature**0.5).mean().item()
    if max_probabilities:
        results["mean_max_probability"] = torch.cat(max_probabilities).mean().item()
        results["logit_margin"] = torch.cat(margins).mean().item()
    results.update(cluster_scores(latents, tokens.reshape(-1), ""))
    if not noisy:
        return results
    noisy = [model.encode(chunk) for chunk in perturb(pixels, torch.Generator().manual_seed(0)).split(EVAL_CHUNK)]
    noisy_latents = torch.cat([n.latents.permute(0, 2, 3, 1).reshape(-1, config.embedding_dim) for n in noisy])
    results.update(cluster_scores(noisy_latents, torch.cat([n.image_tokens.reshape(-1) for n in noisy]), "noisy_"))
    return results


@torch.no_grad()
def _features(model, pixels) -> torch.Tensor:
    """The classifier's input: the frozen tokenizer's eval-mode quantized latents (fixed, so computed once)."""
    return torch.cat([model.encode(chunk).quantized_latents for chunk in pixels.split(EVAL_CHUNK)])


@torch.no_grad()
def _accuracy(head, features, labels) -> float:
    head.eval()
    accuracy = (head(features).argmax(-1) == labels).double().mean().item()
    head.train()
    return accuracy


def _train_head(head, features, labels, learning_rate, seed, *, epochs, validation=None):
    """Train a classifier head on cached features for `epochs` epochs, or (with `validation`) until
    `EARLY_STOPPING_PATIENCE` epochs bring no better validation accuracy (at most `epochs`), keeping the best weights;
    returns that accuracy."""
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=0.0)
    best, best_state, since_best = -1.0, None, 0
    for epoch in range(epochs):
        for index in batches(len(labels), seed, epoch):
            F.cross_entropy(head(features[index]), labels[index]).backward()
            optimizer.step()
            optimizer.zero_grad()
        if validation is not None:
            accuracy = _accuracy(head, *validation)
            if accuracy > best:
                best, best_state, since_best = accuracy, {k: v.clone() for k, v in head.state_dict().items()}, 0
            elif (since_best := since_best + 1) >= EARLY_STOPPING_PATIENCE:
                break
    if validation is None:
        return None
    head.load_state_dict(best_state)
    return best


def new_head(config: HyperVQVAEConfig, seed: int, normalize: bool) -> torch.nn.Module:
    """The classifier's trainable part, `HyperVQVAEForImageClassification`'s, initialised from `seed` alone: built
    first, then its weights drawn afresh, so every quantizer's head starts from the same weights for a seed (building
    the whole classifier draws the tokenizer's weights first, and each quantizer draws differently)."""
    options = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    config = HyperVQVAEConfig(**{**options, "num_labels": 10, "classifier_normalize_features": normalize})
    classifier = HyperVQVAEForImageClassification(config)
    head = torch.nn.Sequential(classifier.feature_norm, classifier.classifier)
    torch.manual_seed(seed)
    for module in head.modules():
        classifier._init_weights(module)
    return head


def classifier_metrics(model, seed: int, data: dict) -> dict:
    """Validation and test accuracy of frozen-feature classifiers on the tokenizer's codes, under the three protocols
    (the module's docstring): `{"validation": {protocol: accuracy}, protocol: test accuracy, ...}`."""
    features = {split: (_features(model, data[split][0]), data[split][1])
                for split in ("classifier_train", "classifier_held_out", "validation", "test")}  # fmt: skip
    results, validation = {}, {}
    for normalize, key in ((True, "accuracy"), (False, "accuracy_unnormalized")):
        head = new_head(model.config, seed, normalize)
        _train_head(head, *features["classifier_train"], 1e-3, seed, epochs=CLASSIFIER_EPOCHS)
        validation[key], results[key] = (_accuracy(head, *features[split]) for split in ("validation", "test"))
    best = None
    for learning_rate in CLASSIFIER_LEARNING_RATES:
        head = new_head(model.config, seed, False)
        held_out = _train_head(head, *features["classifier_train"], learning_rate, seed,
                               epochs=MAX_EARLY_STOPPING_EPOCHS, validation=features["classifier_held_out"])  # fmt: skip
        if best is None or held_out > best[0]:
            best = (held_out, learning_rate, *(_accuracy(head, *features[s]) for s in ("validation", "test")))
    validation["accuracy_early_stopping"] = best[2]
    results.update(early_stopping_held_out_accuracy=best[0], early_stopping_learning_rate=best[1],
                   accuracy_early_stopping=best[3], validation=validation)  # fmt: skip
    return results


def setting_of(overrides: dict, quick: bool = False) -> dict:
    """`DEFAULTS` with `overrides`; `quick`: digits, 1/50 of the updates, K <= 64 (a smoke test)."""
    setting = {**DEFAULTS, **overrides}
    if quick:
        setting["dataset"] = "digits"
        setting["steps"] = max(10, setting["steps"] // 50)
        setting["codebook_size"] = min(setting["codebook_size"], 64)
    return setting


def run_path(runs_dir, setting: dict, seed: int, quick: bool) -> Path:
    """The file of one run: named by its setting, model sizes, code fingerprint and (for the anchor row)
    vector-quantize-pytorch's version, hashed, and by its seed."""
    key = {**setting, "model": model_options(setting, quick), "code": code_fingerprint(),
           "environment": run_environment(setting["dataset"])}  # fmt: skip
    if versions := keyed_versions(setting):  # only where they matter: the library's rows keep their names
        key["versions"] = versions
    key = json.dumps(key, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(runs_dir) / f"{setting['quantizer']}-K{setting['codebook_size']}-{digest}-seed{seed}.json"


def model_options(setting: dict, quick: bool) -> dict:
    """The VQ-VAE's sizes for a setting: `MODEL` (`QUICK_MODEL`), with the setting's `embedding_dim` if it has one."""
    options = QUICK_MODEL if quick else MODEL
    return {**options, "embedding_dim": setting.get("embedding_dim") or options["embedding_dim"]}


def measure(setting: dict, seed: int, quick: bool) -> dict:
    """Train one setting × seed and measure it: the tokenizer's numbers, the classifiers', the compute time (this
    process's CPU seconds: a paused or crowded machine does not inflate them)."""
    torch.set_num_threads(1)  # one thread per worker process: the small convolutions scale poorly across threads
    data = load_tensors(setting["dataset"])
    started = time.process_time()
    model, train_tokens = train_tokenizer(setting, model_options(setting, quick), seed, data)
    result = tokenizer_metrics(model, train_tokens, data)
    validation = tokenizer_metrics(model, train_tokens, data, split="validation", noisy=False)
    result.update(classifier_metrics(model, seed, data))
    result["validation"] = {**{name: validation.get(name) for name in VALIDATION_METRICS}, **result["validation"]}
    if model.config.embedding_dim == 3:  # the paper's Table 5 setting: its scatter is drawn from the run's file
        result["scatter_points"] = scatter_points(model, data["test"][0])
    result["compute_seconds"] = time.process_time() - started
    result["decoded_codebook"] = codebook_strip(model)  # run_one stores it as a PNG, not in the JSON
    return result


def codebook_strip(model) -> Image.Image:
    """Every code of a tokenizer decoded on its own as a 1×1 latent (the paper's Figure 5), side by side in code order:
    one f × K·f picture, stored beside the run's JSON."""
    with torch.no_grad():
        codes = model.decode_codebook()  # (K, C, f, f)
    strip = torch.cat(list(codes), dim=-1)[None]  # (1, C, f, K·f)
    return HyperVQImageProcessor().postprocess_reconstruction(strip)[0]


def decoded_codebook(runs_dir, setting: dict, seed: int, quick: bool) -> dict | None:
    """A finished run's decoded codes (`codebook_strip`, cut into K pictures of f×f pixels) and `code_counts` (how often
    the eval argmax picks each code on the test split), for `report.plot_decoded_codebooks`; None if the run has not
    finished on this code."""
    path = run_path(runs_dir, setting, seed, quick)
    picture = path.with_suffix(".png")
    if not (path.exists() and picture.exists()):
        return None
    counts = json.loads(path.read_text())["code_counts"]
    with Image.open(picture) as strip:
        size = strip.height
        images = [strip.crop((i * size, 0, (i + 1) * size, size)) for i in range(strip.width // size)]
    return {"images": images, "code_counts": counts}


def run_one(setting: dict, seed: int, quick: bool, runs_dir) -> dict:
    """Train and measure one setting × seed, or read it back if it finished before on the same code."""
    fingerprint, versions = code_fingerprint(), keyed_versions(setting)
    environment = run_environment(setting["dataset"])
    path = run_path(runs_dir, setting, seed, quick)
    if path.exists():
        finished = json.loads(path.read_text())
        recorded = finished.get("versions", {})
        # the name says so too, unless the file was copied
        if (finished.get("code_fingerprint") == fingerprint and finished.get("environment") == environment
                and all(recorded.get(k) == v for k, v in versions.items())):  # fmt: skip
            return finished
    result = {"seed": seed, "setting": setting, **measure(setting, seed, quick)}
    result.update(code_fingerprint=fingerprint, environment=environment, versions=package_versions())
    path.parent.mkdir(parents=True, exist_ok=True)
    if (picture := result.pop("decoded_codebook", None)) is not None:  # first: the JSON marks a finished run
        partial = path.with_name(f".partial-{path.stem}.png")
        picture.save(partial, format="PNG")
        os.replace(partial, path.with_suffix(".png"))
    write_text(path, json.dumps(result, indent=1))
    return result
