"""Scores for samples of the embedded digits: Fréchet distance in the features of the
project's digits classifier ("digits-FD") and the class accuracy of conditional samples."""

from __future__ import annotations

import numpy as np

from dtr_scale.data.digits import load_digits_images
from dtr_scale.eval.features import load_digits_classifier
from dtr_scale.eval.metrics import class_accuracy, feature_statistics, frechet_distance


def digits_scores(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """images: uint8 [N, 16, 16, 3] samples drawn for `labels`; against all 1,797 real digits."""
    net = load_digits_classifier()
    real, _ = load_digits_images(size=images.shape[1])
    fake_out, real_out = net.extract(images), net.extract(real)
    fd = frechet_distance(*feature_statistics(fake_out["pool"]), *feature_statistics(real_out["pool"]))
    return {"digits_fd": float(fd), "class_accuracy": float(class_accuracy(fake_out["logits"], labels)),
            "num_samples": int(len(images))}
