"""The metrics, through the `evaluate` modules users load, against values computed by hand or by scikit-image."""

import math

import numpy as np
import pytest
import skimage.metrics
import torch

from hf_hypervq import metrics
from hf_hypervq.metrics.mean_corruption_error.mean_corruption_error import (
    ALEXNET_ERRORS,
    COMMON_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
)
from hf_hypervq.training.metrics import logit_confidence, perturb, top1_accuracy


def cluster_quality(points, labels):
    return metrics.load("cluster_quality").compute(predictions=np.asarray(labels), references=np.asarray(points))


def test_silhouette_by_hand():
    points, labels = [[0.0], [1.0], [5.0], [7.0]], [0, 0, 1, 1]
    a = [1, 1, 2, 2]  # mean distance to the own cluster
    b = [6, 5, 4.5, 6.5]  # mean distance to the other cluster
    expected = np.mean([(bi - ai) / max(ai, bi) for ai, bi in zip(a, b)])
    assert cluster_quality(points, labels)["silhouette"] == pytest.approx(expected)


def test_davies_bouldin_by_hand():
    points, labels = [[0.0], [2.0], [10.0], [14.0]], [0, 0, 1, 1]
    scatter = [1.0, 2.0]  # mean distance to the centroids 1 and 12
    expected = (scatter[0] + scatter[1]) / 11  # the same ratio is each cluster's largest
    result = cluster_quality(points, labels)
    assert result["davies_bouldin"] == pytest.approx(expected)
    assert result["num_points"] == 4 and result["num_clusters"] == 2


def test_cluster_metrics_need_two_clusters():
    result = metrics.load("cluster_quality").compute(predictions=[0] * 10, references=torch.randn(10, 2).numpy())
    assert result["silhouette"] is None and result["davies_bouldin"] is None and result["num_clusters"] == 1


def test_codebook_usage_by_hand():
    usage = metrics.load("codebook_usage")
    result = usage.compute(predictions=[0, 0, 1, 3], codebook_size=8)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert result["perplexity"] == pytest.approx(math.exp(entropy))
    assert result["codes_used"] == pytest.approx(3 / 8)
    assert result["dead_codes"] == 5 and result["num_tokens"] == 4  # codes 2, 4, 5, 6, 7 never occur
    assert usage.compute(predictions=[0] * 5, codebook_size=4)["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"code ids must lie in \[0, 4\)"):
        usage.compute(predictions=[0, 4], codebook_size=4)


def test_reconstruction_mse_and_psnr_by_hand():
    predictions = np.zeros((2, 1 * 8 * 8))
    references = np.stack([np.full(64, 0.5), np.full(64, 0.25)])
    result = metrics.load("reconstruction").compute(
        predictions=predictions, references=references, image_shape=(1, 8, 8), data_range=1.0
    )
    assert result["mse"] == pytest.approx((0.25 + 0.0625) / 2)
    assert result["psnr"] == pytest.approx((10 * math.log10(1 / 0.25) + 10 * math.log10(1 / 0.0625)) / 2)
    assert result["num_images"] == 2 and result["ssim_window"] == "uniform 7x7"


def sliding_means(x, size):
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size))
    return windows.mean(axis=(-1, -2))


def test_ssim_by_hand_and_against_scikit_image():
    """A brightness shift leaves contrast and structure equal, so SSIM is the mean of Wang et al.'s luminance
    term over the 7×7 windows; on 16×16 colour images the module equals scikit-image's Gaussian-window SSIM."""
    rng = np.random.default_rng(0)
    image = rng.random((8, 8))
    shifted = image + 0.1
    mu_x, mu_y = sliding_means(image, 7), sliding_means(shifted, 7)
    c1 = (0.01 * 1.0) ** 2
    luminance = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)).mean()
    module = metrics.load("reconstruction")
    result = module.compute(predictions=[shifted.ravel()], references=[image.ravel()], image_shape=(1, 8, 8),
                            data_range=1.0)  # fmt: skip
    assert result["ssim"] == pytest.approx(luminance, rel=1e-6)
    a, b = rng.random((3, 16, 16)), rng.random((3, 16, 16))
    expected = skimage.metrics.structural_similarity(a, b, data_range=2.0, channel_axis=0, gaussian_weights=True,
                                                     sigma=1.5, use_sample_covariance=False)  # fmt: skip
    result = module.compute(predictions=[a.ravel()], references=[b.ravel()], image_shape=(3, 16, 16), data_range=2.0)
    assert result["ssim"] == pytest.approx(expected, rel=1e-6) and result["ssim_window"].startswith("gaussian")
    tiny = module.compute(predictions=[[0.0] * 25], references=[[0.0] * 25], image_shape=(1, 5, 5), data_range=1.0)
    assert tiny["ssim"] is None and tiny["mse"] == 0.0


def test_logit_confidence_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    confidence = logit_confidence(logits[None])  # any leading shape
    first = math.exp(2) / (math.exp(2) + 2)
    assert confidence["mean_max_probability"] == pytest.approx((first + 1 / 3) / 2)
    assert confidence["logit_margin"] == pytest.approx(1.0)  # (2 + 0) / 2


def test_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_mce_by_hand_and_the_known_unknown_split():
    errors = {"gaussian_noise": [0.2, 0.4, 0.6, 0.8, 1.0], "brightness": [0.1] * 5, "spatter": [0.5] * 5}
    names = [name for name, rates in errors.items() for _ in rates]
    rates = [rate for values in errors.values() for rate in values]
    mce = metrics.load("mean_corruption_error")
    result = mce.compute(predictions=rates, references=names)
    ce_gauss = 100 * 0.6 / 0.886
    ce_bright = 100 * 0.1 / 0.565
    assert result["corruption_errors"]["gaussian_noise"] == pytest.approx(ce_gauss)
    assert result["mCE"] == pytest.approx((ce_gauss + ce_bright) / 2)
    assert result["unknown_mCE"] == pytest.approx(100 * 0.5 / 0.718)
    assert result["known_accuracy"] == pytest.approx(1 - (0.6 * 5 + 0.1 * 5) / 10)
    assert result["unknown_accuracy"] == pytest.approx(0.5)
    assert len(COMMON_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4 and len(ALEXNET_ERRORS) == 19
    with pytest.raises(ValueError, match="unknown corruptions"):
        mce.compute(predictions=[0.1], references=["rain"])


def test_every_module_has_a_metric_card_and_loads_offline():
    for name in metrics.MODULES:
        card = (metrics.module_path(name) / "README.md").read_text()
        assert card.startswith("---\n") and "## How to use" in card and "## Citation" in card, name
        assert metrics.load(name).name, name
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.load("bleu")


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
