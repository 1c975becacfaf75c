"""The decode pipeline: batches in order, each view decoded once per size, each job fed what it wants."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transferlab.features import decode

SHA = "a" * 64


def items(count: int) -> list[decode.Item]:
    return [decode.Item(f"{index:064x}", "", f"class/{index}.png") for index in range(count)]


def fake_render(item: decode.Item, size: int = 2) -> np.ndarray:
    return np.full((size, size, 3), int(item.sha256, 16), dtype=np.uint8)


def test_pixel_batches_keep_the_order_and_the_batch_size():
    views = items(7)
    batches = list(decode.pixel_batches(views, render_one=fake_render, batch_size=3, threads=2))
    assert [len(chunk) for chunk, _ in batches] == [3, 3, 1]
    assert [item for chunk, _ in batches for item in chunk] == views
    pixels = np.concatenate([pixels for _, pixels in batches])
    assert pixels.dtype == np.uint8 and pixels.shape == (7, 2, 2, 3)
    assert list(pixels[:, 0, 0, 0]) == list(range(7))


def test_pixel_batches_pass_a_decoding_error_on():
    def broken(item):
        raise ValueError(f"cannot decode {item.path}")

    with pytest.raises(ValueError, match="cannot decode class/0.png"):
        list(decode.pixel_batches(items(2), render_one=broken, batch_size=1, threads=1))


class Job:
    def __init__(self, wanted: set[int], size: int = 4):
        self.wanted, self.size, self.label, self.received = wanted, size, "job", []

    def wants(self, item: decode.Item) -> bool:
        return int(item.sha256, 16) in self.wanted

    def consume(self, chunk, pixels):
        assert len(chunk) == len(pixels) and pixels.shape[1] == self.size
        self.received += [int(item.sha256, 16) for item in chunk]
        self.wanted -= {int(item.sha256, 16) for item in chunk}


def test_fill_misses_decodes_each_view_once_and_feeds_each_job_what_it_wants():
    rendered = []

    def render_one(item, size):
        rendered.append(item)
        return fake_render(item, size)

    first, second = Job({0, 2, 4}), Job({2, 3})
    decode.fill_misses([first, second], items(6), size=4, render_one=render_one, batch_size=2, threads=2)
    assert first.received == [0, 2, 4] and second.received == [2, 3]
    assert sorted(int(item.sha256, 16) for item in rendered) == [0, 2, 3, 4]  # 2 once; 1 and 5 never
    decode.fill_misses([first, second], items(6), size=4, render_one=render_one, batch_size=2, threads=2)
    assert len(rendered) == 4, "nothing left to do: nothing decoded"


def test_render_decodes_with_the_given_limit(tmp_path):
    (tmp_path / "class").mkdir()
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(tmp_path / "class" / "photo.png")
    item = decode.Item(SHA, "", "class/photo.png")
    pixels = decode.render(item, images_directory=tmp_path, size=16, max_image_pixels=10_000)
    assert pixels.shape == (16, 16, 3)
    with pytest.raises(Image.DecompressionBombError):
        decode.render(item, images_directory=tmp_path, size=16, max_image_pixels=100)  # 1200 pixels
