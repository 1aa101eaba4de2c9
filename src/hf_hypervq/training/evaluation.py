"""Evaluation of the three model kinds over a data loader, distributed-safe (`gather_for_metrics` drops the samples
accelerate pads onto uneven last batches), shared by the training scripts and `scripts/evaluate.py`."""

import torch
from accelerate import Accelerator

from .metrics import (
    COMMON_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    codebook_usage,
    davies_bouldin_index,
    logit_confidence_per_row,
    mean_corruption_error,
    perturb,
    silhouette_score,
    top1_accuracy,
)


# Cluster metrics use at most this many latent vectors (silhouette is quadratic in them).
MAX_CLUSTER_POINTS = 4000


def cluster_scores(latents: torch.Tensor, codes: torch.Tensor, prefix: str = "", seed: int = 0) -> dict:
    """Silhouette and Davies-Bouldin of latent vectors `(N, D)` clustered by their code ids `(N,)`, on a seeded
    sample of at most `MAX_CLUSTER_POINTS`; empty when fewer than two codes occur."""
    keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:MAX_CLUSTER_POINTS]
    if len(codes[keep].unique()) < 2:
        return {}
    return {
        f"{prefix}silhouette": silhouette_score(latents[keep], codes[keep]),
        f"{prefix}davies_bouldin": davies_bouldin_index(latents[keep], codes[keep]),
    }


@torch.no_grad()
def evaluate_tokenizer(model, loader, accelerator: Accelerator, seed: int = 0) -> dict:
    """Reconstruction MSE, codebook usage of the eval argmax (perplexity, codes used, dead codes, per-code counts),
    for the MLR/Gumbel quantizers how decided their logits are (mean max probability, top-1 − top-2 margin; see
    `metrics.logit_confidence`), and the cluster quality of the pre-quantization latents with code ids as clusters
    (silhouette, Davies-Bouldin), on clean inputs and on perturbed ones (paper Table 5)."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    codebook_size = unwrapped.config.codebook_size
    generator = torch.Generator().manual_seed(seed)
    squared_errors, tokens, max_probabilities, margins = [], [], [], []
    clusters = {"": ([], []), "noisy_": ([], [])}  # latent vectors and their codes, clean and perturbed
    collected = 0  # the same on every process: it counts gathered vectors
    for batch in loader:
        pixel_values = batch["pixel_values"]
        out = model(pixel_values=pixel_values)
        per_image_mse = (out.reconstruction.float() - pixel_values.float()).pow(2).flatten(1).mean(1)
        per_image_mse, image_tokens = accelerator.gather_for_metrics((per_image_mse, out.image_tokens))
        squared_errors.append(per_image_mse.cpu())
        tokens.append(image_tokens.cpu())
        if out.logits is not None:  # how decided the MLR/Gumbel quantizer is, per latent
            confidence = logit_confidence_per_row(out.logits)
            for store, values in zip((max_probabilities, margins), accelerator.gather_for_metrics(confidence)):
                store.append(values.cpu())
        if collected >= MAX_CLUSTER_POINTS:  # enough latents for the cluster scores: skip the rest
            continue
        noisy = unwrapped.encode(perturb(pixel_values.cpu(), generator).to(pixel_values))
        latents, noisy_tokens, noisy_latents = accelerator.gather_for_metrics(
            (out.latents.float(), noisy.image_tokens, noisy.latents.float())
        )
        for (vectors, codes), (z, k) in zip(
            clusters.values(), [(latents, image_tokens), (noisy_latents, noisy_tokens)]
        ):
            vectors.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())  # (B·h·w, D)
            codes.append(k.reshape(-1).cpu())
        collected += image_tokens.numel()
    squared_errors, tokens = torch.cat(squared_errors), torch.cat(tokens)
    results = {"reconstruction_mse": squared_errors.mean().item(), "num_eval_samples": len(squared_errors)}
    results.update(codebook_usage(tokens, codebook_size))
    if max_probabilities:
        results["mean_max_probability"] = torch.cat(max_probabilities).mean().item()
        results["logit_margin"] = torch.cat(margins).mean().item()
    for prefix, (vectors, codes) in clusters.items():
        results.update(cluster_scores(torch.cat(vectors), torch.cat(codes), prefix, seed))
    results["code_counts"] = torch.bincount(tokens.reshape(-1), minlength=codebook_size).tolist()
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
    }


def evaluate_corruptions(evaluate_loader, corruptions, severities=(1, 2, 3, 4, 5)) -> dict:
    """Top-1 error under each (corruption, severity), then AlexNet-normalised CE and mCE
    (docs/method.md#corruption-error).

    `evaluate_loader(corruption, severity) -> {"accuracy": ...}` evaluates the model on the corrupted split."""
    errors = {name: [1 - evaluate_loader(name, s)["accuracy"] for s in severities] for name in corruptions}
    summary = mean_corruption_error(errors)

    def mean_accuracy(names):  # paper Table 6's "Known" and "Unknown" columns
        rates = [1 - e for name in names if name in errors for e in errors[name]]
        return sum(rates) / len(rates) if rates else None

    return {
        "mCE": summary["mCE"],
        "unknown_mCE": summary["unknown_mCE"],
        "known_accuracy": mean_accuracy(COMMON_CORRUPTIONS),
        "unknown_accuracy": mean_accuracy(EXTRA_CORRUPTIONS),
        "corruption_errors": summary["corruption_errors"],
    }
