"""Metrics against values computed by hand or by scikit-learn."""

import math

import numpy as np
import pytest
import sklearn.metrics
import torch

from hf_hypervq.training.metrics import (
    ALEXNET_ERRORS,
    COMMON_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    codebook_usage,
    davies_bouldin_index,
    logit_confidence,
    mean_corruption_error,
    perturb,
    reconstruction_mse,
    silhouette_score,
    top1_accuracy,
)


def clustered_points(seed=0, n=600, clusters=7, dim=5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 3
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silhouette_and_davies_bouldin_match_scikit_learn(seed):
    points, labels = clustered_points(seed)
    labels[0] = 99  # a cluster of one point (silhouette 0 by convention)
    expected = sklearn.metrics.silhouette_score(points.double().numpy(), labels.numpy())
    assert silhouette_score(points, labels, chunk_size=97) == pytest.approx(expected, abs=1e-10)
    expected_db = sklearn.metrics.davies_bouldin_score(points.double().numpy(), labels.numpy())
    assert davies_bouldin_index(points, labels) == pytest.approx(expected_db, rel=1e-10)


def test_davies_bouldin_with_many_clusters_matches_scikit_learn():
    """64 clusters, as a tokenizer's codes give: more than the 25 rows above which cdist would take its matmul path."""
    points, labels = clustered_points(0, clusters=64, n=2000, dim=64)
    expected = sklearn.metrics.davies_bouldin_score(points.double().numpy(), labels.numpy())
    assert davies_bouldin_index(points, labels) == pytest.approx(expected, rel=1e-10)


def test_silhouette_by_hand():
    points = torch.tensor([[0.0], [1.0], [5.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    a = [1, 1, 2, 2]  # mean distance to the own cluster
    b = [6, 5, 4.5, 6.5]  # mean distance to the other cluster
    expected = np.mean([(bi - ai) / max(ai, bi) for ai, bi in zip(a, b)])
    assert silhouette_score(points, labels) == pytest.approx(expected)


def test_cluster_metrics_need_two_clusters():
    with pytest.raises(ValueError, match="clusters"):
        silhouette_score(torch.randn(10, 2), torch.zeros(10))


def test_codebook_usage_by_hand():
    tokens = torch.tensor([0, 0, 1, 3])
    usage = codebook_usage(tokens, codebook_size=8)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert usage["perplexity"] == pytest.approx(math.exp(entropy))
    assert usage["codes_used"] == pytest.approx(3 / 8)
    assert codebook_usage(torch.zeros(5, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)
    assert usage["dead_codes"] == 5  # codes 2, 4, 5, 6, 7 never occur


def test_logit_confidence_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    confidence = logit_confidence(logits[None])  # any leading shape
    first = math.exp(2) / (math.exp(2) + 2)
    assert confidence["mean_max_probability"] == pytest.approx((first + 1 / 3) / 2)
    assert confidence["logit_margin"] == pytest.approx(1.0)  # (2 + 0) / 2


def test_accuracy_and_mse_by_hand():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)
    assert reconstruction_mse(torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [0.0, 1.0]])) == pytest.approx(1.5)


def test_mce_by_hand_and_the_known_unknown_split():
    errors = {"gaussian_noise": [0.2, 0.4, 0.6, 0.8, 1.0], "brightness": [0.1] * 5, "spatter": [0.5] * 5}
    result = mean_corruption_error(errors)
    ce_gauss = 100 * 0.6 / 0.886
    ce_bright = 100 * 0.1 / 0.565
    assert result["corruption_errors"]["gaussian_noise"] == pytest.approx(ce_gauss)
    assert result["mCE"] == pytest.approx((ce_gauss + ce_bright) / 2)
    assert result["unknown_mCE"] == pytest.approx(100 * 0.5 / 0.718)
    assert len(COMMON_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4 and len(ALEXNET_ERRORS) == 19
    with pytest.raises(ValueError, match="unknown corruptions"):
        mean_corruption_error({"rain": [0.1]})


def test_perturb_is_seeded_and_changes_images():
    images = torch.randn(4, 3, 16, 16)
    a = perturb(images, torch.Generator().manual_seed(0))
    b = perturb(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape
    assert not torch.allclose(a, images, atol=0.05)
    still = perturb(images, torch.Generator().manual_seed(0), max_degrees=0.0, noise_std=0.0)
    flipped = still.flip(-1)  # with no rotation and no noise only flips remain
    assert all(
        torch.allclose(s, i, atol=1e-5) or torch.allclose(f, i, atol=1e-5) for s, f, i in zip(still, flipped, images)
    )


def test_corruptions_apply_to_the_crop_the_model_sees(monkeypatch):
    """ImageNet-C corrupts the resized, centre-cropped image; the evaluation used to corrupt the full-size one."""
    from PIL import Image

    from hf_hypervq import HyperVQImageProcessor
    from hf_hypervq.training import corruptions

    seen = []

    def identity(pixels, corruption_name, severity):
        seen.append((pixels.shape, corruption_name, severity))
        return pixels

    monkeypatch.setattr(corruptions, "_corrupt", lambda: identity)
    processor = HyperVQImageProcessor.for_imagenet(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray((np.random.default_rng(0).random((60, 100, 3)) * 255).astype("uint8"))
    transform, normalise = corruptions.corrupted_after_crop(processor, "fog", 3)
    corrupted = normalise(images=transform(image), return_tensors="pt")["pixel_values"]
    assert seen == [((32, 32, 3), "fog", 3)]  # the 32-pixel crop, not the 100×60 original
    # with the corruption left out, the two stages give exactly the usual preprocessing
    assert torch.equal(corrupted, processor(images=image, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupted_after_crop(processor, "fog", 6)
