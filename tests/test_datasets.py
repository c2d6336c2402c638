"""`corrosion-export dataset`: pixel rows from VOC boxes, crops, masks and negatives."""

from __future__ import annotations

import io
import json
import re
import shutil
import tracemalloc
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import pytest

from export import datasets
from export.cli import main as export_main
from export.datasets import Config, DatasetError, Item, Report, Rows, build, csv_bytes
from export.synthetic import generate, make_scene, write_scene

PURPLE, GREY, TEAL = (120, 40, 160), (128, 128, 128), (20, 150, 140)  # RGB


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def write_voc(
    path: Path, image: str, size: tuple[int, int], objects: list[tuple[str, int, int, int, int]]
) -> None:
    """labelImg-style XML; objects are (name, xmin, ymin, xmax, ymax)."""
    parts = [f"<annotation><filename>{image}</filename>"]
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, *box in objects:
        coords = "".join(
            f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        parts.append(f"<object><name>{name}</name><bndbox>{coords}</bndbox></object>")
    path.write_text("".join(parts) + "</annotation>")


def coordinate_image(w: int, h: int) -> np.ndarray:
    """R = x, G = y, B = 7: every row says which pixel it came from."""
    rgb = np.full((h, w, 3), 7, np.uint8)
    rgb[..., 0] = np.arange(w)[None, :]
    rgb[..., 1] = np.arange(h)[:, None]
    return rgb


def rows(path: Path) -> np.ndarray:
    if not path.stat().st_size:
        return np.empty((0, 4), np.int64)
    return np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)


def pixels(table: np.ndarray, label: int) -> set[tuple[int, ...]]:
    return {tuple(r) for r in table[table[:, 0] == label, 1:].tolist()}


def run(tmp_path: Path, **kwargs: object) -> tuple[Report, Path]:
    out = tmp_path / "out"
    kwargs.setdefault("validation_fraction", 0.0)
    return build(Config(**kwargs), out), out  # type: ignore[arg-type]


def scenes(directory: Path, count: int, w: int = 48, h: int = 32) -> list[Path]:
    rng = np.random.default_rng(11)
    return [
        write_scene(make_scene(rng, w, h, rust=i % 3 != 0), directory, f"s{i:02d}", fmt="png")
        for i in range(count)
    ]


def box_pixels(x0: int, y0: int, x1: int, y1: int) -> set[tuple[int, ...]]:
    return {(x, y, 7) for x in range(x0, x1) for y in range(y0, y1)}


def test_voc_middle_third_is_the_aws_crop_exactly(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    write_png(voc / "a.png", coordinate_image(40, 31))
    # Thirds of 32 x 25 are fractional: the AWS notebook truncates int(xmin + w/3) etc.
    write_voc(voc / "a.xml", "a.png", (40, 31), [("Corroded", 3, 2, 35, 27), ("Clean", 0, 0, 9, 9)])
    report, out = run(tmp_path, voc=(voc,))
    table = rows(out / "train.csv")
    assert pixels(table, 1) == box_pixels(13, 10, 24, 18)  # 11 x 8, not centred by rounding
    assert pixels(table, 0) == box_pixels(3, 3, 6, 6)
    assert len(table) == 88 + 9 and not report.skipped


def test_voc_standard_layout_pairs_annotations_with_jpegimages(tmp_path: Path) -> None:
    """Pascal VOC's own tree: Annotations/x.xml names x.jpg, which lives in JPEGImages/."""
    voc = tmp_path / "VOC2012"
    write_png(voc / "JPEGImages" / "a.png", coordinate_image(40, 31))
    write_png(voc / "JPEGImages" / "b.png", coordinate_image(40, 31))
    (voc / "Annotations").mkdir()
    write_voc(voc / "Annotations" / "a.xml", "a.png", (40, 31), [("Corroded", 3, 2, 35, 27)])
    write_voc(voc / "Annotations" / "b.xml", "", (40, 31), [("Clean", 0, 0, 9, 9)])  # by stem
    report, out = run(tmp_path, voc=(voc,))
    table = rows(out / "train.csv")
    assert pixels(table, 1) == box_pixels(13, 10, 24, 18)
    assert pixels(table, 0) == box_pixels(3, 3, 6, 6) and not report.skipped


def test_voc_whole_box_and_label_flags(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    write_png(voc / "a.png", coordinate_image(40, 31))
    write_voc(voc / "a.xml", "a.png", (40, 31), [("rust", 3, 2, 35, 27), ("paint", 0, 0, 2, 2)])
    labels = {"rust": 1}
    report, out = run(tmp_path, voc=(voc,), crop="whole", labels=labels, ignore={"paint"})
    table = rows(out / "train.csv")
    assert pixels(table, 1) == box_pixels(3, 2, 35, 27) and len(table) == 32 * 25
    assert report.ignored == {"paint": 1}  # counted, not silently dropped


def test_unknown_labels_fail_before_anything_is_written_naming_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were a warning after the CSVs were written, naming no file: a later `train`
    took the dataset without those boxes."""
    voc = tmp_path / "voc"
    for i in range(5):
        write_png(voc / f"{i}.png", coordinate_image(40, 31))
        write_voc(
            voc / f"{i}.xml", f"{i}.png", (40, 31), [("rust", 3, 2, 35, 27), ("paint", 0, 0, 2, 2)]
        )
    write_png(tmp_path / "crops" / "Rusty-1.png", np.full((2, 2, 3), TEAL, np.uint8))
    out = tmp_path / "o"
    args = ["dataset", "--voc", str(voc), "--crops", str(tmp_path / "crops"), "--out", str(out)]
    assert export_main([*args, "--label", "rust=1", "--label", "Clean=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown labels, nothing written (map with --label NAME=0|1 or ")
    assert (
        f"'Rusty' x1 in {tmp_path / 'crops' / 'Rusty-1.png'}, 'paint' x5 in {voc / '0.xml'}, "
        f"{voc / '1.xml'}, {voc / '2.xml'} and 2 more files\n"
    ) in err
    assert not out.exists()
    ignore = ["--ignore-label", "paint", "--ignore-label", "Rusty"]
    assert export_main([*args, "--label", "rust=1", *ignore, "--validation-fraction", "0"]) == 1
    record = json.loads((out / "dataset.json").read_text())
    assert record["ignored"] == {"paint": 5, "Rusty": 1}
    assert record["split_problems"] == [  # a dataset of rust only is still a problem
        "train split has no clean (0) rows: `train` refuses one-class data"
    ]


def test_clean_and_corroded_crops_by_file_name(tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    write_png(crops / "Clean-0.png", np.full((4, 5, 3), GREY, np.uint8))
    write_png(crops / "sub" / "Corroded-12.png", np.full((3, 3, 3), PURPLE, np.uint8))
    write_png(crops / "Rusty-2.png", np.full((2, 2, 3), TEAL, np.uint8))
    report, out = run(tmp_path, crops=(crops,), ignore={"Rusty"})
    table = rows(out / "train.csv")
    assert (table[:, 0] == 0).sum() == 20 and pixels(table, 0) == {GREY}
    assert (table[:, 0] == 1).sum() == 9 and pixels(table, 1) == {PURPLE}
    assert report.ignored == {"Rusty": 1}
    with pytest.raises(DatasetError, match=r"'Rusty' x1 in .*Rusty-2\.png$"):
        run(tmp_path, crops=(crops,))


def test_label_flags_add_to_the_aws_names_and_ignoring_one_drops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's own line (`--voc ... --label rust=1`) with `--crops` added refused the crops:
    any --label replaced Clean=0 Corroded=1."""
    voc, crops = tmp_path / "voc", tmp_path / "crops"
    for i in range(4):
        write_png(voc / f"{i}.png", coordinate_image(40, 31))
        write_voc(voc / f"{i}.xml", f"{i}.png", (40, 31), [("rust", 3, 2, 35, 27)])
        write_png(crops / f"Clean-{i}.png", np.full((4, 5, 3), GREY, np.uint8))
    write_png(crops / "Corroded-9.png", np.full((3, 3, 3), PURPLE, np.uint8))
    args = ["dataset", "--voc", str(voc), "--crops", str(crops), "--label", "rust=1"]
    args += ["--validation-fraction", "0"]  # too few photos to split; labels are the point
    assert export_main([*args, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert record["labels"] == {"Clean": 0, "Corroded": 1, "rust": 1}
    ignored = [*args, "--ignore-label", "Corroded", "--out", str(tmp_path / "b")]
    assert export_main(ignored) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "b" / "dataset.json").read_text())["ignored"] == {"Corroded": 1}


def test_masks_label_every_pixel(tmp_path: Path) -> None:
    scene = make_scene(np.random.default_rng(3), 40, 30)
    write_scene(scene, tmp_path / "m", "x", fmt="png")
    write_png(tmp_path / "m" / "orphan.png", np.zeros((5, 5, 3), np.uint8))
    report, out = run(tmp_path, masks=(tmp_path / "m",))
    table = rows(out / "train.csv")
    rgb = scene.image[..., ::-1].reshape(-1, 3)
    assert np.array_equal(table[:, 0], scene.mask.ravel())  # image order, every pixel
    assert np.array_equal(table[:, 1:], rgb)
    assert report.skipped == [f"{tmp_path / 'm' / 'orphan.png'}: no mask orphan.mask.png beside it"]


def test_mask_painted_on_a_transparent_layer_and_16_bit_masks(tmp_path: Path) -> None:
    """An editor's white-on-transparent export leaves white under its transparent pixels:
    it read as all corroded. A 16-bit mask's small values read as 0 in 8 bits."""
    write_png(tmp_path / "m" / "a.png", np.full((4, 6, 3), GREY, np.uint8))
    rgba = np.full((4, 6, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[1:3, 2:5, 3] = 255  # six painted pixels
    assert cv2.imwrite(str(tmp_path / "m" / "a.mask.png"), rgba)
    write_png(tmp_path / "m" / "b.png", np.full((2, 3, 3), TEAL, np.uint8))
    deep = np.zeros((2, 3), np.uint16)
    deep[0, 0] = 1
    assert cv2.imwrite(str(tmp_path / "m" / "b.mask.png"), deep)
    _, out = run(tmp_path, masks=(tmp_path / "m",))
    table = rows(out / "train.csv")
    assert (table[:, 0] == 1).sum() == 6 + 1 and len(table) == 24 + 6
    assert pixels(table, 1) == {GREY, TEAL}


def test_negatives_are_all_clean(tmp_path: Path) -> None:
    write_png(tmp_path / "neg" / "a.png", np.full((6, 7, 3), PURPLE, np.uint8))
    write_png(tmp_path / "neg" / "b.png", np.full((3, 4, 3), TEAL, np.uint8))
    _, out = run(tmp_path, negatives=(tmp_path / "neg",))
    table = rows(out / "train.csv")
    assert len(table) == 42 + 12 and not table[:, 0].any()
    assert pixels(table, 0) == {PURPLE, TEAL}


def test_outside_boxes_negatives(tmp_path: Path) -> None:
    rgb = np.full((60, 90, 3), GREY, np.uint8)
    rgb[10:40, 20:50] = PURPLE  # the rust box
    rgb[45:55, 60:80] = TEAL  # a box with an ignored label: not clean either
    write_png(tmp_path / "voc" / "a.png", rgb)
    boxes = [("rust", 20, 10, 50, 40), ("stain", 60, 45, 80, 55)]
    write_voc(tmp_path / "voc" / "a.xml", "a.png", (90, 60), boxes)
    config = {"voc": (tmp_path / "voc",), "labels": {"rust": 1}, "ignore": frozenset({"stain"})}
    _, out = run(tmp_path, crop="whole", outside_boxes_negatives=True, **config)
    table = rows(out / "train.csv")
    assert (table[:, 0] == 1).sum() == 900 and pixels(table, 1) == {PURPLE}
    outside = 90 * 60 - 900 - 200
    assert (table[:, 0] == 0).sum() == round(outside / 9) and pixels(table, 0) == {GREY}
    _, out = run(tmp_path, crop="whole", **config)
    assert not (rows(out / "train.csv")[:, 0] == 0).any()  # off by default


def sides(out: Path) -> dict[str, list[dict[str, object]]]:
    record = json.loads((out / "dataset.json").read_text())
    return {name: split["images"] for name, split in record["splits"].items()}


def test_split_is_by_image_with_groups_per_row(tmp_path: Path) -> None:
    scenes(tmp_path / "m", 20)
    _, out = run(tmp_path, masks=(tmp_path / "m",), validation_fraction=0.2)
    split = sides(out)
    train = {im["path"] for im in split["train"]}
    valid = {im["path"] for im in split["validation"]}
    assert len(valid) == 4 and len(train) == 16 and not train & valid
    for name, images in split.items():
        groups = np.loadtxt(out / f"{name}.groups", dtype=np.int64)
        expected = np.repeat([im["group"] for im in images], [im["rows"] for im in images])
        assert np.array_equal(groups, expected)
        assert len(groups) == len(rows(out / f"{name}.csv"))


def test_identical_images_stay_on_one_side(tmp_path: Path) -> None:
    paths = scenes(tmp_path / "m", 10)
    for p in paths[:5]:  # byte-identical copies under other names
        shutil.copy(p, p.with_name(f"copy-{p.name}"))
        shutil.copy(p.with_suffix(".mask.png"), p.with_name(f"copy-{p.stem}.mask.png"))
    for seed in range(6):
        _, out = run(tmp_path, masks=(tmp_path / "m",), validation_fraction=0.3, seed=seed)
        side_of: dict[str, set[str]] = {}
        group_of: dict[str, set[object]] = {}
        for name, images in sides(out).items():
            for im in images:
                side_of.setdefault(str(im["sha256"]), set()).add(name)
                group_of.setdefault(str(im["sha256"]), set()).add(im["group"])
        assert all(len(s) == 1 for s in side_of.values())
        assert all(len(g) == 1 for g in group_of.values()) and len(side_of) == 10


def crops_of(directory: Path, clean: int, corroded: int) -> None:
    """Tiny crops, each its own colour: distinct files, so distinct groups."""
    for label, n in (("Clean", clean), ("Corroded", corroded)):
        for i in range(n):
            colour = (i, 200 if label == "Clean" else 50, 7)
            write_png(directory / f"{label}-{i}.png", np.full((2, 2, 3), colour, np.uint8))


def test_the_split_is_stratified_so_validation_holds_both_classes(tmp_path: Path) -> None:
    """Drawn at random over all images, validation missed the 2 clean crops of 20 for most
    seeds; `train` then early-stopped on it at round 0 and `retrain` published that."""
    crops_of(tmp_path / "c", clean=2, corroded=18)
    for seed in range(8):
        report, out = run(tmp_path, crops=(tmp_path / "c",), validation_fraction=0.2, seed=seed)
        valid = sides(out)["validation"]
        names = sorted(Path(str(im["path"])).name.split("-")[0] for im in valid)
        assert names == ["Clean", "Corroded", "Corroded", "Corroded", "Corroded"], seed
        assert not report.split_problems, seed
    scenes(tmp_path / "m", 10)  # 4 clean (an empty mask), 6 rusty
    for seed in range(4):
        report, out = run(tmp_path, masks=(tmp_path / "m",), validation_fraction=0.1, seed=seed)
        assert sorted(im["counts"]["1"] > 0 for im in sides(out)["validation"]) == [False, True]
        assert not report.split_problems, seed


def test_a_split_without_a_class_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One clean image cannot be on both sides: it trains, and validation is rust only."""
    crops_of(tmp_path / "c", clean=1, corroded=4)
    out = tmp_path / "o"
    args = ["dataset", "--crops", str(tmp_path / "c"), "--out", str(out)]
    assert export_main([*args, "--validation-fraction", "0.25"]) == 1
    problem = (
        "validation split has no clean (0) rows: its metrics cannot tell the classes apart and "
        "`train` will not stop early on it; add images of that class (or try another --seed)"
    )
    assert f"warning: {problem}\n" in capsys.readouterr().err
    record = json.loads((out / "dataset.json").read_text())
    assert record["split_problems"] == [problem]
    train_images = [Path(im["path"]).name for im in record["splits"]["train"]["images"]]
    assert train_images[0] == "Clean-0.png"


def test_skipped_images_that_empty_validation_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The draw happens before images are read: a corrupt one drawn for validation left it
    empty, and `train` quietly scored the model on its own training data."""
    crops_of(tmp_path / "c", clean=2, corroded=2)
    for name in ("Clean-1.png", "Corroded-1.png"):  # cut short, each its own bytes
        data = (tmp_path / "c" / name).read_bytes()
        (tmp_path / "c" / name).write_bytes(data[: len(data) // 2] + name.encode())
    emptied = 0
    for seed in range(16):
        report, out = run(tmp_path, crops=(tmp_path / "c",), validation_fraction=0.5, seed=seed)
        assert len(report.skipped) == 2
        if not sides(out)["validation"]:
            emptied += 1
            assert report.split_problems == [
                "validation split is empty: none of the 2 images drawn for it gave rows "
                "(see the skipped ones)"
            ]
    assert emptied, "no seed drew both corrupt crops for validation"


def test_voc_without_objects_is_a_checked_clean_photo(tmp_path: Path) -> None:
    """labelImg saves no object for a photo without rust, as `synth` does for a clean
    scene: it gave no rows, where `retrain` takes such an answer as every pixel clean."""
    voc = tmp_path / "voc"
    write_png(voc / "a.png", coordinate_image(40, 31))
    write_voc(voc / "a.xml", "a.png", (40, 31), [])
    report, out = run(tmp_path, voc=(voc,), labels={"rust": 1})
    table = rows(out / "train.csv")
    assert len(table) == 40 * 31 and not table[:, 0].any()
    [image] = sides(out)["train"]
    assert image["kind"] == "negative" and image["annotation"] == str(voc / "a.xml")
    assert not report.skipped


def test_synthetic_clean_scenes_are_clean_rows(tmp_path: Path) -> None:
    generate(tmp_path / "s", 8, seed=3, width=48, height=32)
    report, out = run(tmp_path, voc=(tmp_path / "s",), labels={"rust": 1}, validation_fraction=0.25)
    assert not report.split_problems and not report.skipped
    for split in json.loads((out / "dataset.json").read_text())["splits"].values():
        assert int(split["counts"]["0"]) > 0 and int(split["counts"]["1"]) > 0


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    scenes(tmp_path / "m", 8)
    kwargs = {"masks": (tmp_path / "m",), "validation_fraction": 0.25, "max_pixels_per_image": 300}
    outs = [build(Config(seed=s, **kwargs), tmp_path / f"o{i}") for i, s in enumerate((5, 5, 6))]
    assert all(not r.skipped for r in outs)
    names = ["train.csv", "validation.csv", "train.groups", "validation.groups", "dataset.json"]
    for name in names:
        assert (tmp_path / "o0" / name).read_bytes() == (tmp_path / "o1" / name).read_bytes()
    assert (tmp_path / "o0/train.csv").read_bytes() != (tmp_path / "o2/train.csv").read_bytes()


def test_pixel_cap_and_balance(tmp_path: Path) -> None:
    scenes(tmp_path / "m", 9)
    _, out = run(
        tmp_path, masks=(tmp_path / "m",), validation_fraction=0.3, max_pixels_per_image=200
    )
    assert all(im["rows"] == 200 for images in sides(out).values() for im in images)
    _, out = run(
        tmp_path,
        masks=(tmp_path / "m",),
        validation_fraction=0.3,
        max_pixels_per_image=200,
        balance=True,
    )
    record = json.loads((out / "dataset.json").read_text())
    for name, split in record["splits"].items():
        table = rows(out / split["csv"])
        n0, n1 = int((table[:, 0] == 0).sum()), int((table[:, 0] == 1).sum())
        assert n0 == n1 > 0 and split["counts"] == {"0": n0, "1": n1}, name


def test_csv_format_is_label_first_integers_without_header() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500).astype(np.uint8)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    rgb[0] = (0, 255, 100)
    data = csv_bytes(labels, rgb)
    assert all(re.fullmatch(r"[01](,\d{1,3}){3}", line) for line in data.decode().splitlines())
    buf = io.BytesIO()
    np.savetxt(buf, np.column_stack((labels, rgb)), fmt="%d", delimiter=",")
    assert data == buf.getvalue()


def test_bad_inputs_are_named_skipped_and_the_rest_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = tmp_path / "voc"
    for stem in ("good", "onebad", "corrupt"):
        write_png(voc / f"{stem}.png", coordinate_image(40, 31))
    write_voc(voc / "good.xml", "good.png", (40, 31), [("rust", 0, 0, 9, 9)])
    write_voc(
        voc / "onebad.xml", "onebad.png", (40, 31), [("rust", 30, 0, 41, 9), ("rust", 0, 0, 3, 3)]
    )
    write_voc(voc / "corrupt.xml", "corrupt.png", (40, 31), [("rust", 0, 0, 9, 9)])
    data = (voc / "corrupt.png").read_bytes()
    (voc / "corrupt.png").write_bytes(data[: len(data) // 2])
    (voc / "broken.xml").write_text("<annotation><object><name>rust</name></annot")
    out = tmp_path / "out"
    code = export_main(["dataset", "--voc", str(voc), "--label", "rust=1", "--out", str(out),
                        "--validation-fraction", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"{voc / 'broken.xml'}: not valid XML" in err
    assert f"{voc / 'onebad.xml'}: box 0 'rust' (30, 0, 41, 9) lies outside the 40x31 image" in err
    assert f"{voc / 'corrupt.png'}: corrupt or truncated" in err
    record = json.loads((out / "dataset.json").read_text())
    assert len(record["skipped"]) == 3
    table = rows(out / "train.csv")
    assert pixels(table, 1) == box_pixels(3, 3, 6, 6) | box_pixels(1, 1, 2, 2)
    assert [Path(str(im["path"])).name for im in sides(out)["train"]] == ["good.png", "onebad.png"]


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["dataset", "--out", str(tmp_path)]) == 2
    assert "no sources" in capsys.readouterr().err
    assert (
        export_main(["dataset", "--negatives", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    )
    assert "not a directory" in capsys.readouterr().err


def test_large_images_are_written_in_chunks_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenes(tmp_path / "m", 3)
    _, out = run(tmp_path, masks=(tmp_path / "m",))
    whole = (out / "train.csv").read_bytes()
    monkeypatch.setattr("export.datasets._CHUNK", 7)
    _, out = run(tmp_path, masks=(tmp_path / "m",))
    assert (out / "train.csv").read_bytes() == whole


def test_a_bad_seed_is_a_usage_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    """numpy's own words were `expected non-negative integer`, naming no option."""
    with pytest.raises(SystemExit) as info:
        export_main(["dataset", "--negatives", ".", "--seed", "-1", "--out", "x"])
    assert info.value.code == 2
    assert "argument --seed: must be at least 0, got -1" in capsys.readouterr().err


def test_balance_draws_beyond_a_billion_pixels() -> None:
    """numpy's exact draw refuses 1e9 rows in all (about ninety masked 12 MP photos)."""
    rng = np.random.default_rng(0)
    small = datasets._spread(np.array([30, 10, 0, 60]), 50, rng)
    assert small.sum() == 50 and (small <= [30, 10, 0, 60]).all()
    counts = np.array([600_000_000, 400_000_000, 7, 0])
    kept = datasets._spread(counts, 1_000_001, rng)
    assert kept.sum() == 1_000_001 and (kept <= counts).all()
    assert abs(kept[0] - 600_000) <= 1 and abs(kept[1] - 400_000) <= 1 and kept[3] == 0


def test_the_groups_file_is_written_in_chunks_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The groups text of a whole image was built at once: 600 MB for a 100 MP photo."""
    monkeypatch.setattr(datasets, "_CHUNK", 1 << 16)
    n = 4_000_000
    rows = Rows(np.zeros(n, np.uint8), np.zeros((n, 3), np.uint8))
    with ExitStack() as stack:
        writer = datasets._SplitWriter(stack, tmp_path, "train")
        tracemalloc.start()
        writer.write(Item("negative", tmp_path / "x.png", "0" * 64), 12345, rows)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB for {n} rows"
    assert (tmp_path / "train.groups").read_bytes() == b"12345\n" * n
