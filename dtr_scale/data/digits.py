"""The embedded dataset: scikit-learn's bundled handwritten digits as RGB images.

1,797 grayscale 8x8 images with values 0..16 and 10 classes, shipped inside
scikit-learn (no download). They are upsampled bilinearly to `size` and
returned as uint8 RGB, the same form as the ImageNet images the real pipeline
reads, so both go through the same encoder and evaluation code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_NUM_CLASSES = 10


def load_digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, size, size, 3], labels int64 [1797])."""
    from dtr_scale.extras import import_extra

    digits = import_extra("sklearn.datasets").load_digits()  # the [digits] extra
    gray = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
    rgb = (gray.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy(), digits.target.astype(np.int64)
