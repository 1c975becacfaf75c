"""Heads: per-block standardization, the logistic probe, the dense head, saving and loading."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn import linear_model, metrics, pipeline

from transferlab import heads
from transferlab.core import params
from transferlab.features import files
from transferlab.heads import base, logistic, train_head

C_GRID = [0.001, 0.01, 0.1, 1.0, 10.0]
LOGISTIC_OPTIONS = {"c_grid": C_GRID, "max_iter": 1000, "select_by": "accuracy"}


def make_split(
    rng: np.random.Generator,
    centers: np.ndarray,
    counts: list[int],
    *,
    widths: tuple[int, ...],
    noise: float = 1.0,
    block_scales: tuple[float, ...] | None = None,
    name: str = "split",
) -> files.Features:
    """Gaussian blobs around ``centers`` (one row per class), ``counts[c]`` rows of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    features = centers[labels] + noise * rng.normal(size=(len(labels), centers.shape[1]))
    if block_scales is not None:
        features = features * np.repeat(block_scales, widths)
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    blocks = tuple(
        files.Block(
            spec=f"backbone_{i}", weights="random-init-seed0" if i else "weights.h5", width=int(w), offset=int(o)
        )
        for i, (w, o) in enumerate(zip(widths, offsets))
    )
    return files.Features(
        features=features.astype(np.float32),
        labels=labels,
        class_names=tuple(f"class_{c}" for c in range(len(counts))),
        blocks=blocks,
        paths=tuple(f"class_{c}/{name}_{i}.jpg" for i, c in enumerate(labels)),
        sha256=tuple(f"{i:064x}" for i in range(len(labels))),
        recipes=("",) * len(labels),
        source=f"{name}.npz",
    )


def blob_splits(seed: int = 0, *, classes: int = 4, widths=(6, 10), separation: float = 1.2, per_class=(40, 15, 15)):
    rng = np.random.default_rng(seed)
    centers = separation * rng.normal(size=(classes, sum(widths)))
    names = ("train", "val", "test")
    return [make_split(rng, centers, [n] * classes, widths=widths, name=name) for n, name in zip(per_class, names)]


def train_logistic(train_split, val_split, *, class_weight="none", log_step=None, **overrides):
    options = {**LOGISTIC_OPTIONS, **overrides}
    return logistic.train(
        train=train_split, val=val_split, seed=0, class_weight=class_weight, log_step=log_step, **options
    )


# --- per-block standardization -------------------------------------------------------------


def test_block_standardizer_gives_every_block_the_same_total_variance():
    rng = np.random.default_rng(1)
    widths = (3, 50)
    features = np.hstack([rng.normal(5.0, 0.01, size=(200, 3)), rng.normal(-2.0, 40.0, size=(200, 50))])
    transformed = base.BlockStandardizer(widths=widths).fit_transform(features)
    np.testing.assert_allclose(transformed.mean(axis=0), 0.0, atol=1e-9)
    total_width = sum(widths)
    for offset, width in ((0, 3), (3, 50)):
        block_variance = transformed[:, offset : offset + width].var(axis=0).sum()
        assert block_variance == pytest.approx(total_width / len(widths))


def test_single_block_standardizer_is_plain_standardization():
    features = np.random.default_rng(2).normal(3.0, 7.0, size=(100, 12))
    ours = base.BlockStandardizer(widths=(12,)).fit_transform(features)
    plain = (features - features.mean(axis=0)) / features.std(axis=0)
    np.testing.assert_allclose(ours, plain, rtol=1e-12)


def test_block_scaled_by_1000_does_not_change_the_head():
    train_split, val_split, test_split = blob_splits(3)

    def scaled(split):
        factors = np.repeat([1.0, 1000.0], split.widths).astype(np.float32)
        return dataclasses.replace(split, features=split.features * factors)

    plain = train_logistic(train_split, val_split).head
    loud = train_logistic(scaled(train_split), scaled(val_split)).head
    assert plain.description.settings["c"] == loud.description.settings["c"]
    expected = plain.predict_proba(test_split.features)
    np.testing.assert_allclose(loud.predict_proba(scaled(test_split).features), expected, atol=1e-5)


def test_constant_column_is_left_at_zero_not_divided_by_zero():
    features = np.column_stack([np.ones(10), np.arange(10.0)])
    transformed = base.BlockStandardizer(widths=(2,)).fit_transform(features)
    assert np.all(np.isfinite(transformed)) and np.all(transformed[:, 0] == 0.0)


def test_block_standardizer_rejects_the_wrong_width():
    standardizer = base.BlockStandardizer(widths=(2, 3)).fit(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        standardizer.transform(np.zeros((4, 6)))


# --- logistic --------------------------------------------------------------------------------


def test_logistic_chooses_c_on_validation_and_beats_chance():
    train_split, val_split, test_split = blob_splits(
        4, classes=4, widths=(40, 60), separation=0.35, per_class=(25, 40, 200)
    )
    steps: list[dict] = []
    outcome = train_logistic(train_split, val_split, log_step=steps.append)
    assert [set(step) for step in steps] == [{"train/loss", "train/accuracy", "val/loss", "val/accuracy"}] * len(C_GRID)
    best = min(range(len(C_GRID)), key=lambda i: (-steps[i]["val/accuracy"], steps[i]["val/loss"]))
    assert outcome.report["c"] == C_GRID[best]
    # Few noisy training rows: the weakest regularization fits train perfectly, validation prefers more.
    assert steps[-1]["train/accuracy"] == 1.0 and outcome.report["c"] < C_GRID[-1]
    accuracy = metrics.accuracy_score(test_split.labels, outcome.head.predict_proba(test_split.features).argmax(axis=1))
    assert accuracy > 0.75  # chance is 0.25


def test_logistic_select_by_log_loss_takes_the_lowest_validation_loss():
    train_split, val_split, _ = blob_splits(5, separation=0.5)
    steps: list[dict] = []
    outcome = train_logistic(train_split, val_split, log_step=steps.append, select_by="log_loss")
    assert outcome.report["c"] == C_GRID[int(np.argmin([step["val/loss"] for step in steps]))]


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_head_reproduces_the_scikit_learn_pipeline(classes):
    train_split, val_split, test_split = blob_splits(6, classes=classes, separation=0.6)
    outcome = train_logistic(train_split, val_split, c_grid=[0.3])
    reference = pipeline.make_pipeline(
        base.BlockStandardizer(widths=train_split.widths), linear_model.LogisticRegression(C=0.3, max_iter=1000)
    ).fit(train_split.features, train_split.labels)
    ours = outcome.head.predict_proba(test_split.features)
    assert ours.shape == (len(test_split), classes)
    np.testing.assert_allclose(ours, reference.predict_proba(test_split.features), atol=1e-9)


def test_class_weight_balanced_changes_the_fit_on_imbalanced_data():
    rng = np.random.default_rng(7)
    centers = 0.5 * rng.normal(size=(2, 8))
    train_split = make_split(rng, centers, [300, 15], widths=(8,), name="train")
    val_split = make_split(rng, centers, [200, 200], widths=(8,), name="val")
    plain = train_logistic(train_split, val_split, c_grid=[1.0]).head
    balanced = train_logistic(train_split, val_split, c_grid=[1.0], class_weight="balanced").head
    assert not np.allclose(plain.coef, balanced.coef)
    minority = val_split.labels == 1

    def minority_recall(head):
        return np.mean(head.predict_proba(val_split.features[minority]).argmax(axis=1) == 1)

    assert minority_recall(balanced) > minority_recall(plain) + 0.2


def test_logistic_needs_validation_rows_to_choose_c():
    train_split, val_split, _ = blob_splits(8)
    empty = dataclasses.replace(val_split, features=val_split.features[:0], labels=val_split.labels[:0])
    with pytest.raises(ValueError, match="split.val_fraction"):
        train_logistic(train_split, empty)
    assert train_logistic(train_split, empty, c_grid=[1.0]).report["c"] == 1.0


def test_a_class_without_training_rows_is_an_error_naming_it():
    train_split, val_split, _ = blob_splits(9, classes=3)
    keep = train_split.labels != 2
    missing = dataclasses.replace(train_split, features=train_split.features[keep], labels=train_split.labels[keep])
    with pytest.raises(ValueError, match="class_2"):
        train_logistic(missing, val_split)


def test_train_head_reports_metrics_and_round_trips_through_the_saved_folder(tmp_path):
    train_split, val_split, test_split = blob_splits(10)
    result = train_head.train_head(
        head="logistic", train=train_split, val=val_split, seed=0, class_weight="none", options=LOGISTIC_OPTIONS
    )
    assert set(result.metrics) >= {"head", "seconds", "c", "train", "val", "classes", "feature_dim"}
    assert set(result.metrics["val"]) == {"examples", "accuracy", "loss"}
    line = train_head.describe(result.metrics)
    figures = result.metrics
    assert line == (
        f"logistic head: train accuracy {figures['train']['accuracy']:.4f}, val accuracy "
        f"{figures['val']['accuracy']:.4f}, {figures['seconds']:.1f} s"
    )
    no_val = {**result.metrics, "val": {"examples": 0}}
    assert "val accuracy n/a (no validation rows)" in train_head.describe(no_val)
    train_head.save_head(result.head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.json", "logistic.npz", "standardizer.npz"]
    loaded = heads.load_head(tmp_path / "head")
    assert np.array_equal(loaded.predict_proba(test_split.features), result.head.predict_proba(test_split.features))
    description = json.loads((tmp_path / "head" / "head.json").read_text())
    assert description["head"] == "logistic" and description["class_names"] == list(train_split.class_names)
    assert [block["random_init"] for block in description["blocks"]] == [False, True]
    assert description["settings"]["c"] == result.metrics["c"]
    # Saving the same head again gives the same bytes: DVC sees an unchanged head and skips evaluate.
    train_head.save_head(result.head, tmp_path / "again")
    for name in ("head.json", "logistic.npz", "standardizer.npz"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "head" / name).read_bytes(), name


def test_saved_folder_is_replaced_whole(tmp_path):
    train_split, val_split, _ = blob_splits(11)
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "stale.txt").write_text("from an older run")
    train_head.save_head(train_logistic(train_split, val_split).head, tmp_path / "head")
    assert not (tmp_path / "head" / "stale.txt").exists()


def test_load_head_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="run the train_head stage"):
        heads.load_head(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="head.json not found"):
        heads.load_head(tmp_path / "empty")
    train_split, val_split, _ = blob_splits(12)
    train_head.save_head(train_logistic(train_split, val_split).head, tmp_path / "head")
    payload = json.loads((tmp_path / "head" / "head.json").read_text())
    (tmp_path / "head" / "head.json").write_text(json.dumps({**payload, "head": "svm"}))
    with pytest.raises(
        ValueError, match="Unsupported head 'svm'; choose one of: dense, finetune, fusion, logistic, scratch"
    ):
        heads.load_head(tmp_path / "head")
    (tmp_path / "head" / "head.json").write_text(json.dumps(payload))
    (tmp_path / "head" / "logistic.npz").unlink()
    with pytest.raises(ValueError, match="logistic.npz not found"):
        heads.load_head(tmp_path / "head")


def test_head_refuses_features_from_other_backbones():
    train_split, val_split, test_split = blob_splits(13)
    head = train_logistic(train_split, val_split).head
    other = dataclasses.replace(test_split, blocks=(test_split.blocks[0], files.Block("resnet50", "x", 10, 6)))
    with pytest.raises(ValueError, match="re-run train_head"):
        head.description.check_features(other)


def test_unknown_head_lists_the_registered_ones():
    with pytest.raises(ValueError, match="choose one of: dense, finetune, fusion, logistic, scratch"):
        heads.head_module("svm")


def test_each_heads_trainer_takes_exactly_its_params_section():
    sections = params.TrainHeadParams.model_fields
    common = {"train", "val", "seed", "class_weight", "log_step"}
    for name in heads.names():
        expected = set(params.TrainHeadParams(head=name).head_options()) if name in sections else set()
        assert set(inspect.signature(heads.head_module(name).train).parameters) == common | expected, name


def test_params_sections_validate_and_name_the_bad_key():
    settings = params.parse_section(
        "train_head", {"head": "dense", "dense": {"epochs": 3}, "logistic": {"c_grid": [1, 0.1]}}
    )
    assert settings.head_options()["epochs"] == 3 and settings.logistic.c_grid == [0.1, 1.0]
    with pytest.raises(ValueError, match=r"train_head\.dense\.units"):
        params.parse_section("train_head", {"dense": {"units": 0}})
    with pytest.raises(
        ValueError,
        match=r"train_head\.head: unknown head 'svm'; choose one of: dense, finetune, fusion, logistic, scratch",
    ):
        params.parse_section("train_head", {"head": "svm"})
    with pytest.raises(ValueError, match=r"train_head\.logistic\.c_grid"):
        params.parse_section("train_head", {"logistic": {"c_grid": [1.0, 1.0]}})
    with pytest.raises(ValueError, match=r"train_head\.class_weight"):
        params.parse_section("train_head", {"class_weight": "auto"})
    with pytest.raises(ValueError, match=r"evaluate\.gallery_images"):
        params.parse_section("evaluate", {"gallery_images": 0})


def test_logistic_path_never_imports_tensorflow(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from transferlab import heads
        from transferlab.core import params
        from transferlab.heads import train_head
        from transferlab.features import files
        from transferlab.reports import evaluate
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
        split = files.Features(features=x, labels=y, class_names=("a", "b", "c"), blocks=(files.Block("m", "w", 4, 0),))
        result = train_head.train_head(head="logistic", train=split, val=split, seed=0, class_weight="none",
                                  options={"c_grid": [0.1, 1.0], "max_iter": 100, "select_by": "accuracy"})
        train_head.save_head(result.head, sys.argv[1])
        heads.load_head(sys.argv[1]).predict_proba(x)
        loaded = sorted(name for name in ("tensorflow", "keras") if name in sys.modules)
        print("loaded:", loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "head")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


# --- dense (imports TensorFlow) -----------------------------------------------------------------

DENSE_OPTIONS = {"units": 32, "dropout": 0.2, "learning_rate": 0.01, "epochs": 8, "batch_size": 16, "patience": 3}


def train_dense(train_split, val_split, *, seed=0, class_weight="none", log_step=None, **overrides):
    from transferlab.heads import dense

    options = {**DENSE_OPTIONS, **overrides}
    return dense.train(
        train=train_split, val=val_split, seed=seed, class_weight=class_weight, log_step=log_step, **options
    )


@pytest.mark.slow
def test_dense_is_deterministic_for_a_seed_and_round_trips(tmp_path):
    train_split, val_split, test_split = blob_splits(14, separation=0.5)
    first_steps: list[dict] = []
    second_steps: list[dict] = []
    first = train_dense(train_split, val_split, log_step=first_steps.append)
    second = train_dense(train_split, val_split, log_step=second_steps.append)
    other_seed = train_dense(train_split, val_split, seed=1)
    assert first_steps == second_steps and first.report == second.report
    first_probabilities = first.head.predict_proba(test_split.features)
    assert np.array_equal(first_probabilities, second.head.predict_proba(test_split.features))
    assert not np.allclose(first_probabilities, other_seed.head.predict_proba(test_split.features))
    assert metrics.accuracy_score(test_split.labels, first_probabilities.argmax(axis=1)) > 0.6  # chance 0.25
    train_head.save_head(first.head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.json",
        "head.keras",
        "standardizer.npz",
        "weights.npz",
    ]
    loaded = heads.load_head(tmp_path / "head")
    np.testing.assert_array_equal(loaded.predict_proba(test_split.features), first_probabilities)
    saved_again = tmp_path / "again"
    train_head.save_head(second.head, saved_again)
    for name in ("weights.npz", "standardizer.npz", "head.json"):  # same seed, same bytes: DVC sees no change
        assert (saved_again / name).read_bytes() == (tmp_path / "head" / name).read_bytes(), name


@pytest.mark.slow
def test_dense_predicts_in_numpy_as_keras_does_and_loads_without_tensorflow(tmp_path, caplog):

    # Blocks of very different scales, and a constant column (standardized by 1), as real stacks have.
    train_split, val_split, test_split = blob_splits(17, widths=(6, 10), separation=0.8)
    train_split = dataclasses.replace(train_split, features=train_split.features * np.repeat([50.0, 0.02], (6, 10)))
    train_split.features[:, 3] = 2.5
    trained = train_dense(train_split, val_split, epochs=4).head
    features = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32) * np.repeat([50.0, 0.02], (6, 10))
    features = np.concatenate([features, train_split.features, test_split.features])
    in_numpy = trained.predict_proba(features)
    in_keras = np.asarray(trained.model(features, training=False), dtype=np.float64)
    assert np.abs(in_numpy - in_keras).max() <= 1e-5
    assert np.array_equal(in_numpy.argmax(axis=1), in_keras.argmax(axis=1))
    assert in_numpy.max() > 0.9, "a trained head, not a near-uniform one: the comparison must mean something"

    folder = tmp_path / "head"
    train_head.save_head(trained, folder)
    np.save(tmp_path / "features.npy", features)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from transferlab import heads
        folder, features, out = sys.argv[1:]
        np.save(out, heads.load_head(folder).predict_proba(np.load(features)))
        loaded = sorted(name for name in ("tensorflow", "keras") if name in sys.modules)
        print("loaded:", loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    arguments = [str(folder), str(tmp_path / "features.npy"), str(tmp_path / "out.npy")]
    completed = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), in_numpy)
    reloaded = heads.load_head(folder)  # export.keras builds its classifier from head.keras, read on demand
    assert reloaded.trained_model is None
    np.testing.assert_array_equal(np.asarray(reloaded.model(features, training=False)), in_keras.astype(np.float32))

    # A head saved before weights.npz existed: its weights come from head.keras (TensorFlow), same numbers.
    (folder / "weights.npz").unlink()
    with caplog.at_level("WARNING"):
        old = heads.load_head(folder)
    assert "re-run train_head" in caplog.text and old.trained_model is not None
    np.testing.assert_array_equal(old.predict_proba(features), in_numpy)


def test_dense_weights_that_do_not_fit_the_head_are_refused(tmp_path):
    from transferlab.heads import dense

    rng = np.random.default_rng(0)
    weights = dense.DenseWeights(
        mean=np.zeros(4, np.float32),
        variance=np.ones(4, np.float32),
        hidden_kernel=rng.normal(size=(4, 3)).astype(np.float32),
        hidden_bias=np.zeros(3, np.float32),
        output_kernel=rng.normal(size=(3, 2)).astype(np.float32),
        output_bias=np.zeros(2, np.float32),
    )
    folder = tmp_path / "head"
    folder.mkdir()
    weights.save(folder / dense.WEIGHTS_FILE)
    base.BlockStandardizer(widths=(4,)).fit(rng.normal(size=(5, 4))).save(folder / base.STANDARDIZER_FILE)
    blocks = (files.Block("m", "w", 4, 0),)
    head = dense.load(folder, base.HeadDescription(head="dense", class_names=("a", "b"), blocks=blocks))
    x = rng.normal(size=(7, 4))
    hidden = np.maximum(x @ weights.hidden_kernel + weights.hidden_bias, 0)
    np.testing.assert_allclose(head.predict_proba(x), base.softmax(hidden @ weights.output_kernel), rtol=1e-6)
    with pytest.raises(ValueError, match=r"maps 4 features to 2 classes, head.json says 4 -> 3; re-run train_head"):
        dense.load(folder, base.HeadDescription(head="dense", class_names=("a", "b", "c"), blocks=blocks))
    base.save_arrays(folder / dense.WEIGHTS_FILE, **{**dataclasses.asdict(weights), "output_bias": np.zeros(5)})
    with pytest.raises(ValueError, match="do not chain; re-run train_head"):
        dense.load(folder, base.HeadDescription(head="dense", class_names=("a", "b"), blocks=blocks))


@pytest.mark.slow
def test_dense_stops_early_and_restores_the_best_epoch():
    # Few rows, many noise columns, a large learning rate: validation loss turns up within a few epochs.
    train_split, val_split, _ = blob_splits(15, widths=(100, 100), separation=0.25, per_class=(10, 30, 1))
    steps: list[dict] = []
    outcome = train_dense(
        train_split, val_split, log_step=steps.append, units=256, learning_rate=0.05, epochs=60, patience=2
    )
    val_losses = [step["val/loss"] for step in steps]
    assert outcome.report["epochs_run"] == len(steps) < 60
    assert outcome.report["best_epoch"] == int(np.argmin(val_losses)) + 1 < len(steps)
    restored = base.accuracy_and_loss(outcome.head.predict_proba(val_split.features), val_split.labels)["loss"]
    assert restored == pytest.approx(min(val_losses), rel=1e-4)
    assert restored < val_losses[-1]


@pytest.mark.slow
def test_dense_balanced_class_weight_changes_the_fit():
    rng = np.random.default_rng(16)
    centers = 0.5 * rng.normal(size=(2, 8))
    train_split = make_split(rng, centers, [200, 10], widths=(8,), name="train")
    val_split = make_split(rng, centers, [50, 50], widths=(8,), name="val")
    plain = train_dense(train_split, val_split, epochs=5, patience=5)
    balanced = train_dense(train_split, val_split, epochs=5, patience=5, class_weight="balanced")
    minority = val_split.features[val_split.labels == 1]
    assert balanced.head.predict_proba(minority)[:, 1].mean() > plain.head.predict_proba(minority)[:, 1].mean() + 0.1


def test_split_metrics_a_chunk_of_rows_at_a_time_equal_scikit_learn_on_the_whole_split():
    """train_head's train/val figures are computed chunk by chunk, the same as log_loss on all rows."""
    train_split, val_split, _ = blob_splits(3, classes=3, per_class=(9000, 30, 5))  # 27000 rows: 4 chunks
    head = train_logistic(train_split, val_split).head
    calls = []

    class Recording:
        def predict_proba(self, features):
            calls.append(len(features))
            return head.predict_proba(features)

    probabilities = head.predict_proba(train_split.features)
    expected = {
        "accuracy": metrics.accuracy_score(train_split.labels, probabilities.argmax(axis=1)),
        "loss": metrics.log_loss(train_split.labels, probabilities, labels=[0, 1, 2]),
    }
    chunked = base.split_accuracy_and_loss(Recording(), train_split)
    assert calls == [files.CHUNK_ROWS] * 3 + [27000 - 3 * files.CHUNK_ROWS]
    assert chunked["accuracy"] == expected["accuracy"] and 0 < expected["accuracy"] < 1
    assert chunked["loss"] == pytest.approx(expected["loss"], rel=1e-12)
    assert base.accuracy_and_loss(probabilities, train_split.labels) == expected
