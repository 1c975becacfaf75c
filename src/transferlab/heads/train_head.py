"""train_head: train the chosen head on the features files, save it, report on it.

The head is trained on the training split (augmented views included) and judged on the
validation split; the test split is left to the evaluate stage. Per-step curves (epochs for
the dense head, the C grid for the logistic head) go to dvclive, for ``dvc plots show``.

With ``seeds`` > 1 a stochastic head is trained once per seed (:mod:`transferlab.heads.seeds`:
which seeds, which one is kept, the folder layout); the loop here is the same for every head.
The curves are the kept seed's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from transferlab import heads
from transferlab.core import atomic
from transferlab.features import files
from transferlab.heads import base, seeds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    """A trained head and the train_head metrics (metrics/train_head.json).

    Attributes:
        head: the kept model (with one seed, the only one): what evaluate, export and predict use.
        metrics: the report; with several seeds, the kept seed's figures plus ``seeds``.
        other_seeds: k -> head for every other trained seed (empty with one seed).
        record: what seeds.json says (None with one seed: nothing is written).
    """

    head: base.TrainedHead
    metrics: dict[str, Any]
    other_seeds: dict[int, base.TrainedHead] = field(default_factory=dict)
    record: seeds.Record | None = None


def train_head(
    *,
    head: str,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    options: Mapping[str, Any],
    log_step: base.StepLogger | None = None,
    seed_count: int = 1,
) -> TrainingResult:
    """Trains a head of kind ``head`` (see :mod:`transferlab.heads`) once per seed and measures it.

    Args:
        head: a registered head name, e.g. ``logistic`` or ``dense``.
        train: training features.
        val: validation features (C selection, early stopping, the reported val figures, the kept seed).
        seed: the run's seed (params ``base.seed``); seed 0 of several.
        class_weight: ``none`` or ``balanced``.
        options: the head's own settings, i.e. the fields of ``train_head.<head>`` in params.yaml.
        log_step: receives the per-step curves of the kept seed (see :func:`live_curves`).
        seed_count: how many seeds to train (params ``train_head.seeds``); a deterministic head
            is trained once whatever it says.

    Returns:
        The kept head, and metrics: head, seconds (training time, all seeds), train and val
        accuracy, loss and examples, plus what the head reports (``c`` for logistic;
        ``best_epoch`` and ``epochs_run`` for dense and scratch); with ``seed_count`` > 1 also
        ``seeds`` (requested, trained, the kept k and why, each seed's val figures).
    """
    count = seed_count
    if seed_count > 1 and seeds.deterministic(heads.head_module(head), options):
        count = 1
        logger.info(
            "%s; trained once, not %d times (seeds trained: 1)",
            seeds.DETERMINISTIC_BECAUSE.format(head=head),
            seed_count,
        )
    seed_list = seeds.derive(seed, count)
    runs: list[TrainingResult] = []
    curves: list[list[Mapping[str, float]]] = []  # each seed's steps; only the kept seed's reach log_step
    for k, run_seed in enumerate(seed_list):
        if count > 1:
            logger.info("seed k=%d of %d: %d", k, count, run_seed)
        curves.append([])
        runs.append(_train_one(head, train, val, run_seed, class_weight, options, curves[-1].append))
    kept = seeds.best(
        [
            seeds.SeedRun(k, run_seed, run.metrics["val"].get("accuracy"), run.metrics["val"].get("loss"))
            for k, (run_seed, run) in enumerate(zip(seed_list, runs))
        ]
    )
    for values in curves[kept] if log_step is not None else ():
        log_step(values)
    if seed_count == 1:
        return runs[0]
    return _several(runs, kept, requested=seed_count, seed_list=seed_list, head=head)


def _several(
    runs: list[TrainingResult], kept: int, *, requested: int, seed_list: list[int], head: str
) -> TrainingResult:
    """The kept run, its metrics extended with the ``seeds`` report and the total training time."""
    because = seeds.KEPT_BECAUSE if len(runs) > 1 else seeds.DETERMINISTIC_BECAUSE.format(head=head)
    record = seeds.Record(requested=requested, seeds=tuple(seed_list), kept=kept, kept_because=because)
    metrics = dict(runs[kept].metrics)
    metrics["seconds"] = round(sum(run.metrics["seconds"] for run in runs), 3)
    metrics["seeds"] = {
        **record.to_json(),
        "kept_seed": seed_list[kept],
        "val_accuracy": [run.metrics["val"].get("accuracy") for run in runs],
        "val_loss": [run.metrics["val"].get("loss") for run in runs],
        "seconds": [run.metrics["seconds"] for run in runs],
    }
    if len(runs) > 1:
        logger.info("kept seed k=%d (%d) of %d: %s", kept, seed_list[kept], len(runs), because)
    others = {k: run.head for k, run in enumerate(runs) if k != kept}
    return TrainingResult(head=runs[kept].head, metrics=metrics, other_seeds=others, record=record)


def _train_one(
    head: str,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    options: Mapping[str, Any],
    log_step: base.StepLogger,
) -> TrainingResult:
    """One training of the head with one seed, measured on train and val."""
    logger.info(
        "training the %s head on %d rows, validating on %d (%d features, %d classes)",
        head,
        len(train),
        len(val),
        train.features.shape[1],
        len(train.class_names),
    )
    started = time.perf_counter()
    outcome = heads.train(
        head, train=train, val=val, seed=seed, class_weight=class_weight, log_step=log_step, **options
    )
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "head": head,
        "seconds": round(seconds, 3),
        "classes": len(train.class_names),
        "feature_dim": int(train.features.shape[1]),
    }
    for name, split in (("train", train), ("val", val)):
        metrics[name] = {"examples": len(split)}
        if len(split):
            metrics[name].update(base.split_accuracy_and_loss(outcome.head, split))
    metrics.update(outcome.report)
    return TrainingResult(head=outcome.head, metrics=metrics)


def describe(metrics: Mapping[str, Any]) -> str:
    """One line for the log: the head, its train and val accuracy and training time (metrics/train_head.json)."""
    val = metrics["val"]
    val_accuracy = f"{val['accuracy']:.4f}" if "accuracy" in val else "n/a (no validation rows)"
    return (
        f"{metrics['head']} head: train accuracy {metrics['train']['accuracy']:.4f}, val accuracy {val_accuracy}, "
        f"{metrics['seconds']:.1f} s"
    )


def save_head(head: base.TrainedHead, folder: str | os.PathLike) -> None:
    """Saves ``head`` into ``folder``, atomically: the folder is complete or left as it was."""
    with atomic.atomic_directory(folder) as temporary:
        head.save(temporary)


def save_result(result: TrainingResult, folder: str | os.PathLike) -> None:
    """Saves the kept head into ``folder`` and, with several seeds, the others and seeds.json (one atomic swap)."""
    with atomic.atomic_directory(folder) as temporary:
        result.head.save(temporary)
        if result.record is not None:
            seeds.save(temporary, result.record, result.other_seeds)


@contextlib.contextmanager
def live_curves(folder: str | os.PathLike) -> Iterator[base.StepLogger]:
    """Yields a ``log_step`` that appends each step's metrics to dvclive histories in ``folder``.

    ``folder`` ends up holding ``train/loss.tsv``, ``val/accuracy.tsv`` and so on (columns
    ``step`` and the metric, dvclive's format, what ``dvc plots`` reads) and nothing else; it is
    swapped in atomically when the block completes.
    """
    # dvclive's own history writer, without ``dvclive.Live``: Live inspects the enclosing git and
    # DVC repositories (it fails in a repository without commits, and runs ``dvc init`` in a git
    # repository that has no .dvc), which a pipeline stage must not do.
    from dvclive.plots import Metric

    with atomic.atomic_directory(folder) as temporary:
        histories: dict[str, Metric] = {}
        steps = itertools.count()

        def log_step(values: Mapping[str, float]) -> None:
            step = next(steps)
            for name, value in values.items():
                history = histories.setdefault(name, Metric(name, str(temporary)))
                history.step = step
                history.dump(float(value))

        yield log_step
        written = temporary / Metric.subfolder
        if written.is_dir():
            for item in sorted(written.iterdir()):
                os.replace(item, temporary / item.name)
            written.rmdir()
