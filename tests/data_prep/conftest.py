import io

import numpy as np
import pytest
from PIL import Image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n distinct uint8 RGB images [n, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def good_folder(tmp_path):
    """An ImageFolder of 3 classes x 7 lossless 16x16 PNGs; returns (root, images [21, 16, 16, 3], labels)."""
    images = random_images(21, 16, seed=1)
    labels = np.repeat(np.arange(3), 7)
    root = tmp_path / "src"
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{'abc'[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:03d}.png").write_bytes(encode(Image.fromarray(image), "PNG"))
    return root, images, labels


@pytest.fixture
def bad_folder(tmp_path):
    """One class folder holding one image of every problematic kind; returns (root, {name: expected})."""
    root = tmp_path / "bad_src" / "only"
    root.mkdir(parents=True)
    rgb = Image.fromarray(random_images(1, 32, seed=2)[0])
    jpeg = encode(rgb, "JPEG")
    files = {
        "a_good.png": encode(rgb, "PNG"),
        "corrupt.jpg": b"this is not an image" * 10,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "gray.png": encode(Image.fromarray(np.full((16, 16), 100, np.uint8)), "PNG"),
        "sixteen.png": encode(Image.fromarray(np.full((16, 16), 257 * 200, np.uint16)), "PNG"),
        "huge.png": encode(Image.new("RGB", (300, 300)), "PNG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    expected = {"skipped": {"only/corrupt.jpg": "corrupt", "only/truncated.jpg": "truncated",
                            "only/empty.jpg": "empty", "only/huge.png": "huge"},
                "converted": {"only/cmyk.jpg": "CMYK", "only/gray.png": "L", "only/sixteen.png": "I;16"}}
    return root.parent, expected


@pytest.fixture
def encode_image():
    """(PIL image, format) -> encoded bytes."""
    return encode


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised 2-level AutoencoderKL (downsample 2, 4 latent channels) saved like a download."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return str(path)
