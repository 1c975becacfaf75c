"""How the fusion head's defaults were chosen: cross-fitted validation of its variants (issue 16).

Run it in a workspace where the fusion experiment has run (README "Best accuracy"): it reads
``data/features`` and ``data/taps`` (the stack's first member fine-tuned). For each seed (those
``train_head.seeds`` derives from ``base.seed``) and each learning-rate schedule it fine-tunes
that member once for each of ``--epochs`` with the product's own model, batches and schedule
(:mod:`transferlab.heads.finetune`), recording every epoch's validation and test probabilities;
each logistic member head is trained as the head trains it, and its fit at every C of
``train_head.logistic.c_grid`` (the head's own walk of the grid, warm starts included) recorded. What is recorded
goes to ``--out`` (a rerun skips what is there).

Then every variant (schedule; the fine-tuned member's epoch kept by early stopping or the last;
frozen members joint or separate) is scored the way a held-out set would score it: validation is
split into two stratified halves, *every* choice (C of each logistic member, the early-stopping
epoch, the combiner weights) is made on one half and the fused model is scored on the other,
both ways, over ``--halvings`` random halvings. Scoring on the images that made the choices
would flatter the variant that chooses most. The test split is printed last, for the variants
as they would train on all of validation: it took no part in the choice.

    python benchmarks/fusion_validation.py --out /tmp/fusion_validation   # about 10 min per run on 2 cores
    python benchmarks/fusion_validation.py --out /tmp/fusion_validation --schedules cosine --epochs 6 8
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from transferlab.heads import base

SCHEDULES = ("constant", "cosine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("."), help="workspace with data/features and data/taps")
    parser.add_argument("--out", type=Path, required=True, help="folder for the recorded runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[8], help="epochs of a run (several: one run each)")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--halvings", type=int, default=20)
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(arguments.work)
    splits = _splits(arguments.work)
    logistic = _logistic_runs(splits, settings, arguments.out)
    from transferlab.heads import seeds

    runs = {}
    derived = list(enumerate(seeds.derive(settings["seed"], arguments.seeds)))
    for schedule, epochs, (k, seed) in itertools.product(arguments.schedules, arguments.epochs, derived):
        runs[f"{schedule} over {epochs}", k] = _finetune_run(splits, settings, schedule, seed, epochs, arguments.out)
    _print_tables(runs, logistic, splits, settings, arguments.halvings)


def _settings(work: Path) -> dict:
    from transferlab.core import params

    heads = params.load_section("train_head", work / "params.yaml")
    return {
        "seed": params.load_section("base", work / "params.yaml").seed,
        "patience": heads.finetune.patience,
        "finetune": heads.finetune.model_dump(),
        "logistic": heads.logistic.model_dump(),
    }


def _splits(work: Path) -> dict:
    from transferlab.features import files

    return files.load_splits(work / "data/features", ("train", "val", "test"), taps_directory=work / "data/taps")


def _logistic_runs(splits: dict, settings: dict, out: Path) -> dict[str, dict[float, dict[str, np.ndarray]]]:
    """Per frozen grouping key, per C: validation and test probabilities of the logistic head's fit at that C."""
    from transferlab.heads import base, fusion

    frozen = tuple(range(1, len(splits["train"].blocks)))
    groups = {"joint": frozen, **{f"member{index}": (index,) for index in frozen}}
    path = out / "logistic_path.npz"
    if not path.exists():
        saved = {}
        for key, blocks in groups.items():
            parts = {name: fusion.member_split(split, blocks) for name, split in splits.items()}
            for candidate in _grid_walk(train=parts["train"], val=parts["val"], settings=settings):
                for name in ("val", "test"):
                    saved[f"{key}|{candidate.c}|{name}"] = base.predict_split(candidate.head, parts[name])
        np.savez(path, **saved)
    stored = np.load(path)
    result: dict = {}
    for name in stored.files:
        key, c, split = name.split("|")
        result.setdefault(key, {}).setdefault(float(c), {})[split] = stored[name]
    return result


def _grid_walk(*, train, val, settings: dict) -> list:
    """Every C's fit of the logistic head's own grid walk (warm starts from strong to weak regularization).

    Fitting each C from scratch is not the same: at weak regularization lbfgs stops elsewhere
    (EfficientNet-Lite0 on flower_photos: C=1 chosen from scratch, C=0.03 on the head's walk).
    So the head itself trains, and its candidates are taken where it selects among them.
    """
    from unittest import mock

    from transferlab.heads import logistic

    candidates: list = []
    select = logistic._select

    def capture(fitted, select_by):
        candidates.extend(fitted)
        return select(fitted, select_by)

    with mock.patch.object(logistic, "_select", capture):
        logistic.train(train=train, val=val, seed=settings["seed"], class_weight="none", **settings["logistic"])
    return candidates


def _finetune_run(splits: dict, settings: dict, schedule: str, seed: int, epochs: int, out: Path) -> dict:
    """Every epoch's val/test probabilities of the first member fine-tuned with ``schedule`` (no early stopping)."""
    path = out / f"finetune_{schedule}_{seed}_{epochs}.npz"
    if path.exists():
        return {name: _normalized(values) for name, values in np.load(path).items()}
    import keras

    from transferlab.backbones import taps
    from transferlab.heads import finetune, fusion, keras_common

    parts = {name: fusion.member_split(split, (0,), kind="finetune") for name, split in splits.items()}
    tapped = finetune.check_taps(parts["train"])
    options = settings["finetune"]
    keras_common.seed_everything(seed)
    backbone = keras.models.load_model(tapped.backbone_file, compile=False)
    layer = taps.resolve_from_layer(tapped.block, options["from_layer"])
    classes = len(splits["train"].class_names)
    model = finetune.build_model(backbone=backbone, layer=layer, classes=classes, dropout=options["dropout"], seed=seed)
    batches = finetune.TapBatches(
        tapped.activations, parts["train"].labels, batch_size=options["batch_size"], seed=seed, shuffle=True,
        flip=options["flip"],
    )  # fmt: skip
    rate = finetune.learning_rate_schedule(schedule, options["learning_rate"], steps=len(batches) * epochs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=rate), loss="sparse_categorical_crossentropy")
    maps = {name: finetune.check_taps(parts[name]).activations for name in ("val", "test")}
    recorded: dict[str, list] = {"val": [], "test": []}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            for name, activations in maps.items():
                recorded[name].append(_predict(model, activations))

    started = time.perf_counter()
    model.fit(batches, epochs=epochs, verbose=0, callbacks=[Record()])
    print(f"fine-tuned {schedule} seed {seed}: {time.perf_counter() - started:.0f} s for {epochs} epochs", flush=True)
    result = {name: np.stack(values) for name, values in recorded.items()}
    np.savez(path, **result)
    return {name: _normalized(values) for name, values in result.items()}


def _normalized(probabilities: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 in float64, as the finetune head's predict_proba returns them."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities / probabilities.sum(axis=-1, keepdims=True)


def _predict(model, activations: np.ndarray) -> np.ndarray:
    batches = (
        np.asarray(activations[start : start + 128], dtype=np.float32) for start in range(0, len(activations), 128)
    )
    return np.concatenate([model(batch, training=False).numpy() for batch in batches]).astype(np.float64)


def _print_tables(runs: dict, logistic: dict, splits: dict, settings: dict, halvings: int) -> None:
    from transferlab.heads import fusion

    patience, select_by = settings["patience"], settings["logistic"]["select_by"]
    labels = {name: np.asarray(splits[name].labels) for name in ("val", "test")}
    members = sorted(key for key in logistic if key != "joint")
    groupings = {"joint": ["joint"], "separate": members}
    halves = _halvings(labels["val"], halvings)
    variants = list(dict.fromkeys(name for name, _ in runs))  # "<schedule> over <epochs>", in run order
    print("\nCross-fitted validation: every choice on one half, the fused model scored on the other")
    print("| schedule | member epoch | frozen | seeds | fused accuracy | fused log loss |\n|---|---|---|---|---|---|")
    for schedule, keep, grouping in itertools.product(variants, ("early stopping", "last"), groupings):
        scores = []
        for (run_schedule, _), run in runs.items():
            if run_schedule != schedule:
                continue
            per_seed = []
            for chosen, scored in ((a, ~a) for half in halves for a in (half, ~half)):
                parts = [run["val"][_epoch(run["val"], labels["val"], chosen, keep, patience)]]
                parts += [
                    logistic[key][_best_c(logistic[key], labels["val"], chosen, select_by)]["val"]
                    for key in groupings[grouping]
                ]
                weights, _ = fusion.choose_weights([p[chosen] for p in parts], labels["val"][chosen], step=0.1)
                fused = fusion.combine([p[scored] for p in parts], weights)
                per_seed.append(_accuracy_and_loss(fused, labels["val"][scored]))
            scores.append(np.mean(per_seed, axis=0))
        mean = np.mean(scores, axis=0)
        print(f"| {schedule} | {keep} | {grouping} | {len(scores)} | {mean[0]:.2%} | {mean[1]:.3f} |")
    for grouping, keys in groupings.items():  # frozen-only fusion (finetune: []): deterministic, no seeds
        scores = []
        for chosen, scored in ((a, ~a) for half in halves for a in (half, ~half)):
            parts = [logistic[key][_best_c(logistic[key], labels["val"], chosen, select_by)]["val"] for key in keys]
            weights, _ = fusion.choose_weights([p[chosen] for p in parts], labels["val"][chosen], step=0.1)
            fused = fusion.combine([p[scored] for p in parts], weights)
            scores.append(_accuracy_and_loss(fused, labels["val"][scored]))
        mean = np.mean(scores, axis=0)
        print(f"| none (frozen only) | - | {grouping} | - | {mean[0]:.2%} | {mean[1]:.3f} |")
    print("\nTest (choices made on all of validation), per seed")
    print("| schedule | member epoch | frozen | fused test accuracy per seed | mean ± std |\n|---|---|---|---|---|")
    everything = np.ones(len(labels["val"]), dtype=bool)
    for schedule, keep, grouping in itertools.product(variants, ("early stopping", "last"), groupings):
        accuracies = []
        for (run_schedule, _), run in runs.items():
            if run_schedule != schedule:
                continue
            epoch = _epoch(run["val"], labels["val"], everything, keep, patience)
            keys = groupings[grouping]
            cs = [_best_c(logistic[key], labels["val"], everything, select_by) for key in keys]
            val = [run["val"][epoch]] + [logistic[key][c]["val"] for key, c in zip(keys, cs)]
            test = [run["test"][epoch]] + [logistic[key][c]["test"] for key, c in zip(keys, cs)]
            weights, _ = fusion.choose_weights(val, labels["val"], step=0.1)
            accuracies.append(float(np.mean(fusion.combine(test, weights).argmax(axis=1) == labels["test"])))
        spread = np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0.0
        each = ", ".join(f"{value:.2%}" for value in accuracies)
        print(f"| {schedule} | {keep} | {grouping} | {each} | {np.mean(accuracies):.2%} ± {spread:.2%} |")


def _halvings(labels: np.ndarray, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    result = []
    for _ in range(count):
        half = np.zeros(len(labels), dtype=bool)
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            half[rows[: len(rows) // 2]] = True
        result.append(half)
    return result


def _accuracy_and_loss(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    figures = base.accuracy_and_loss(probabilities, labels)  # the heads' own figures (scikit-learn's log_loss)
    return figures["accuracy"], figures["loss"]


def _epoch(epochs: np.ndarray, labels: np.ndarray, chosen: np.ndarray, keep: str, patience: int) -> int:
    """The epoch (0-based) kept: the last, or Keras' early stopping on the chosen rows' loss."""
    if keep == "last":
        return len(epochs) - 1
    best, best_loss, waited = 0, np.inf, 0
    for epoch, probabilities in enumerate(epochs):
        loss = _accuracy_and_loss(probabilities[chosen], labels[chosen])[1]
        if loss < best_loss:
            best, best_loss, waited = epoch, loss, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best


def _best_c(by_c: dict[float, dict], labels: np.ndarray, chosen: np.ndarray, select_by: str) -> float:
    """The logistic head's select_by rule on the chosen rows: best accuracy (ties: lower loss), or lowest loss."""
    scored = []
    for c, parts in by_c.items():
        accuracy, loss = _accuracy_and_loss(parts["val"][chosen], labels[chosen])
        scored.append((-accuracy, loss, c) if select_by == "accuracy" else (loss, -accuracy, c))
    return min(scored)[2]


if __name__ == "__main__":
    main()
