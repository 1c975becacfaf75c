"""images.py: hashing, opening every kind of image as training does, and checking bad files."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from transferlab.data import images

LIMIT = 10_000_000  # max_image_pixels for tests that are not about bombs


def solid(mode: str, size=(48, 40), color=None) -> Image.Image:
    return Image.new(mode, size, color if color is not None else 0)


def noise_rgb(size=(64, 48), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def check(path, *, min_image_side=16, max_image_pixels=LIMIT) -> images.ImageCheck:
    return images.inspect_image(path, min_image_side=min_image_side, max_image_pixels=max_image_pixels)


# ---------------------------------------------------------------------------------- sha256


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path):
    payload = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # spans several 1 MiB chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    assert images.sha256_file(path) == hashlib.sha256(payload).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert images.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", ".gif", ".webp", ".tif"])
def test_every_format_opens_as_rgb_with_its_size(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    solid("RGB", (50, 30), (200, 30, 40)).save(path)
    image = images.open_rgb(path, max_image_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (50, 30)
    red, green, blue = image.getpixel((25, 15))
    assert red > 150 and green < 90 and blue < 90  # lossy formats drift a little, not this much
    result = check(path)
    assert (result.status, result.width, result.height, result.detail) == ("ok", 50, 30, "")
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_open_rgb_returns_a_usable_image_after_the_file_is_closed(tmp_path):
    path = tmp_path / "photo.png"
    noise_rgb().save(path)
    image = images.open_rgb(path, max_image_pixels=LIMIT)
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(image), expected)  # lossless: pixels untouched


def test_grayscale_and_one_bit_become_three_equal_channels(tmp_path):
    solid("L", color=77).save(tmp_path / "gray.png")
    solid("1", color=1).save(tmp_path / "bits.png")
    gray = images.open_rgb(tmp_path / "gray.png", max_image_pixels=LIMIT)
    bits = images.open_rgb(tmp_path / "bits.png", max_image_pixels=LIMIT)
    assert gray.mode == bits.mode == "RGB"
    assert gray.getpixel((3, 3)) == (77, 77, 77)
    assert bits.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_keeps_its_colour(tmp_path):
    path = tmp_path / "cmyk.jpg"
    solid("CMYK", color=(0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    red, green, blue = images.open_rgb(path, max_image_pixels=LIMIT).getpixel((10, 10))
    assert red > 230 and green < 30 and blue < 30
    assert check(path).status == "ok"


def test_rgba_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "alpha.png")
    image = images.open_rgb(tmp_path / "alpha.png", max_image_pixels=LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert image.getpixel((1, 1)) == (255, 0, 0)
    assert image.getpixel((2, 2)) == (127, 127, 127)  # half-transparent black over white


def test_la_is_composited_over_white(tmp_path):
    Image.new("LA", (40, 40), (0, 0)).save(tmp_path / "la.png")
    assert images.open_rgb(tmp_path / "la.png", max_image_pixels=LIMIT).getpixel((5, 5)) == (255, 255, 255)


def test_palette_gif_with_transparency_uses_white(tmp_path):
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((5, 5), 1)
    palette.save(tmp_path / "palette.gif", transparency=0)
    image = images.open_rgb(tmp_path / "palette.gif", max_image_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the transparent index is black in the palette
    assert image.getpixel((5, 5)) == (0, 255, 0)


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    solid("RGB", color=(10, 20, 200)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert images.open_rgb(tmp_path / "p.png", max_image_pixels=LIMIT).getpixel((1, 1)) == (10, 20, 200)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [solid("RGB", color=(255, 0, 0)), solid("RGB", color=(0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert images.open_rgb(tmp_path / "anim.gif", max_image_pixels=LIMIT).getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = images.open_rgb(path, max_image_pixels=LIMIT)
    assert image.mode == "RGB"
    row = [image.getpixel((x, 0)) for x in range(4)]
    assert row == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_thirty_two_bit_integer_and_float_images_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 1000, 70000]] * 4, dtype=np.int32)).save(tmp_path / "int.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]] * 4, dtype=np.float32)).save(tmp_path / "float.tif")
    ints = images.open_rgb(tmp_path / "int.tif", max_image_pixels=LIMIT)
    floats = images.open_rgb(tmp_path / "float.tif", max_image_pixels=LIMIT)
    # 70000 does not fit 16 bits, so the image is stretched from its minimum to its maximum.
    assert [ints.getpixel((x, 0))[0] for x in range(3)] == [0, 4, 255]
    assert [floats.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 30))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = images.open_rgb(path, max_image_pixels=LIMIT)
    assert image.size == (30, 60)  # width and height swap
    top, bottom = image.getpixel((15, 5)), image.getpixel((15, 55))
    assert top[0] > 200 and top[2] < 60  # the stored left edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert (check(path).width, check(path).height) == (30, 60)


def test_exif_orientation_matches_pillows_exif_transpose(tmp_path):
    path = tmp_path / "mirrored.jpg"
    exif = Image.Exif()
    exif[0x0112] = 5
    noise_rgb((40, 24)).save(path, exif=exif.tobytes(), quality=95)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(images.open_rgb(path, max_image_pixels=LIMIT)), np.asarray(expected))


# ---------------------------------------------------------------------------------- bad files


def test_truncated_jpeg_is_corrupt(tmp_path):
    path = tmp_path / "truncated.jpg"
    noise_rgb((200, 150)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = check(path)
    assert result.status == "corrupt"
    assert "truncated" in result.detail
    assert result.sha256 == hashlib.sha256(data[: len(data) // 2]).hexdigest()
    assert result.width is None and result.height is None
    with pytest.raises(OSError):
        images.open_rgb(path, max_image_pixels=LIMIT)


def test_damaged_png_is_corrupt(tmp_path):
    path = tmp_path / "damaged.png"
    noise_rgb().save(path)
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # inside the compressed pixel data: the CRC no longer matches
    path.write_bytes(bytes(data))
    assert check(path).status == "corrupt"


def test_random_bytes_named_jpg_are_corrupt_but_a_text_file_is_not_an_image(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(2).bytes(5000))
    (tmp_path / "notes.txt").write_text("these are not pixels\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    noise = check(tmp_path / "noise.jpg")
    assert noise.status == "corrupt" and ".jpg" in noise.detail
    assert check(tmp_path / "notes.txt").status == "not-an-image"
    assert check(tmp_path / ".DS_Store").status == "not-an-image"
    assert check(tmp_path / "notes.txt").sha256 == hashlib.sha256(b"these are not pixels\n").hexdigest()


def test_too_small_keeps_its_size(tmp_path):
    solid("RGB", (40, 8), (1, 2, 3)).save(tmp_path / "tiny.png")
    result = check(tmp_path / "tiny.png", min_image_side=16)
    assert (result.status, result.width, result.height) == ("too-small", 40, 8)
    assert "40x8" in result.detail and "16" in result.detail
    assert check(tmp_path / "tiny.png", min_image_side=8).status == "ok"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000), 0).save(path)  # 36 megapixels in a few kilobytes
    assert path.stat().st_size < 200_000
    result = check(path, max_image_pixels=1_000_000)
    assert result.status == "too-large"
    assert "36000000" in result.detail and result.width is None
    with pytest.raises(Image.DecompressionBombError):
        images.open_rgb(path, max_image_pixels=1_000_000)


@pytest.mark.parametrize("pixels", [6_000, 12_000])  # in Pillow's warning band, and beyond 2x
def test_bomb_limit_is_ours_and_pillows_globals_are_restored(tmp_path, pixels):
    path = tmp_path / "big.png"
    Image.new("L", (100, pixels // 100), 0).save(path)
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check(path, max_image_pixels=5_000).status == "too-large"
        assert check(path, max_image_pixels=pixels).status == "ok"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before_limit
    assert list(warnings.filters) == before_filters


@pytest.mark.parametrize("pixels", [6_000, 12_000])  # Pillow would say "limit of 10000" beyond 2x
def test_bomb_message_states_the_configured_limit_and_its_param(tmp_path, pixels):
    path = tmp_path / "big.png"
    Image.new("L", (100, pixels // 100), 0).save(path)
    result = check(path, max_image_pixels=5_000)
    assert result.status == "too-large"
    assert f"100x{pixels // 100} = {pixels} pixels, more than download.max_image_pixels=5000" in result.detail
    assert "10000" not in result.detail
    with pytest.raises(Image.DecompressionBombError, match=r"download\.max_image_pixels=5000\b"):
        images.open_rgb(path, max_image_pixels=5_000)


def test_missing_file_is_reported_not_raised(tmp_path):
    result = check(tmp_path / "gone.jpg")
    assert result.status == "corrupt" and "cannot read" in result.detail and result.sha256 == ""
    assert check(tmp_path).status == "corrupt"  # a folder is not a readable file either


def test_image_check_is_frozen():
    result = images.ImageCheck("ab", 1, 2, "ok", "")
    with pytest.raises(AttributeError):
        result.status = "corrupt"
