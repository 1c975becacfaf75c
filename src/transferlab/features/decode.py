"""Decoding views for the engines: each image decoded and resized in threads while the engine runs.

A view (:class:`Item`) is an image plus an augmentation recipe. :func:`render` decodes it the
way training does (``images.open_rgb`` with the params' decompression-bomb limit, then the
recipe's one pure function), :func:`pixel_batches` keeps a thread pool up to two batches ahead
of the engine, and :func:`fill_misses` feeds each decoded batch to every job that wants some of
its views (the embeddings of the stack's members and, for the ``finetune`` head, the tap
activations), so that each image is decoded and resized once per input size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from transferlab.data import augment, images


@dataclass(frozen=True, slots=True)  # slots: 10^6 views cost 56 bytes each, not 150
class Item:
    """One view to embed: an image's content hash, its augmentation recipe, and where it is."""

    sha256: str
    recipe: str
    path: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.sha256, self.recipe)


class Job(Protocol):
    """Work done on decoded pixels: a member's embeddings, or tap activations."""

    size: int  # the input side the job's engine takes
    label: str  # shown in the progress bar

    def wants(self, item: Item) -> bool: ...

    def consume(self, chunk: list[Item], pixels: np.ndarray) -> None: ...


def render(item: Item, *, images_directory: Path, size: int, max_image_pixels: int) -> np.ndarray:
    """The pixels of one view: decode as training does, then the recipe's one pure function.

    Args:
        item: the view.
        images_directory: where ``item.path`` is relative to (data/raw/images).
        size: the square side to render at.
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
    """
    image = images.open_rgb(images_directory / item.path, max_image_pixels=max_image_pixels)
    return augment.render_view(image, item.recipe, size)


def pixel_batches(
    items: list[Item], *, render_one: Callable[[Item], np.ndarray], batch_size: int, threads: int
) -> Iterator[tuple[list[Item], np.ndarray]]:
    """Yields (items, uint8 pixels) batches, decoding up to two batches ahead in threads."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for chunk in chunks[:2]:
            pending.append((chunk, [pool.submit(render_one, item) for item in chunk]))
        next_chunk = 2
        while pending:
            chunk, futures = pending.popleft()
            if next_chunk < len(chunks):
                upcoming = chunks[next_chunk]
                pending.append((upcoming, [pool.submit(render_one, item) for item in upcoming]))
                next_chunk += 1
            yield chunk, np.stack([future.result() for future in futures])


def fill_misses(
    group: Sequence[Job],
    items: list[Item],
    *,
    size: int,
    render_one: Callable[[Item, int], np.ndarray],
    batch_size: int,
    threads: int,
) -> None:
    """Decodes, once, every view that some job of ``group`` (all at input ``size``) still wants.

    Args:
        group: jobs that take the same input size; each gets the views it wants of each batch.
        items: the views.
        size: the input side of every job in the group.
        render_one: (item, size) -> uint8 pixels (:func:`render` with the paths and limit bound).
        batch_size: images per inference batch.
        threads: decoding threads.
    """
    missing = [item for item in items if any(job.wants(item) for job in group)]
    if not missing:
        return
    names = "+".join(job.label for job in group)
    progress = tqdm(total=len(missing), desc=f"embedding {names} @{size}px", unit="img", dynamic_ncols=True)
    for chunk, pixels in pixel_batches(
        missing, render_one=lambda item: render_one(item, size), batch_size=batch_size, threads=threads
    ):
        for job in group:
            wanted = [index for index, item in enumerate(chunk) if job.wants(item)]
            if wanted:
                job.consume([chunk[index] for index in wanted], pixels[wanted])
        progress.update(len(chunk))
    progress.close()
