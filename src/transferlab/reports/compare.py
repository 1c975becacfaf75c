"""Comparing backbones and stacks: one DVC experiment each, then a leaderboard and a plot.

``transferlab compare mobilenet mobilenet_v2 mobilenet+mobilenet_v2`` queues one
``dvc exp run --queue -S extract_features.backbone=...`` per candidate, runs the queue, and
reads every experiment's metrics back from ``dvc exp show --json``. Embeddings come from the
shared embedding cache, so a stack of backbones that were compared alone embeds nothing new.

A stack's extraction cost is the sum of its members' costs (each member's engine speed is
measured when it embeds, and remembered by the cache for runs served from it).

**One embedder, then the queue.** Before queuing, :func:`prefetch` embeds, in this one process
and one candidate after another, every row of every candidate that the cache lacks (the rows of
the workspace's data stages, brought up to date with ``dvc repro augment``; each candidate's
params are params.yaml with the ``-S`` overrides applied as DVC applies them). The queued
experiments then find every embedding in the cache: TensorFlow and the engines load once, not
once per experiment, and no two experiments ever embed at once. When the prefetch cannot be
complete (an override changes the data stages, or a candidate fails to prefetch) the queue runs
one experiment at a time instead, whatever ``--jobs`` says.

**A failed experiment keeps its log.** As soon as the queue reports an experiment failed, its
``dvc queue logs`` output is saved to ``<logs>/<name>.log`` (DVC may not keep it: dvc#8192,
vscode-dvc#4332), and the leaderboard prints that path in the experiment's row.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STACK_SEPARATOR = "+"
# Sections whose overrides change the rows to embed (images, splits, recipes): the workspace's
# data stages then differ from the experiments', and a prefetch from them cannot be complete.
DATA_SECTIONS = ("base", "download", "split", "augment")


def backbone_override(candidate: str) -> str:
    """The ``-S`` value for one candidate: ``name`` alone, or a YAML list for ``a+b`` stacks."""
    members = [member.strip() for member in candidate.split(STACK_SEPARATOR) if member.strip()]
    if not members:
        raise ValueError(f"empty candidate '{candidate}'; give backbone names or stacks like mobilenet+mobilenet_v2")
    if len(members) == 1:
        return f"extract_features.backbone={members[0]}"
    return f"extract_features.backbone=[{', '.join(members)}]"


def experiment_name(candidate: str, prefix: str = "cmp") -> str:
    """A DVC-safe experiment name for a candidate: ``cmp-mobilenet-mobilenet_v2`` for ``mobilenet+mobilenet_v2``."""
    members = [member.strip() for member in candidate.split(STACK_SEPARATOR) if member.strip()]
    short = [
        Path(member.removeprefix("tflite:").split("#")[0]).stem if member.startswith("tflite:") else member
        for member in members
    ]
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", "-".join(short)).strip("-")
    return f"{prefix}-{slug}"[:80]


@dataclass(frozen=True)
class Row:
    """One line of the leaderboard."""

    experiment: str
    backbone: str
    test_accuracy: float | None
    macro_f1: float | None
    val_accuracy: float | None
    milliseconds_per_image: float | None
    head_seconds: float | None
    parameters: int | None
    random_init: bool
    # With train_head.seeds > 1 the three figures above are means across the seeds, and these their std.
    seeds: int = 1
    test_accuracy_std: float | None = None
    macro_f1_std: float | None = None
    val_accuracy_std: float | None = None


def _dig(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def extraction_cost(extract_report: dict | None) -> float | None:
    """Milliseconds per image for the stack: the sum of its members' engine costs."""
    members = list(((extract_report or {}).get("backbones") or {}).values())
    speeds = [member.get("engine_images_per_second") for member in members]
    if not members or not all(speeds):
        return None
    return sum(1000.0 / speed for speed in speeds)


def leaderboard_rows(exp_show: list[dict], names: Sequence[str], parameters: Callable[[dict], int | None]) -> list[Row]:
    """Rows for the named experiments from ``dvc exp show --json`` output, best first."""
    found: dict[str, dict] = {}
    for baseline in exp_show:
        for group in baseline.get("experiments") or []:
            for revision in group.get("revs") or []:
                if revision.get("name") in names:
                    found[revision["name"]] = revision.get("data") or {}
    rows = []
    for name in names:
        data = found.get(name)
        if data is None:
            continue
        metrics = {path: _dig(content, "data") or {} for path, content in (data.get("metrics") or {}).items()}
        evaluation = metrics.get("metrics/evaluate.json", {})
        extract_report = metrics.get("metrics/extract_features.json", {})
        figures = {
            "test_accuracy": _dig(evaluation, "test", "accuracy"),
            "macro_f1": _dig(evaluation, "test", "macro_f1"),
            "val_accuracy": _dig(evaluation, "val", "accuracy"),
            **seed_spread(evaluation),  # means and stds across seeds, where there are several
        }
        rows.append(
            Row(
                experiment=name,
                backbone=extract_report.get("stack") or _dig(evaluation, "provenance", "backbone") or "?",
                milliseconds_per_image=extraction_cost(extract_report),
                head_seconds=_dig(metrics.get("metrics/train_head.json", {}), "seconds"),
                parameters=parameters(extract_report),
                random_init=bool(extract_report.get("random_init")),
                **figures,
            )
        )
    return sorted(rows, key=lambda row: -(row.test_accuracy or 0.0))


def seed_spread(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Row fields from metrics/evaluate.json's ``seeds``: means and stds across seeds, when more than one was trained.

    Empty (the kept model's own figures stand) for one seed, or a deterministic head trained once.
    """
    spread = evaluation.get("seeds") if isinstance(evaluation, Mapping) else None
    if not isinstance(spread, Mapping) or int(spread.get("count") or 1) < 2:
        return {}
    return {
        "seeds": int(spread["count"]),
        "test_accuracy": spread.get("test_accuracy_mean"),
        "test_accuracy_std": spread.get("test_accuracy_std"),
        "macro_f1": spread.get("test_macro_f1_mean"),
        "macro_f1_std": spread.get("test_macro_f1_std"),
        "val_accuracy": spread.get("val_accuracy_mean"),
        "val_accuracy_std": spread.get("val_accuracy_std"),
    }


def format_table(rows: Sequence[Row], failed: Mapping[str, Path | None] | None = None) -> str:
    """A plain-text leaderboard; each failed experiment gets a row with the path of its saved log.

    Where an experiment trained several seeds (``train_head.seeds``), its accuracy and macro-F1
    cells show the mean and std across them, ``93.1±0.4%``, and the ``seeds`` column their number.
    """
    header = (
        f"{'#':>2}  {'backbone':<40} {'test acc':>10} {'macro-F1':>10} {'val acc':>10} {'seeds':>5} "
        f"{'img/s':>7} {'ms/img':>7} {'head s':>6} {'params':>11}  experiment"
    )
    lines = [header, "-" * len(header)]
    for rank, row in enumerate(rows, 1):
        speed = f"{1000 / row.milliseconds_per_image:7.1f}" if row.milliseconds_per_image else f"{'?':>7}"
        cost = f"{row.milliseconds_per_image:7.2f}" if row.milliseconds_per_image else f"{'?':>7}"
        label = row.backbone + (" (RANDOM INIT)" if row.random_init else "")
        lines.append(
            f"{rank:>2}  {label[:40]:<40} {_percent(row.test_accuracy, row.test_accuracy_std):>10} "
            f"{_percent(row.macro_f1, row.macro_f1_std):>10} {_percent(row.val_accuracy, row.val_accuracy_std):>10} "
            f"{row.seeds:>5} "
            f"{speed} {cost} {_number(row.head_seconds, '.1f'):>6} {_number(row.parameters, ','):>11}  {row.experiment}"
        )
    for name, log in sorted((failed or {}).items()):
        where = f"FAILED, log: {log}" if log else "FAILED (no log: see `dvc queue logs`)"
        lines.append(f"{'--':>2}  {where[:100]:<100}  {name}")
    return "\n".join(lines)


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "?"
    return f"{100 * value:.1f}\u00b1{100 * std:.1f}%" if std is not None else f"{100 * value:.1f}%"


def _number(value: float | int | None, spec: str) -> str:
    return format(value, spec) if value is not None else "?"


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Scatter plot of test accuracy against extraction cost per image, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from transferlab.core import atomic

    figure, axis = pyplot.subplots(figsize=(8, 5.5), dpi=110)
    for row in rows:
        if row.test_accuracy is None or row.milliseconds_per_image is None:
            continue
        stacked = STACK_SEPARATOR in row.backbone
        axis.scatter(
            row.milliseconds_per_image,
            100 * row.test_accuracy,
            s=60,
            marker="D" if stacked else "o",
            color="tab:red" if stacked else "tab:blue",
        )
        axis.annotate(
            row.backbone,
            (row.milliseconds_per_image, 100 * row.test_accuracy),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    axis.set_xlabel("extraction cost, ms per image (engine, this machine; a stack sums its members)")
    axis.set_ylabel("test accuracy, %")
    axis.set_title("Accuracy against extraction cost (o: one backbone, \u25c6: stack)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    pyplot.close(figure)
    return path


def run_experiments(
    candidates: Sequence[str],
    *,
    dvc: str,
    overrides: Sequence[str],
    jobs: int,
    report: Callable[[str], None],
    poll_seconds: float = 3.0,
    cwd: Path | None = None,
    prefix: str = "cmp",
    logs: Path = Path("logs/compare"),
) -> tuple[list[str], dict[str, Path | None]]:
    """Queues one experiment per candidate, runs the queue, and reports each as it finishes.

    Returns:
        The experiment names, and for each failed one the file its log was saved to (None when
        DVC had no log for it).
    """
    names = [experiment_name(candidate, prefix) for candidate in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"two candidates give the same experiment name: {names}; list each candidate once")
    for candidate, name in zip(candidates, names):
        command = [dvc, "exp", "run", "--queue", "-n", name, "-S", backbone_override(candidate)]
        for override in overrides:
            command += ["-S", override]
        _run(command, cwd)
        report(f"queued {name}: {candidate}")
    # `dvc queue start` may return at once (workers in the background) or only when the queue
    # is done: run it beside the polling, so progress lines come as experiments finish.
    starter = subprocess.Popen(
        [dvc, "queue", "start", "--jobs", str(jobs)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    failed = _wait(names, dvc=dvc, report=report, poll_seconds=poll_seconds, cwd=cwd, logs=logs)
    starter.communicate()
    return names, failed


def _run(command: Sequence[str], cwd: Path | None) -> str:
    result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"`{' '.join(command)}` failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _wait(
    names: Sequence[str],
    *,
    dvc: str,
    report: Callable[[str], None],
    poll_seconds: float,
    cwd: Path | None,
    logs: Path,
) -> dict[str, Path | None]:
    started = time.monotonic()
    pending = list(names)
    failed: dict[str, Path | None] = {}
    while pending:
        states = queue_states(_run([dvc, "queue", "status"], cwd))
        for name in list(pending):
            state = states.get(name)
            if state in ("success", "failed"):
                pending.remove(name)
                done = len(names) - len(pending)
                report(f"[{done}/{len(names)}] {name}: {state} after {time.monotonic() - started:.0f} s")
                if state == "failed":
                    failed[name] = save_log(name, dvc=dvc, cwd=cwd, logs=logs)
                    report(f"  its log: {failed[name] or f'{dvc} queue logs {name} (DVC kept none)'}")
        if pending:
            time.sleep(poll_seconds)
    return failed


def save_log(name: str, *, dvc: str, cwd: Path | None, logs: Path) -> Path | None:
    """Saves ``dvc queue logs NAME`` to ``logs/NAME.log`` at once, before DVC can drop it; None if empty."""
    from transferlab.core import atomic

    result = subprocess.run([dvc, "queue", "logs", name], cwd=cwd, capture_output=True, text=True)
    text = (result.stdout + result.stderr).strip()
    if not text:
        return None
    path = (Path(cwd) if cwd else Path()) / logs / f"{name}.log"
    atomic.write_text(path, text + "\n")
    return logs / f"{name}.log"


def queue_states(status_output: str) -> dict[str, str]:
    """Experiment name -> lower-case status, from ``dvc queue status``' table."""
    states = {}
    for line in status_output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1].lower() in ("queued", "running", "success", "failed"):
            states[parts[1]] = parts[-1].lower()
    return states


def exp_show(dvc: str, cwd: Path | None = None) -> list[dict]:
    """``dvc exp show --json`` parsed (all experiments of the current baseline)."""
    return json.loads(_run([dvc, "exp", "show", "--json"], cwd))


def backbone_parameters(extract_report: dict) -> int | None:
    """Total parameters of a stack's backbones (registry counts; TFLite files are read)."""
    from transferlab.backbones import registry
    from transferlab.tflite import describe

    total = 0
    for name, member in (extract_report.get("backbones") or {}).items():
        if member.get("kind") == "tflite":
            total += describe.describe_tflite(registry.parse_spec(member["spec"]).path).parameters
        else:
            total += registry.parameter_count(name, member.get("alpha"))
    return total or None


# ---------------------------------------------------------------- prefetch: one embedder before the queue


def apply_overrides(params: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """params.yaml's mapping with ``KEY=VALUE`` overrides applied as ``dvc exp run -S`` does (YAML values)."""
    result = copy.deepcopy(dict(params))
    for override in overrides:
        key, separator, text = override.partition("=")
        parts = [part for part in key.strip().lstrip("+").split(".") if part]
        if not separator or not parts:
            raise ValueError(f"-S {override!r} is not KEY=VALUE (e.g. -S extract_features.batch_size=16)")
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"-S {override!r}: '{part}' is a value, not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"-S {override!r}: the value is not valid YAML ({error})") from None
    return result


def data_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that change what is embedded (sections in :data:`DATA_SECTIONS`)."""
    return [item for item in overrides if item.partition("=")[0].strip().lstrip("+").split(".")[0] in DATA_SECTIONS]


def prefetch(
    candidates: Sequence[str],
    *,
    overrides: Sequence[str],
    params_path: Path,
    images: Path,
    splits: Path,
    augmented: Path,
    report: Callable[[str], None],
) -> bool:
    """Embeds, in this process and one candidate at a time, every row the cache lacks.

    Args:
        candidates: the candidates (backbone specs, ``a+b`` stacks).
        overrides: the ``-S`` overrides every experiment gets.
        params_path: params.yaml.
        images, splits, augmented: the workspace's data stage outputs (data/raw/images,
            data/splits, data/augmented/train.csv), up to date.
        report: called with one line per candidate.

    Returns:
        Whether the cache now holds every row every experiment will embed: False when an
        override changes the data stages or a candidate could not be embedded.
    """
    from transferlab.backbones import stack
    from transferlab.core import params as params_module
    from transferlab.data import tables
    from transferlab.features import embedding_cache, extract_features

    complete = not data_overrides(overrides)
    if not complete:
        report(f"prefetch: {', '.join(data_overrides(overrides))} change the data stages; experiments embed the rest")
    raw = params_module.read_params_file(params_path)
    rows_by_split = {"train": tables.read_views(augmented)}
    rows_by_split.update({split: tables.read_views(splits / f"{split}.csv") for split in ("val", "test")})
    for candidate in candidates:
        try:
            merged = apply_overrides(raw, [*overrides, backbone_override(candidate)])
            sections = {
                name: params_module.parse_section(name, merged.get(name), source=params_path)
                for name in ("base", "extract_features", "download")
            }
            settings = sections["extract_features"]
            if not settings.cache:
                report(f"prefetch {candidate}: extract_features.cache is off; its experiment embeds on its own")
                complete = False
                continue
            started = time.monotonic()
            _, summary = extract_features.extract_features(
                members=stack.resolve_members(settings, seed=sections["base"].seed),
                rows_by_split=rows_by_split,
                images_directory=images,
                cache_directory=embedding_cache.cache_directory(settings.cache_dir),
                engine=settings.engine,
                batch_size=settings.batch_size,
                threads=settings.decode_threads,
                seed=sections["base"].seed,
                max_image_pixels=sections["download"].max_image_pixels,
                mirror_average=settings.mirror_average,
                cache_remote_url=settings.cache_remote,  # teammates get what the prefetch embeds
            )
        except ValueError as error:
            complete = False
            report(f"prefetch {candidate}: failed ({str(error).splitlines()[0]}); its experiment will fail too")
            continue
        report(
            f"prefetch {candidate}: {summary['embedded']} embedded, {summary['cache_hits']} already cached "
            f"({time.monotonic() - started:.0f} s)"
        )
    return complete
