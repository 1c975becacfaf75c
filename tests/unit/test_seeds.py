"""train_head.seeds: the seeds, the kept one, models/head's layout, evaluate's mean +- std and ensemble."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import CLASSES, LABELS, PROBABILITIES, features, fixed_head
from test_heads import DENSE_OPTIONS, LOGISTIC_OPTIONS, blob_splits

from transferlab import heads
from transferlab.heads import base, seeds, train_head
from transferlab.reports import evaluate

# --- the seeds and the kept one -------------------------------------------------------------------


def test_seed_zero_is_the_base_seed_and_the_others_are_distinct_reproducible_hashes():
    derived = seeds.derive(42, 20)
    assert derived[0] == 42 and seeds.derive(42, 1) == [42]
    assert derived == seeds.derive(42, 20) and derived[:3] == seeds.derive(42, 3)  # a prefix whatever N is
    assert len(set(derived)) == 20 and all(0 <= seed < 2**32 for seed in derived)
    assert derived[1] == int(np.random.SeedSequence([42, 1]).generate_state(1)[0])  # the documented derivation
    assert not set(derived) & set(seeds.derive(43, 20)[1:])  # base.seed + k would share 41 of them
    with pytest.raises(ValueError, match="at least 1"):
        seeds.derive(42, 0)


def test_the_kept_seed_is_best_on_validation_accuracy_then_loss_then_k():
    runs = [
        seeds.SeedRun(0, 42, 0.80, 0.50),
        seeds.SeedRun(1, 7, 0.85, 0.60),
        seeds.SeedRun(2, 8, 0.85, 0.40),
        seeds.SeedRun(3, 9, 0.85, 0.40),
    ]
    assert seeds.best(runs) == 2
    assert seeds.best([seeds.SeedRun(0, 1, None, None), seeds.SeedRun(1, 2, 0.1, 2.0)]) == 1
    assert seeds.best([seeds.SeedRun(0, 1, None, None), seeds.SeedRun(1, 2, None, None)]) == 0


def test_heads_declare_whether_they_are_deterministic():
    assert seeds.deterministic(heads.head_module("logistic"), LOGISTIC_OPTIONS)
    module = type(seeds)("fake_head")
    assert not seeds.deterministic(module, {})  # no declaration: stochastic, trained once per seed
    module.DETERMINISTIC = lambda options: options["finetune"] == []
    assert seeds.deterministic(module, {"finetune": []}) and not seeds.deterministic(module, {"finetune": "auto"})


# --- the loop on the logistic head (deterministic: trained once) -----------------------------------


def test_logistic_with_several_seeds_is_trained_once_and_says_so(tmp_path, caplog):
    train, val, test = blob_splits(3)
    single = train_head.train_head(
        head="logistic", train=train, val=val, seed=5, class_weight="none", options=LOGISTIC_OPTIONS
    )
    with caplog.at_level(logging.INFO):
        several = train_head.train_head(
            head="logistic", train=train, val=val, seed=5, class_weight="none", options=LOGISTIC_OPTIONS, seed_count=3
        )
    assert "logistic head is deterministic" in caplog.text and "trained once, not 3 times" in caplog.text
    assert several.metrics["seeds"]["trained"] == 1 and several.metrics["seeds"]["requested"] == 3
    assert "deterministic" in several.metrics["seeds"]["kept_because"] and several.other_seeds == {}
    assert {key: value for key, value in several.metrics.items() if key not in ("seeds", "seconds")} == {
        key: value for key, value in single.metrics.items() if key != "seconds"
    }
    train_head.save_result(several, tmp_path / "head")
    assert sorted(path.name for path in (tmp_path / "head").iterdir()) == [
        "head.json",
        "logistic.npz",
        "seeds.json",
        "standardizer.npz",
    ]
    record = seeds.read_record(tmp_path / "head")
    assert record == seeds.Record(requested=3, seeds=(5,), kept=0, kept_because=several.record.kept_because)
    head = heads.load_head(tmp_path / "head")
    result = evaluate.evaluate(head=head, val=val, test=test, gallery_images=2, seed_record=record)
    summary = result.metrics["seeds"]
    assert summary["count"] == 1 and summary["test_accuracy_std"] == 0.0
    assert summary["test_accuracy_mean"] == result.metrics["test"]["accuracy"]
    assert summary["ensemble"]["val_macro_f1"] == result.metrics["val"]["macro_f1"]


def test_one_seed_writes_what_it_wrote_before_seeds_existed(tmp_path):
    train, val, _ = blob_splits(3)
    result = train_head.train_head(
        head="logistic", train=train, val=val, seed=5, class_weight="none", options=LOGISTIC_OPTIONS, seed_count=1
    )
    assert "seeds" not in result.metrics and result.record is None
    train_head.save_result(result, tmp_path / "new")
    train_head.save_head(result.head, tmp_path / "old")
    for name in ("head.json", "logistic.npz", "standardizer.npz"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == [
        "head.json",
        "logistic.npz",
        "standardizer.npz",
    ]
    assert seeds.read_record(tmp_path / "new") is None


# --- evaluate's summary, on heads with known probabilities -----------------------------------------


@dataclass(frozen=True)
class Answers:
    """Fixed probabilities on val and test (told apart by the number of rows)."""

    description: base.HeadDescription
    val: np.ndarray
    test: np.ndarray

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self.test if len(rows) == len(self.test) else self.val


def test_mean_std_and_ensemble_across_seeds_are_hand_computable_scalars():
    test = features(LABELS)
    val = features(LABELS[:3], name="val")
    right = np.eye(3)[LABELS] * 0.9 + 0.1 / 3  # every row right
    wrong = np.roll(right, 1, axis=1)  # every row wrong
    kept_head = fixed_head(right)
    description = kept_head.description
    # test accuracies: kept 1, k=1 4/6 (PROBABILITIES), k=2 0; val: 1, 2/3, 0
    others = [(1, Answers(description, PROBABILITIES[:3], PROBABILITIES)), (2, Answers(description, wrong[:3], wrong))]
    record = seeds.Record(requested=3, seeds=(42, 1, 2), kept=0, kept_because=seeds.KEPT_BECAUSE)
    result = evaluate.evaluate(
        head=kept_head, val=val, test=test, gallery_images=2, seed_record=record, other_seeds=iter(others)
    )
    summary = result.metrics["seeds"]
    assert summary["requested"] == 3 and summary["count"] == 3 and summary["kept"] == 0
    assert summary["test_accuracy_mean"] == pytest.approx((1 + 4 / 6 + 0) / 3)
    assert summary["test_accuracy_std"] == pytest.approx(np.std([1, 4 / 6, 0], ddof=1))
    assert summary["val_accuracy_mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    f1s = [
        evaluate.classification_metrics(labels=LABELS, probabilities=p, class_names=CLASSES)["macro_f1"]
        for p in (right, PROBABILITIES, wrong)
    ]
    assert summary["test_macro_f1_mean"] == pytest.approx(np.mean(f1s))
    assert summary["test_macro_f1_std"] == pytest.approx(np.std(f1s, ddof=1))
    averaged = (right + PROBABILITIES + wrong) / 3
    assert summary["ensemble"]["test_accuracy"] == pytest.approx(np.mean(averaged.argmax(axis=1) == LABELS))
    flat = {key: value for key, value in summary.items() if key != "ensemble"} | summary["ensemble"]
    assert all(isinstance(value, int | float) and not isinstance(value, bool) for value in flat.values())
    assert result.metrics["test"]["accuracy"] == 1.0  # every other figure is the kept head's


def test_a_missing_seed_is_an_error_that_says_to_retrain(tmp_path):
    record = seeds.Record(requested=3, seeds=(1, 2, 3), kept=1, kept_because="")
    with pytest.raises(ValueError, match=r"seeds/0 not found.*re-run train_head"):
        list(seeds.other_heads(tmp_path, record, heads.load_head))
    (tmp_path / "seeds.json").write_text(json.dumps({"requested": 3, "seeds": [1, 2], "kept": 2}))
    with pytest.raises(ValueError, match="kept seed k=2 is not one of the 2 trained"):
        seeds.read_record(tmp_path)


def test_the_export_copies_the_kept_model_only(tmp_path):
    head = tmp_path / "head"
    (head / "seeds" / "1").mkdir(parents=True)
    for name in ("head.json", "head.keras", "seeds.json", "seeds/1/head.json"):
        (head / name).write_text("x")
    shutil.copytree(head, tmp_path / "export", ignore=seeds.not_exported(head))
    assert sorted(path.name for path in (tmp_path / "export").rglob("*")) == ["head.json", "head.keras"]


# --- a stochastic head (dense: imports TensorFlow) --------------------------------------------------


def _weights(folder: Path) -> list[np.ndarray]:
    return heads.load_head(folder).model.get_weights()


@pytest.mark.slow
def test_three_dense_seeds_give_three_models_and_a_rerun_gives_the_same_three(tmp_path):
    train, val, test = blob_splits(14, separation=0.5)
    options = {**DENSE_OPTIONS, "epochs": 4}

    def run(folder: Path, count: int) -> train_head.TrainingResult:
        steps: list[dict] = []
        result = train_head.train_head(
            head="dense",
            train=train,
            val=val,
            seed=7,
            class_weight="none",
            options=options,
            log_step=steps.append,
            seed_count=count,
        )
        train_head.save_result(result, folder)
        assert len(steps) == result.metrics["epochs_run"]  # the kept seed's curves, once
        return result

    first = run(tmp_path / "first", 3)
    record = first.record
    assert (
        record.trained == 3
        and record.seeds == tuple(seeds.derive(7, 3))
        and set(first.other_seeds)
        == {
            0,
            1,
            2,
        }
        - {record.kept}
    )
    report = first.metrics["seeds"]
    assert report["kept"] == record.kept and report["kept_seed"] == record.seeds[record.kept]
    assert report["val_accuracy"][record.kept] == max(report["val_accuracy"])
    folders = {k: tmp_path / "first" / "seeds" / str(k) for k in range(3)} | {record.kept: tmp_path / "first"}
    weights = {k: _weights(folder) for k, folder in folders.items()}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not np.array_equal(x, y) for x, y in zip(weights[a], weights[b])), f"seeds {a} and {b} are equal"

    # The same base.seed again: bitwise the same three models (deterministic ops, seeded Keras).
    second = run(tmp_path / "second", 3)
    assert second.record == record
    for k, folder in folders.items():
        again = Path(str(folder).replace("first", "second"))
        assert all(np.array_equal(x, y) for x, y in zip(weights[k], _weights(again)))

    # seeds=1 trains seed 0 of the three, the model trained before seeds existed.
    single = run(tmp_path / "single", 1)
    assert "seeds" not in single.metrics
    assert all(np.array_equal(x, y) for x, y in zip(weights[0], _weights(tmp_path / "single")))

    # evaluate: mean and std across the three, the kept model's own figures beside them.
    other = seeds.other_heads(tmp_path / "first", record, heads.load_head)
    kept = heads.load_head(tmp_path / "first")
    summary = evaluate.evaluate(
        head=kept, val=val, test=test, gallery_images=2, seed_record=record, other_seeds=other
    ).metrics["seeds"]
    accuracies = [
        base.accuracy_and_loss(heads.load_head(folders[k]).predict_proba(test.features), test.labels)["accuracy"]
        for k in range(3)
    ]
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["test_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))


# --- transferlab compare's leaderboard --------------------------------------------------------------


def _experiment(name: str, evaluation: dict) -> dict:
    metrics = {"metrics/evaluate.json": {"data": evaluation}, "metrics/train_head.json": {"data": {"seconds": 3.0}}}
    return {"name": name, "data": {"metrics": metrics}}


def test_the_leaderboard_shows_mean_and_std_where_several_seeds_were_trained():
    from transferlab.reports import compare

    single = {"test": {"accuracy": 0.91, "macro_f1": 0.9}, "val": {"accuracy": 0.89}}
    several = {
        "test": {"accuracy": 0.95, "macro_f1": 0.94},  # the kept seed's: the row shows the means instead
        "val": {"accuracy": 0.96},
        "seeds": {
            "count": 3,
            "test_accuracy_mean": 0.931,
            "test_accuracy_std": 0.0042,
            "test_macro_f1_mean": 0.925,
            "test_macro_f1_std": 0.005,
            "val_accuracy_mean": 0.94,
            "val_accuracy_std": 0.011,
        },
    }
    deterministic = {**single, "seeds": {"count": 1, "test_accuracy_mean": 0.91, "test_accuracy_std": 0.0}}
    revisions = [_experiment("cmp-a", single), _experiment("cmp-b", several), _experiment("cmp-c", deterministic)]
    exp_show = [{"experiments": [{"revs": revisions}]}]
    rows = compare.leaderboard_rows(exp_show, ["cmp-a", "cmp-b", "cmp-c"], lambda report: None)
    assert [row.experiment for row in rows] == ["cmp-b", "cmp-a", "cmp-c"]  # by the mean where there is one
    assert rows[0].seeds == 3 and rows[0].test_accuracy == 0.931 and rows[0].test_accuracy_std == 0.0042
    assert rows[2].seeds == 1 and rows[2].test_accuracy_std is None  # trained once: nothing to spread
    lines = compare.format_table(rows).splitlines()
    assert "seeds" in lines[0]
    assert lines[2].split()[2:6] == ["93.1\u00b10.4%", "92.5\u00b10.5%", "94.0\u00b11.1%", "3"]
    assert lines[3].split()[2:6] == ["91.0%", "90.0%", "89.0%", "1"]
