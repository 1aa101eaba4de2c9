"""Evaluation of the three model kinds over a data loader, distributed-safe (`gather_for_metrics` drops the samples
accelerate pads onto uneven last batches), shared by the training scripts and `scripts/evaluate_model.py`. Every number
that has an `evaluate` module (`hf_hypervq.metrics`) is computed by it; each result carries its `protocol` (how
many images, what resolution, how many tokens per image, ...), so that numbers made differently never look alike."""

import functools
import math

import torch
from accelerate import Accelerator

from .. import metrics
from .metrics import logit_confidence_per_row, perturb, top1_accuracy


# Cluster metrics use at most this many latent vectors (silhouette is quadratic in them).
MAX_CLUSTER_POINTS = 4000


@functools.cache
def metric(name: str):
    """The loaded `evaluate` module `name`, once per process (loading one takes a moment)."""
    return metrics.load(name)


def pixel_range(processor) -> float:
    """The span of the pixel values `processor` produces: 1/std (2.0 for the tokenizer's [-1, 1])."""
    stds = set(processor.image_std) if processor.do_normalize else {1.0}
    if len(stds) != 1:
        raise ValueError(f"PSNR and SSIM need one pixel range for all channels; the processor's std is {stds}")
    return (1.0 if processor.do_rescale else 255.0) / stds.pop()


def protocol_line(protocol: dict) -> str:
    """A result's protocol in one line, e.g. "scikit-learn/digits test, 360 images, 16x16 pixels, 16 tokens per
    image (4x4 grid, downsampling 4), pixel range 2.0, SSIM window uniform 7x7"."""
    parts = [" ".join(str(protocol[k]) for k in ("dataset", "split") if k in protocol)]
    if "num_images" in protocol:
        parts.append(f"{protocol['num_images']} images")
    if "resolution" in protocol:
        parts.append("x".join(map(str, protocol["resolution"])) + " pixels")
    if "tokens_per_image" in protocol:
        grid = "x".join(map(str, protocol["token_grid"]))
        parts.append(f"{protocol['tokens_per_image']} tokens per image ({grid} grid, downsampling "
                     f"{protocol['downsampling_factor']})")  # fmt: skip
    if "pixel_range" in protocol:
        parts.append(f"pixel range {protocol['pixel_range']}")
    if protocol.get("ssim_window"):
        parts.append(f"SSIM window {protocol['ssim_window']}")
    return ", ".join(part for part in parts if part)


def cluster_scores(latents: torch.Tensor, codes: torch.Tensor, prefix: str = "", seed: int = 0) -> dict:
    """Silhouette and Davies-Bouldin of latent vectors `(N, D)` clustered by their code ids `(N,)`, on a seeded
    sample of at most `MAX_CLUSTER_POINTS`; empty when fewer than two codes occur."""
    keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:MAX_CLUSTER_POINTS]
    if len(codes[keep].unique()) < 2:
        return {}
    scores = metric("cluster_quality").compute(predictions=codes[keep].numpy(), references=latents[keep].numpy())
    return {f"{prefix}silhouette": scores["silhouette"], f"{prefix}davies_bouldin": scores["davies_bouldin"]}


@torch.no_grad()
def evaluate_tokenizer(
    model, loader, accelerator: Accelerator, seed: int = 0, data_range: float = 2.0, full: bool = True
) -> dict:
    """Reconstruction MSE, PSNR and SSIM (`data_range`: the span of the pixel values, see `pixel_range`), codebook
    usage of the eval argmax (perplexity, codes used, dead codes, per-code counts), for the MLR/Gumbel quantizers how
    decided their logits are (mean max probability, top-1 − top-2 margin; `training.metrics.logit_confidence`), and the
    cluster quality of the pre-quantization latents with code ids as clusters (silhouette, Davies-Bouldin), on clean
    inputs and on perturbed ones (paper Table 5). `protocol` gives the images, resolution and tokens behind them.
    `full=False` leaves out the slow ones, SSIM and the cluster scores, as the training scripts do before their last
    evaluation."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    codebook_size = unwrapped.config.codebook_size
    generator = torch.Generator().manual_seed(seed)
    sums, tokens, max_probabilities, margins = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0}, [], [], []
    clusters = {"": ([], []), "noisy_": ([], [])}  # latent vectors and their codes, clean and perturbed
    collected = num_images = 0  # the same on every process: they count gathered vectors and images
    for batch in loader:
        pixel_values = batch["pixel_values"]
        out = model(pixel_values=pixel_values)
        reconstruction, originals, image_tokens = accelerator.gather_for_metrics(
            (out.reconstruction.float(), pixel_values.float(), out.image_tokens)
        )
        shape = tuple(originals.shape[1:])
        quality = metric("reconstruction").compute(
            predictions=reconstruction.flatten(1).cpu().numpy(), references=originals.flatten(1).cpu().numpy(),
            image_shape=shape, data_range=data_range, structural_similarity=full,
        )  # fmt: skip
        for key in sums:  # per-image means, so batches combine weighted by their size
            sums[key] = None if quality[key] is None else sums[key] + quality[key] * len(originals)
        num_images += len(originals)
        tokens.append(image_tokens.cpu())
        if out.logits is not None:  # how decided the MLR/Gumbel quantizer is, per latent
            confidence = logit_confidence_per_row(out.logits)
            for store, values in zip((max_probabilities, margins), accelerator.gather_for_metrics(confidence)):
                store.append(values.cpu())
        if not full or collected >= MAX_CLUSTER_POINTS:  # enough latents for the cluster scores: skip the rest
            continue
        # through the prepared model, like the clean batch: under FSDP the unwrapped one holds a shard of the weights
        noisy = model(pixel_values=perturb(pixel_values.cpu(), generator).to(pixel_values))
        latents, noisy_tokens, noisy_latents = accelerator.gather_for_metrics(
            (out.latents.float(), noisy.image_tokens, noisy.latents.float())
        )
        for (vectors, codes), (z, k) in zip(
            clusters.values(), [(latents, image_tokens), (noisy_latents, noisy_tokens)]
        ):
            vectors.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())  # (B·h·w, D)
            codes.append(k.reshape(-1).cpu())
        collected += image_tokens.numel()
    tokens = torch.cat(tokens)
    results = {
        "reconstruction_mse": sums["mse"] / num_images,
        "psnr": sums["psnr"] / num_images,
        "ssim": None if sums["ssim"] is None else sums["ssim"] / num_images,
        "num_eval_samples": num_images,
    }
    usage = metric("codebook_usage").compute(predictions=tokens.reshape(-1).numpy(), codebook_size=codebook_size)
    results.update({k: usage[k] for k in ("perplexity", "codes_used", "dead_codes")})
    if max_probabilities:
        results["mean_max_probability"] = torch.cat(max_probabilities).mean().item()
        results["logit_margin"] = torch.cat(margins).mean().item()
    for prefix, (vectors, codes) in clusters.items() if full else ():
        results.update(cluster_scores(torch.cat(vectors), torch.cat(codes), prefix, seed))
    results["code_counts"] = torch.bincount(tokens.reshape(-1), minlength=codebook_size).tolist()
    results["protocol"] = {
        "num_images": num_images,
        "resolution": list(shape[1:]),
        "tokens_per_image": int(tokens[0].numel()),
        "token_grid": list(tokens.shape[1:]),
        "downsampling_factor": unwrapped.config.downsampling_factor,
        "pixel_range": data_range,
        "ssim_window": quality["ssim_window"],
        "cluster_points": min(collected, MAX_CLUSTER_POINTS),
    }
    return results


@torch.no_grad()
def evaluate_classifier(model, loader, accelerator: Accelerator) -> dict:
    """Top-1 accuracy and mean cross-entropy of an image classifier."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        out = model(pixel_values=batch["pixel_values"])
        gathered_logits, gathered_labels = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
        logits.append(gathered_logits.cpu())
        labels.append(gathered_labels.cpu())
    logits, labels = torch.cat(logits), torch.cat(labels)
    return {
        "accuracy": top1_accuracy(logits, labels),
        "eval_loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "num_eval_samples": len(labels),
        "protocol": {"num_images": len(labels), "resolution": list(batch["pixel_values"].shape[2:])},
    }


def evaluate_corruptions(evaluate_loader, corruptions, severities=(1, 2, 3, 4, 5)) -> dict:
    """Top-1 error under each (corruption, severity), then AlexNet-normalised CE and mCE with the known/unknown
    split (the `mean_corruption_error` module; docs/method.md#corruption-error).

    `evaluate_loader(corruption, severity) -> {"accuracy": ...}` evaluates the model on the corrupted split."""
    rates, names = [], []
    for name in corruptions:
        for severity in severities:
            rates.append(1 - evaluate_loader(name, severity)["accuracy"])
            names.append(name)
    summary = metric("mean_corruption_error").compute(predictions=rates, references=names)
    return {**summary, "severities": list(severities)}


@torch.no_grad()
def evaluate_prior(prior, loader, accelerator: Accelerator) -> dict:
    """Held-out negative log-likelihood of the tokens, in nats and in bits per token."""
    prior.eval()
    losses = []
    for batch in loader:
        logits = prior(**batch).logits
        per_grid = (
            torch.nn.functional.cross_entropy(logits.float(), batch["image_tokens"], reduction="none")
            .flatten(1)
            .mean(1)
        )
        losses.append(accelerator.gather_for_metrics(per_grid).cpu())
    nats = torch.cat(losses).mean().item()
    return {"eval_loss": nats, "bits_per_token": nats / math.log(2), "num_eval_samples": sum(len(x) for x in losses)}
