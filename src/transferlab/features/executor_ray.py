"""The Ray executor: cache misses embedded by a pool of Ray Data actors, results stored by the driver.

``extract_features.executor: ray`` replaces :func:`transferlab.features.decode.fill_misses` (threads
decoding for one engine in this process) with Ray Data's batch-inference pattern: a
``map_batches`` over an actor pool, where each actor builds its engines once and then decodes and
embeds batch after batch. Only the cache misses are shipped, one row per inference batch.

Decisions, and why:

- **The driver chooses, workers only load.** The engine choice (conversion, TFLite rewrite,
  verdicts) is made once by the driver, as for the local executor; each actor builds its engine
  with a picklable factory that reads the driver's verdict and converted model from the
  conversion folder and refuses to run bytes of another sha256 (see
  ``extract_features.worker_engine``). On a multi-node cluster that folder (the cache folder)
  must be on a shared file system.
- **The same batches.** Each shipped row is exactly one batch of the local executor (the misses in
  the same order, cut every ``batch_size``), and each actor runs one engine thread per CPU it
  holds, so features are bit for bit those of the local executor (tested).
- **The driver writes the cache.** Actors return embeddings; the driver stores each batch in the
  embedding cache as it arrives (one transaction per batch, as today). SQLite has one writer at a
  time: a few dozen actors writing would queue on its lock (or need a network file system that
  SQLite's locking does not trust), while the driver's writes are 160 kB per batch, far below
  what one process can store. A killed run keeps every batch stored so far, so a rerun embeds
  only what is missing.
- **Retries are bounded.** An actor that dies (killed, out of memory) is restarted and its batch
  retried up to :data:`RETRIES` times (Ray Data's default is forever, which turns a crash on every
  batch into a hung stage).
- **Images are decoded where the engine runs.** ``render`` is shipped to the actors: today
  :func:`transferlab.features.decode.render` on the local images folder, which a multi-node
  cluster must share. An ``s3://`` source plugs in here as a render that reads the object
  (the hook: any picklable ``(item, size) -> uint8 pixels``).

Connecting (:func:`connect`): an already initialised Ray (tests start one per session), else the
cluster at ``$RAY_ADDRESS``, else a local instance sized to this machine, without dashboard.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from transferlab.features import decode

LOGGER = logging.getLogger(__name__)
RETRIES = 3  # restarts of a dead actor, and retries of its batch, before the stage fails
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # a local instance's object store: batches are ~1 MB of pixels at most
WORKER_CPUS = 1  # CPUs each actor reserves, and the engine threads it runs


class RemoteJob(Protocol):
    """Embeddings computed by the actors and stored by the driver (``extract_features._Active``)."""

    size: int
    label: str

    def wants(self, item: decode.Item) -> bool: ...

    def store(self, chunk: list[decode.Item], vectors: np.ndarray, seconds: float) -> None: ...


def connect() -> int:
    """Connects to Ray (see the module docstring) and returns the CPUs the cluster offers."""
    import ray

    if not ray.is_initialized():
        quiet = {"logging_level": logging.WARNING, "configure_logging": True}
        address = os.environ.get("RAY_ADDRESS", "")
        if address:
            LOGGER.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, **quiet)
        else:
            LOGGER.info("starting a local Ray instance (%d CPUs, no dashboard)", os.cpu_count() or 1)
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **quiet,
            )
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def fill_misses(
    group: Sequence[RemoteJob],
    items: list[decode.Item],
    *,
    size: int,
    factories: Sequence[Callable[[], Any]],
    render: Callable[..., np.ndarray],
    batch_size: int,
    threads: int,
    workers: int = 0,
) -> None:
    """Embeds on Ray every view that some job of ``group`` (all at input ``size``) still wants.

    Args:
        group: jobs taking the same input size; each gets, per batch, the views it wants.
        items: the views.
        size: the input side of every job in the group.
        factories: per job, a picklable callable that builds its engine in an actor (``run(pixels) -> (N, D)``).
        render: picklable ``(item, size=...) -> uint8 pixels``, run in the actors.
        batch_size: images per inference batch (one shipped row each).
        threads: decoding threads per actor.
        workers: actors; 0 = one per CPU the cluster offers.
    """
    missing = [item for item in items if any(job.wants(item) for job in group)]
    if not missing:
        return
    workers = workers or max(1, connect() // WORKER_CPUS)
    chunks = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    dataset = _dataset(
        [{"index": index, "items": _pack(chunk, group)} for index, chunk in enumerate(chunks)],
        {"factories": list(factories), "render": render, "size": size, "threads": threads},
        workers=min(workers, len(chunks)),
    )
    names = "+".join(job.label for job in group)
    progress = tqdm(total=len(missing), desc=f"embedding {names} @{size}px on Ray", unit="img", dynamic_ncols=True)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index, result in zip(batch["index"], batch["result"], strict=True):
            chunk = chunks[int(index)]
            for job, (wanted, vectors, seconds) in zip(group, pickle.loads(result), strict=True):
                if wanted:
                    job.store([chunk[position] for position in wanted], vectors, seconds)
            progress.update(len(chunk))
    progress.close()


def _dataset(rows: list[dict], actor_arguments: dict[str, Any], *, workers: int) -> Any:
    """The Ray Data pipeline: one row per inference batch, embedded by an actor pool of ``workers``."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's tqdm bar counts images
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for max_restarts (ray_remote_args is deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.from_items(rows, override_num_blocks=min(len(rows), workers * 8)).map_batches(
            _Embedder,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=WORKER_CPUS,
            fn_constructor_kwargs=actor_arguments,
            runtime_env={"env_vars": {"TRANSFERLAB_ENGINE_THREADS": str(WORKER_CPUS), "TF_NUM_INTRAOP_THREADS": "1"}},
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )


def _pack(chunk: list[decode.Item], group: Sequence[RemoteJob]) -> bytes:
    """One shipped row: the batch's views and, per job, the positions it wants."""
    wanted = [[position for position, item in enumerate(chunk) if job.wants(item)] for job in group]
    return pickle.dumps(([(item.sha256, item.recipe, item.path) for item in chunk], wanted))


class _Embedder:
    """A Ray Data actor: builds the group's engines once, then decodes and embeds one batch per call."""

    def __init__(
        self, *, factories: list[Callable[[], Any]], render: Callable[..., np.ndarray], size: int, threads: int
    ):
        self.engines = [factory() for factory in factories]
        self.render = render
        self.size = size
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for packed in batch["items"]:
            described, wanted = pickle.loads(packed)
            chunk = [decode.Item(*fields) for fields in described]
            pixels = np.stack(list(self.pool.map(lambda item: self.render(item, size=self.size), chunk)))
            outcome = []
            for engine, positions in zip(self.engines, wanted, strict=True):
                started = time.perf_counter()
                vectors = engine.run(pixels[positions]) if positions else None
                outcome.append((positions, vectors, time.perf_counter() - started))
            results.append(pickle.dumps(outcome))
        return {"index": batch["index"], "result": np.array(results, dtype=object)}
