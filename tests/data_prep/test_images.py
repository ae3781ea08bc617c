import numpy as np
import pytest
from PIL import Image

from dtr_scale.data_prep.images import BadImage, center_crop_arr, open_image_bytes, prepare_image


def test_center_crop_keeps_the_middle_of_a_wide_image():
    # 64 x 32 image whose columns hold their x coordinate: a 16 px crop keeps columns 16..47 (halved once).
    columns = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    crop = center_crop_arr(Image.fromarray(columns).convert("RGB"), 16)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
    # After the BOX halving to 32 x 16 the crop is columns 8..23 of the half image = source x 16..47.
    expected = (np.arange(16, 48, 2) * 4 + 2).astype(np.uint8)  # BOX averages pairs (x, x + 1) * 4
    np.testing.assert_array_equal(crop[0, :, 0], expected)


def test_center_crop_upsamples_small_images_to_the_resolution():
    crop = center_crop_arr(Image.new("RGB", (8, 12), (10, 20, 30)), 16)
    assert crop.shape == (16, 16, 3)
    assert (crop == np.array([10, 20, 30], np.uint8)).all()


def test_sixteen_bit_is_rescaled_not_clipped(encode_image):
    wide = np.array([[0, 257, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = open_image_bytes(encode_image(Image.fromarray(wide), "PNG"))
    assert image.mode == "I;16"
    arr, converted = prepare_image(image, 4)
    assert converted == "I;16"
    np.testing.assert_array_equal(arr[0, :, 0], [0, 1, 128, 255])


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA"])
def test_other_modes_become_rgb(encode_image, mode):
    rgb = Image.new("RGB", (8, 8), (90, 90, 90))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    source = rgb.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    arr, converted = prepare_image(open_image_bytes(encode_image(source, fmt)), 8)
    assert converted == mode and arr.shape == (8, 8, 3)
    assert np.abs(arr.astype(int) - 90).max() <= 3  # lossy JPEG/CMYK round trip


def test_rgb_is_not_reported_as_converted(encode_image):
    _, converted = prepare_image(open_image_bytes(encode_image(Image.new("RGB", (8, 8)), "PNG")), 8)
    assert converted is None


@pytest.mark.parametrize("kind", ["empty", "corrupt", "truncated", "huge"])
def test_unusable_images_raise_bad_image_with_the_reason(encode_image, kind):
    jpeg = encode_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    data = {"empty": b"", "corrupt": b"GIF89a garbage", "truncated": jpeg[: len(jpeg) // 2],
            "huge": encode_image(Image.new("L", (100, 100)), "PNG")}[kind]
    with pytest.raises(BadImage) as err:
        prepare_image(open_image_bytes(data, max_pixels=5000), 8, max_pixels=5000)
    assert err.value.reason == kind
