"""VQ-SA's training pieces (`scripts/train_vqsa.py`): its augmentation and the model its flags ask for."""

import math

from ..models.hypervq.configuration_hypervq import HyperVQSAConfig
from ..models.hypervq.modeling_hypervq import HyperVQSAForImageClassification
from .corruptions import CorruptionAugmentation
from .data import DataError


# Without --resnet: a small ResNet from scratch, 3 stages of 16-64 channels (minutes on the digits).
SMALL_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic")


class TrainAugmentation:
    """Random resized crop (scale 0.08-1, aspect 3/4-4/3) to the processor's input size, random flip, then VQ-SA's
    corruption augmentation; the random numbers come from the example's `SampleKey`."""

    def __init__(self, size: int, corruptions: bool):
        self.size = size
        self.corrupt = CorruptionAugmentation() if corruptions else None

    def __call__(self, image, key):
        rng = key.rng()
        width, height = image.size
        for _ in range(10):
            area = width * height * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                image = image.crop((left, top, left + w, top + h))
                break
        image = image.resize((self.size, self.size))
        if rng.random() < 0.5:
            image = image.transpose(0)  # left-right flip
        return self.corrupt(image, key) if self.corrupt else image


def build_vqsa_model(args, num_labels: int, names: list[str]) -> HyperVQSAForImageClassification:
    """VQ-SA from `train_vqsa.py`'s flags: on `--resnet`'s backbone and last layer, or a small ResNet from scratch."""
    options = dict(
        quantizer_type=args.quantizer,
        codebook_size=args.codebook_size,
        feature_scale=args.feature_scale,
        curvature=args.curvature,
        commitment_weight=args.commitment_weight,
        freeze_backbone=args.freeze_backbone,
    )
    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, num_labels=num_labels)
    if args.resnet is None:
        return HyperVQSAForImageClassification(HyperVQSAConfig(backbone_config=SMALL_RESNET, **options, **labels))
    model = HyperVQSAForImageClassification.from_resnet(args.resnet, **options)
    if model.config.num_labels != num_labels:
        raise DataError(f"--resnet {args.resnet} has {model.config.num_labels} classes, the data set {num_labels}")
    return model
