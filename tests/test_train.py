"""`corrosion-export train`: the AWS payload locally, early stopping, metrics, CSV reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from export.cli import main as export_main
from export.datasets import DatasetError
from export.synthetic import generate
from export.train import AWS_PAYLOAD, hyperparameters, read_csv, train
from tests.conftest import rust_pixels
from tests.test_datasets import scenes


def write_csv(path: Path, n: int, seed: int) -> Path:
    x, y = rust_pixels(n, seed)
    np.savetxt(path, np.column_stack((y, x)).astype(int), fmt="%d", delimiter=",")
    return path


@pytest.fixture
def csvs(tmp_path: Path) -> tuple[Path, Path]:
    return write_csv(tmp_path / "train.csv", 3000, 1), write_csv(tmp_path / "valid.csv", 1000, 2)


def metrics_of(path: Path) -> dict[str, object]:
    return dict(json.loads(path.read_text()))


def booster_config(model: Path) -> dict[str, object]:
    booster = xgb.Booster(model_file=str(model))
    return dict(json.loads(booster.save_config())["learner"])


def test_aws_payload_is_the_default_and_printed(
    tmp_path: Path, csvs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train_csv, valid_csv = csvs
    out = tmp_path / "m"
    assert (
        export_main(["train", str(train_csv), "--validation", str(valid_csv), "--out", str(out)])
        == 0
    )
    err = capsys.readouterr().err
    printed = next(line for line in err.splitlines() if line.startswith("hyperparameters: "))
    assert json.loads(printed.removeprefix("hyperparameters: ")) == AWS_PAYLOAD
    assert metrics_of(out / "model.metrics.json")["hyperparameters"] == AWS_PAYLOAD
    learner = booster_config(out / "model.json")
    assert learner["objective"]["name"] == "multi:softmax"  # type: ignore[index]
    assert learner["learner_model_param"]["num_class"] == "2"  # type: ignore[index]
    config = json.loads(train(*rust_pixels(500)).booster.save_config())  # the API's default too
    gbtree = config["learner"]["gradient_booster"]
    assert gbtree["gbtree_train_param"]["tree_method"] == "hist"
    for key in ("max_depth", "eta", "gamma", "min_child_weight", "subsample", "colsample_bytree"):
        assert float(gbtree["tree_train_param"][key]) == pytest.approx(AWS_PAYLOAD[key]), key


def test_early_stopping_keeps_the_best_round() -> None:
    x, y = rust_pixels(3000, 1)
    vx, vy = rust_pixels(1000, 2)
    params = {**AWS_PAYLOAD, "eta": 1.0, "max_depth": 6, "subsample": 1.0, "gamma": 0.0}
    # Inverted validation labels: every round fits train better and validation worse.
    trained = train(x, y, params, valid=(vx, 1 - vy), early_stopping=3)
    assert trained.best_iteration < 10
    assert trained.booster.num_boosted_rounds() == trained.best_iteration + 1
    full = train(x, y, {**params, "num_round": 12}, valid=(vx, vy))
    assert full.booster.num_boosted_rounds() == 12 and full.best_iteration == 11


def test_metrics_json_fields(
    tmp_path: Path, csvs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train_csv, valid_csv = csvs
    out = tmp_path / "m" / "rgb.ubj"
    args = ["train", str(train_csv), "--validation", str(valid_csv), "--out", str(out)]
    assert export_main(args) == 0
    assert "early stopping: best iteration" in capsys.readouterr().err
    record = metrics_of(out.with_name("rgb.ubj.metrics.json"))
    m = record["metrics"]
    assert isinstance(m, dict)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "auc", "tp", "fp", "fn", "tn"}
    assert all(isinstance(v, float) for v in m.values())  # the manifest's provenance wants floats
    assert m["accuracy"] > 0.9 and 0 < m["f1"] <= 1
    assert record["confusion_matrix"]["matrix"] == [  # type: ignore[index]
        [m["tn"], m["fp"]],
        [m["fn"], m["tp"]],
    ]
    assert sum(m[k] for k in ("tp", "fp", "fn", "tn")) == record["validation_rows"] == 1000
    assert record["evaluated_on"] == "validation" and record["early_stopping_rounds"] == 10
    assert isinstance(record["best_iteration"], int)
    assert record["boosted_rounds"] == record["best_iteration"] + 1
    sha = hashlib.sha256(train_csv.read_bytes()).hexdigest()
    assert record["training_data_sha256"] == sha and record["model"] == "rgb.ubj"
    with pytest.raises(ValueError):  # binary UBJ, as the suffix asked, not JSON
        json.loads(out.read_bytes())
    assert xgb.Booster(model_file=str(out)).num_boosted_rounds() == record["boosted_rounds"]


def test_dataset_directory_is_read_and_cited(tmp_path: Path) -> None:
    scenes(tmp_path / "m", 6)
    data = tmp_path / "data"
    assert export_main(["dataset", "--masks", str(tmp_path / "m"), "--out", str(data)]) == 0
    assert export_main(["train", str(data), "--out", str(tmp_path / "model")]) == 0
    record = metrics_of(tmp_path / "model" / "model.metrics.json")
    assert record["evaluated_on"] == "validation"
    digest = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    assert record["dataset_json_sha256"] == digest


def test_binary_logistic_gives_probabilities(
    tmp_path: Path, csvs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train_csv, valid_csv = csvs
    out = tmp_path / "m"
    args = ["train", str(train_csv), "--validation", str(valid_csv), "--out", str(out)]
    assert export_main([*args, "--objective", "binary:logistic"]) == 0
    record = metrics_of(out / "model.metrics.json")
    assert "num_class" not in record["hyperparameters"]  # type: ignore[operator]
    booster = xgb.Booster(model_file=str(out / "model.json"))
    score = booster.inplace_predict(rust_pixels(500, 3)[0])
    assert score.ndim == 1 and len(np.unique(score)) > 2 and 0 < score.min() < score.max() < 1
    assert record["metrics"]["auc"] > 0.8  # type: ignore[index]


def test_set_overrides_any_hyperparameter(
    tmp_path: Path, csvs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    sets = ["--set", "max_depth=2", "--set", "eta=0.5", "--set", "num_round=7"]
    assert export_main(["train", str(csvs[0]), "--out", str(out), *sets]) == 0
    record = metrics_of(out / "model.metrics.json")
    assert record["hyperparameters"] == {**AWS_PAYLOAD, "max_depth": 2, "eta": 0.5, "num_round": 7}
    assert record["evaluated_on"].startswith("train")  # type: ignore[attr-defined]
    assert xgb.Booster(model_file=str(out / "model.json")).num_boosted_rounds() == 7
    assert hyperparameters(overrides=["objective=binary:logistic"]).get("num_class") is None
    with pytest.raises(ValueError, match="key=value"):
        hyperparameters(overrides=["max_depth"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-round", "0"], "argument --num-round: must be at least 1, got 0"),
        (["--num-round", "-5"], "argument --num-round: must be at least 1, got -5"),
        (["--set", "num_round=-1"], "num_round must be a whole number of at least 1, not -1"),
        (["--set", "num_round=2.5"], "num_round must be a whole number of at least 1, not 2.5"),
        (["--early-stopping", "-1"], "argument --early-stopping: must be at least 0, got -1"),
    ],
)
def test_rounds_below_one_are_refused(
    tmp_path: Path,
    csvs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    """--num-round 0 used to train the default 100 and -5 a model with no trees."""
    try:
        code = export_main(["train", str(csvs[0]), "--out", str(tmp_path / "m"), *args])
    except SystemExit as exc:  # argparse's usage error
        code = int(str(exc.code))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model.pkl", "save the model as .json or .ubj"),
        ("model.bin", "save the model as .json or .ubj"),
        ("metrics.json", "a training record's name, not a model's"),
        ("model.metrics.json", "a training record's name, not a model's"),  # model.json's
    ],
)
def test_other_model_suffixes_and_record_names_are_refused(
    tmp_path: Path,
    csvs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    name: str,
    message: str,
) -> None:
    out = tmp_path / name
    assert export_main(["train", str(csvs[0]), "--out", str(out)]) == 2
    assert f"{out}: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,1,2,3\n7,1,2,3\n", "row 2 has class 7, expected 0 or 1"),
        ("0,1,2,3\n1,2,3,4\n0,1,x,3\n", "row 3 column 3 is not a number ('x')"),
        ("0,1,2,3\n1,2,3\n", "row 2 has 3 fields, row 1 has 4"),
        ("0,1,2,3\n1,2,,3\n", "row 2 column 3 is empty"),
        ("0,1,2,3\n\n1,2,3,4\n", "row 2 has 1 fields, row 1 has 4"),
        ("", "empty file"),
        ("0\n1\n", "expected rows of class,feature"),
        ("class,R,G,B\n0,1,2,3\n", "row 1 column 1 is not a number ('class'; a header? these"),
        ("0,1,2,3\n1,12,300,4\n", "row 2 column 3 is 300, not a colour value (an integer 0..255)"),
        ("0,1,2,3\n1,12,-1,4\n", "row 2 column 3 is -1, not a colour value"),
        ("0,1,2,3\n1,12,2.5,4\n", "row 2 column 3 is 2.5, not a colour value"),
    ],
)
def test_bad_csv_rows_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match="^" + str(path).replace(".", r"\.") + ": ") as info:
        read_csv(path)
    assert message in str(info.value)


def test_csv_parser_matches_loadtxt(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    # Four features: any numbers (three would be colours, which must be 0..255).
    table = np.column_stack((rng.integers(0, 2, 2000), rng.integers(0, 100000, (2000, 4))))
    path = tmp_path / "ints.csv"
    np.savetxt(path, table, fmt="%d", delimiter=",")
    x, y = read_csv(path)
    assert (
        x.dtype == np.float32 and np.array_equal(x, table[:, 1:]) and np.array_equal(y, table[:, 0])
    )
    path.write_bytes(b"1,0.5,-2,1e2,7\r\n0,3,4,5,6")  # decimals, signs, CRLF, no final newline
    x, y = read_csv(path)
    assert np.array_equal(x, [[0.5, -2, 100, 7], [3, 4, 5, 6]]) and y.tolist() == [1, 0]


@pytest.mark.parametrize(("label", "missing"), [(1, "no clean (0) rows"), (0, "no corroded (1)")])
def test_one_class_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: int, missing: str
) -> None:
    """A rust-only box job trained, scored itself perfect and was published."""
    data = tmp_path / "train.csv"
    data.write_text("".join(f"{label},{i},{i},{i}\n" for i in range(50)))
    assert export_main(["train", str(data), "--out", str(tmp_path / "m")]) == 2
    assert f"{data}: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["max_dept=4"], "would ignore 'max_dept' (did you mean 'max_depth'?)"),
        (
            ["etaa=0.1", "colsample_bytre=1"],
            "would ignore 'colsample_bytre' (did you mean 'colsample_bytree'?), 'etaa' (did you "
            "mean 'eta'?): unknown, or unused with objective 'multi:softmax'",
        ),
        (["num_class=3"], "num_class must be 2 (clean, corroded), not 3"),
    ],
)
def test_set_refuses_keys_xgboost_would_ignore_and_other_class_counts(
    tmp_path: Path,
    csvs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    sets: list[str],
    message: str,
) -> None:
    """A misspelt key trained with the default and was recorded in its metrics (and the
    manifest) as if it had been used; num_class=3 trained a model convert cannot serve."""
    args = [arg for pair in sets for arg in ("--set", pair)]
    assert export_main(["train", str(csvs[0]), "--out", str(tmp_path / "m"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert hyperparameters("binary:logistic", overrides=["scale_pos_weight=2"])  # used there
    with pytest.raises(ValueError, match="would ignore 'scale_pos_weight'"):
        hyperparameters(overrides=["scale_pos_weight=2"])  # not by multi:softmax


@pytest.mark.parametrize("present", [0, 1])
def test_one_class_validation_turns_early_stopping_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], present: int
) -> None:
    """Its metric stands still from round 0, so early stopping kept round 0 (AUC 0.5)."""
    train_csv = write_csv(tmp_path / "train.csv", 3000, 1)
    x, y = rust_pixels(1000, 2)
    valid = tmp_path / "valid.csv"
    np.savetxt(valid, np.column_stack((y, x))[y == present].astype(int), fmt="%d", delimiter=",")
    out = tmp_path / "m"
    args = ["train", str(train_csv), "--validation", str(valid), "--out", str(out)]
    assert export_main([*args, "--num-round", "30"]) == 0
    missing = ("clean (0)", "corroded (1)")[1 - present]
    warning = f"{valid}: no {missing} rows: early stopping is off and the metrics describe one "
    err = capsys.readouterr().err
    assert f"warning: {warning}" in err and "early stopping: best iteration" not in err
    record = metrics_of(out / "model.metrics.json")
    assert record["boosted_rounds"] == 30 and record["early_stopping_rounds"] is None
    assert [w.startswith(warning) for w in record["warnings"]] == [True]  # type: ignore[union-attr]


def test_synth_voc_scenes_make_a_dataset_that_trains(tmp_path: Path) -> None:
    """synth writes VOC XMLs without objects for its clean scenes; `dataset --voc` gave them
    no rows, so the dataset held rust only and `train` refused it."""
    generate(tmp_path / "s", 8, seed=2, width=64, height=48)
    data, model = tmp_path / "data", tmp_path / "model"
    args = ["dataset", "--voc", str(tmp_path / "s"), "--label", "rust=1", "--out", str(data)]
    assert export_main([*args, "--balance"]) == 0  # 3 % rust: unbalanced, it flags nothing
    assert export_main(["train", str(data), "--out", str(model)]) == 0
    record = metrics_of(model / "model.metrics.json")
    assert record["evaluated_on"] == "validation" and record["warnings"] == []


def test_a_model_that_tells_nothing_apart_is_said_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Labels that do not follow the colours (boxes drawn on the wrong photos, say) trained a
    model that calls every pixel clean; it was saved without a word, ready to convert."""
    rng = np.random.default_rng(5)

    def noise(path: Path, n: int) -> Path:
        rows = np.column_stack((rng.random(n) < 0.1, rng.integers(0, 256, (n, 3))))
        np.savetxt(path, rows.astype(int), fmt="%d", delimiter=",")
        return path

    out = tmp_path / "m" / "noise.json"
    args = ["train", str(noise(tmp_path / "t.csv", 2000)), "--out", str(out)]
    assert export_main([*args, "--validation", str(noise(tmp_path / "v.csv", 500))]) == 0
    message = "the model calls no validation pixel corroded (AUC 0."
    assert message in capsys.readouterr().err
    warned = metrics_of(out.with_name("noise.metrics.json"))["warnings"]
    assert isinstance(warned, list) and any(message in w for w in warned)
