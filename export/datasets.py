"""Pixel datasets: label-first `class,R,G,B` rows from labelled images, split by image.

Sources: Pascal VOC boxes (middle-third or whole-box crops, as the AWS solution does), crops
named `Clean-*.png` / `Corroded-*.png`, images with a `<stem>.mask.png` beside them (nonzero =
corroded, what `export.synthetic` writes; with an alpha channel, transparent = clean) and
whole photos without corrosion (a VOC annotation without objects is one too: a labeller
checked the photo and boxed nothing). Unlike the AWS notebook, which shuffles pixels into
train and validation, whole images (and byte-identical copies of them) go to one side, so
validation measures photos the model has never seen; the draw is stratified by what each
image is known to hold before it is read, so validation does not miss a class by chance.
Labels that are neither mapped nor ignored stop the run before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import cv2
import numpy as np
import numpy.typing as npt

from agent.imageio import ImageError, read
from export.voc import IMAGE_SUFFIXES, Annotation, VocError, box_problem, middle_third, parse

U8 = npt.NDArray[np.uint8]
Kind = Literal["voc", "crop", "mask", "negative"]
DEFAULT_LABELS: Mapping[str, int] = {"Clean": 0, "Corroded": 1}
MASK_SUFFIX = ".mask.png"
SPLITS = ("train", "validation")
CLASS_NAMES = ("clean", "corroded")  # by class number
_FEW = 3  # files named per unknown label
# Outside-box pixels are sampled at the middle third's density (1/9): neighbours are
# near-duplicates, and a full outside region would swamp the boxes of the same image.
OUTSIDE_FRACTION = 1.0 / 9.0
_CHUNK = 1 << 20  # rows formatted at a time: bounds memory on 100-megapixel photos


class DatasetError(ValueError):
    """Input that cannot become training rows; the message names the file (and row or box)."""


@dataclass(frozen=True)
class Config:
    voc: tuple[Path, ...] = ()
    crops: tuple[Path, ...] = ()
    masks: tuple[Path, ...] = ()
    negatives: tuple[Path, ...] = ()
    labels: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    ignore: frozenset[str] = frozenset()
    crop: Literal["middle", "whole"] = "middle"
    outside_boxes_negatives: bool = False
    validation_fraction: float = 0.2
    max_pixels_per_image: int | None = None
    balance: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Item:
    """One image that yields rows; `label` is the class of every pixel of a crop or negative."""

    kind: Kind
    image: Path
    sha256: str
    label: int = 0
    mask: Path | None = None
    annotation: Annotation | None = None


@dataclass
class Rows:
    labels: U8
    rgb: U8  # N x 3
    problems: list[str] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)


def _warn(message: str, into: list[str]) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
    into.append(message)


@dataclass
class Report:
    """What `build` did: every skipped input, per-split counts, and the splits that lack a
    class (or rows): a dataset `train` would stop early on, or refuse, for lack of them."""

    skipped: list[str] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    split_problems: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        _warn(message, self.skipped)

    def add(self, rows: Rows) -> None:
        for problem in rows.problems:
            self.skip(problem)
        self.ignored.update(rows.ignored)


def sample_mask_pixels(
    image_bgr: np.ndarray, mask: np.ndarray, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_class` RGB rows of each class from one image (mask: nonzero = corroded).

    Sampling per image and per class keeps one large rust patch from drowning the clean
    surfaces (and the hard-negative paint) the model must learn to leave alone.
    """
    rgb = image_bgr[..., ::-1].reshape(-1, 3)
    flat = mask.reshape(-1) > 0
    xs, ys = [], []
    for label, where in ((1, np.flatnonzero(flat)), (0, np.flatnonzero(~flat))):
        if len(where) == 0:
            continue
        pick = rng.choice(where, size=min(per_class, len(where)), replace=False)
        xs.append(rgb[pick])
        ys.append(np.full(len(pick), label, dtype=np.int64))
    if not xs:
        return np.empty((0, 3), np.float32), np.empty(0, np.int64)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _lut(end: str) -> U8:
    """Text of 0..255 followed by `end`, NUL-padded to 4 bytes: rows are formatted by lookup."""
    table = np.zeros((256, 4), np.uint8)
    for v in range(256):
        text = f"{v}{end}".encode()
        table[v, : len(text)] = np.frombuffer(text, np.uint8)
    return table


_FIELD, _LAST = _lut(","), _lut("\n")


def csv_bytes(labels: U8, rgb: U8) -> bytes:
    """`class,R,G,B` lines, vectorised: ~50x faster than np.savetxt, and byte-for-byte stable."""
    cells = np.concatenate(
        (_FIELD[labels], _FIELD[rgb[:, 0]], _FIELD[rgb[:, 1]], _LAST[rgb[:, 2]]), axis=1
    ).ravel()
    data: bytes = cells[cells != 0].tobytes()
    return data


def _images(directory: Path) -> list[Path]:
    """Image files under `directory`, recursively and sorted; masks are not photos."""
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX) and p.is_file()
    )


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def discover(config: Config, report: Report) -> list[Item]:
    """Every usable image of every source, in a stable order; bad files are reported.

    Labels are known from file names and XML alone, so one neither mapped nor ignored fails
    here, before a row is written: a dataset without its boxes would train a model that
    calls that kind of rust (or paint) whatever the rest taught it.
    """
    items: list[Item] = []
    unknown: dict[str, list[Path]] = {}  # label -> the file of each occurrence

    def note(name: str, where: Path) -> None:
        if name not in config.labels and name not in config.ignore:
            unknown.setdefault(name, []).append(where)

    def add(kind: Kind, image: Path, **extra: Any) -> None:
        try:
            items.append(Item(kind, image, _sha256(image), **extra))
        except DatasetError as exc:
            report.skip(str(exc))

    for directory in config.voc:
        if not directory.is_dir():
            raise DatasetError(f"{directory}: not a directory")
        for xml in sorted(directory.rglob("*.xml")):
            try:
                annotation = parse(xml)
            except VocError as exc:
                report.skip(str(exc))
                continue
            for obj in annotation.objects:
                note(obj.name, xml)
            # A labeller who saved no box checked the photo and found no rust: every pixel
            # is clean, as `retrain` reads a Ground Truth answer without boxes.
            add(
                "voc" if annotation.objects else "negative", annotation.image, annotation=annotation
            )
    for directory in config.crops:
        for image in _images(directory):
            name = image.name.split(".")[0].split("-")[0]  # the AWS notebook's rule
            note(name, image)
            if name in config.labels:
                add("crop", image, label=config.labels[name])
            elif name in config.ignore:
                report.ignored[name] += 1
    for directory in config.masks:
        for image in _images(directory):
            mask = image.with_name(image.stem + MASK_SUFFIX)
            if mask.is_file():
                add("mask", image, mask=mask)
            else:
                report.skip(f"{image}: no mask {mask.name} beside it")
    for directory in config.negatives:
        for image in _images(directory):
            add("negative", image, label=0)
    if unknown:
        raise DatasetError(
            "unknown labels, nothing written (map with --label NAME=0|1 or drop with "
            "--ignore-label NAME): "
            + ", ".join(
                f"{name!r} x{len(where)} in {_few(where)}"
                for name, where in sorted(unknown.items())
            )
        )
    return items


def _few(paths: list[Path]) -> str:
    files = list(dict.fromkeys(paths))
    return ", ".join(map(str, files[:_FEW])) + (
        f" and {len(files) - _FEW} more files" if len(files) > _FEW else ""
    )


def stratum(item: Item, config: Config) -> str:
    """The classes an image gives rows of, known before the image is read: what the split is
    stratified by. A name, a label or an XML tells; a mask is decoded for it (a fraction of
    the photo's cost; a Ground Truth answer of "no rust here" is an all-clean mask)."""
    if item.kind == "voc":
        assert item.annotation is not None
        objects = item.annotation.objects
        classes = {config.labels[o.name] for o in objects if o.name in config.labels}
        if config.outside_boxes_negatives:
            classes.add(0)
    elif item.kind == "mask":
        assert item.mask is not None
        try:
            corroded = mask_labels(item.mask)
        except ImageError:
            return "unreadable"  # skipped, and said so, when its rows are cut
        classes = {c for c, present in ((0, not corroded.all()), (1, corroded.any())) if present}
    else:
        classes = {item.label}
    return "+".join(map(str, sorted(classes))) or "none"


def validation_groups(images: Sequence[tuple[str, str]], fraction: float, seed: int) -> set[str]:
    """The groups of identical images drawn for validation; `images` holds each image's
    (sha256, stratum). Each stratum is drawn on its own, whole groups at random until
    `fraction` of its images are in, at least one group each side of a stratum that has two:
    one random draw over everything could leave validation without a class (then `train`
    early-stopped on it at round 0). A group found in several strata is a stratum of its own."""
    if fraction <= 0:
        return set()
    counts = Counter(sha for sha, _ in images)
    strata_of: dict[str, set[str]] = {}
    for sha, name in images:
        strata_of.setdefault(sha, set()).add(name)
    members: dict[str, list[str]] = {}
    for sha in sorted(counts):
        members.setdefault("|".join(sorted(strata_of[sha])), []).append(sha)
    chosen: set[str] = set()
    for name, groups in members.items():
        target = max(1, round(fraction * sum(counts[g] for g in groups)))
        taken = 0
        rng = np.random.default_rng([seed, 3, zlib.crc32(name.encode())])
        for i in rng.permutation(len(groups))[:-1]:
            if taken >= target:
                break
            chosen.add(groups[i])
            taken += counts[groups[i]]
    return chosen


def split_problems(
    splits: Mapping[str, Mapping[str, Any]], drawn: Counter[str], fraction: float
) -> list[str]:
    """Why a split cannot do its job: train needs both classes; validation (unless the
    fraction is 0) needs both to be scored and early-stopped on. `drawn` counts the images
    drawn for each split, some of which may have been skipped since."""
    problems = []
    for name, split in splits.items():
        if name == "validation" and fraction == 0:
            continue
        counts = [int(split["counts"][c]) for c in ("0", "1")]
        if not sum(counts):
            why = (
                f"none of the {drawn[name]} images drawn for it gave rows (see the skipped ones)"
                if drawn[name]
                else "no image was drawn for it"
                + (" (no kind of image has two to share)" if name == "validation" else "")
            )
            problems.append(f"{name} split is empty: {why}")
            continue
        for c, n in enumerate(counts):
            if n:
                continue
            effect = (
                "`train` refuses one-class data"
                if name == "train"
                else "its metrics cannot tell the classes apart and `train` will not stop early "
                "on it; add images of that class (or try another --seed)"
            )
            problems.append(f"{name} split has no {CLASS_NAMES[c]} ({c}) rows: {effect}")
    return problems


def _voc_rows(item: Item, rgb: U8, config: Config, rng: np.random.Generator) -> Rows:
    ann = item.annotation
    assert ann is not None
    h, w = rgb.shape[:2]
    if ann.size is not None and ann.size != (w, h):
        raise DatasetError(
            f"{ann.xml}: <size> {ann.size[0]}x{ann.size[1]} but {item.image.name} decodes to "
            f"{w}x{h} (EXIF rotation?); image skipped"
        )
    rows = Rows(np.empty(0, np.uint8), np.empty((0, 3), np.uint8))
    covered = np.zeros((h, w), bool)
    labels, pixels = [], []
    for i, obj in enumerate(ann.objects):
        xmin, ymin, xmax, ymax = (max(0, c) for c in obj.box)
        covered[ymin:ymax, xmin:xmax] = True  # even a bad box's pixels are not "clean"
        problem = box_problem(obj.box, w, h)
        if problem:
            rows.problems.append(f"{ann.xml}: box {i} {obj.name!r} {obj.box} {problem}; skipped")
        elif obj.name not in config.labels:  # discover refused the unknown ones
            rows.ignored[obj.name] += 1
        else:
            x0, y0, x1, y1 = middle_third(obj.box) if config.crop == "middle" else obj.box
            crop = rgb[y0:y1, x0:x1].reshape(-1, 3)
            pixels.append(crop)
            labels.append(np.full(len(crop), config.labels[obj.name], np.uint8))
    if config.outside_boxes_negatives:
        outside = np.flatnonzero(~covered.ravel())
        pick = rng.choice(outside, round(len(outside) * OUTSIDE_FRACTION), replace=False)
        pixels.append(rgb.reshape(-1, 3)[np.sort(pick)])
        labels.append(np.zeros(len(pick), np.uint8))
    if pixels:
        rows.labels, rows.rgb = np.concatenate(labels), np.concatenate(pixels)
    return rows


def mask_labels(path: Path) -> npt.NDArray[np.bool_]:
    """Corroded where the mask is nonzero. A mask painted on a transparent layer (white on
    transparent, the usual export of an editor) is corroded only where it is opaque: the
    colour under transparent pixels is whatever the editor left there, often white."""
    decoded = read(path)  # size, bomb and corruption checks, and the errors that name it
    raw = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)  # alpha, 16 bits
    if raw is None or raw.shape[:2] != decoded.image.shape[:2]:  # turned by EXIF: as decoded
        return np.asarray(decoded.image.any(axis=2))
    if raw.ndim == 2:
        return np.asarray(raw > 0)
    mask = raw[..., :3].any(axis=2)
    if raw.shape[2] == 4:
        mask &= raw[..., 3] > 0
    return np.asarray(mask)


def image_rows(item: Item, config: Config, rng: np.random.Generator) -> Rows:
    """All rows of one image (after the per-image cap); the same rng gives the same rows."""
    try:
        rgb = np.ascontiguousarray(read(item.image).image[..., ::-1])
        if item.kind == "voc":
            rows = _voc_rows(item, rgb, config, rng)
        elif item.kind == "mask":
            assert item.mask is not None
            corroded = mask_labels(item.mask)
            if corroded.shape != rgb.shape[:2]:
                raise DatasetError(
                    f"{item.mask}: mask is {corroded.shape[1]}x{corroded.shape[0]}, "
                    f"image {rgb.shape[1]}x{rgb.shape[0]}; image skipped"
                )
            rows = Rows(corroded.ravel().astype(np.uint8), rgb.reshape(-1, 3))
        else:
            rows = Rows(
                np.full(rgb.shape[0] * rgb.shape[1], item.label, np.uint8), rgb.reshape(-1, 3)
            )
    except ImageError as exc:
        raise DatasetError(f"{exc}; image skipped") from None
    cap = config.max_pixels_per_image
    if cap is not None and len(rows.labels) > cap:
        pick = np.sort(rng.choice(len(rows.labels), cap, replace=False))
        rows.labels, rows.rgb = rows.labels[pick], rows.rgb[pick]
    return rows


def _rng(config: Config, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream, index])


def _balance_quotas(
    items: list[Item], sides: list[str], config: Config
) -> dict[int, tuple[int, int]]:
    """First pass: count classes per image, then spread the minority count of each split over
    its images' majority-class rows at random. Maps image index -> (class to cut, rows kept)."""
    counts = np.zeros((len(items), 2), np.int64)
    for i, item in enumerate(items):
        try:
            labels = image_rows(item, config, _rng(config, 0, i)).labels
        except DatasetError:
            continue  # reported by the writing pass
        counts[i] = np.bincount(labels, minlength=2)[:2]
    quotas: dict[int, tuple[int, int]] = {}
    for side in SPLITS:
        where = [i for i, s in enumerate(sides) if s == side]
        total = counts[where].sum(axis=0)
        if total.min() == 0:
            if total.max() > 0:
                print(f"warning: --balance: {side} has one class only", file=sys.stderr)
            continue
        major = int(total.argmax())
        rng = np.random.default_rng([config.seed, 2, SPLITS.index(side)])
        kept = _spread(counts[where, major], int(total.min()), rng)
        quotas.update({i: (major, int(k)) for i, k in zip(where, kept, strict=True)})
    return quotas


def _spread(counts: np.ndarray, sample: int, rng: np.random.Generator) -> np.ndarray:
    """How many of `sample` rows drawn at random without replacement come from each image.

    numpy's exact draw needs fewer than 1e9 rows in all; above that (about ninety masked
    12-megapixel photos), each image gets its proportional share, the remainder going to
    images at random by their fractional parts: the same expectation, within one row.
    """
    if counts.sum() < 1_000_000_000:
        return rng.multivariate_hypergeometric(counts, sample)
    share = counts * (sample / counts.sum())
    kept: np.ndarray = np.minimum(np.floor(share).astype(np.int64), counts)
    short = sample - int(kept.sum())
    fraction = share - kept
    if short > 0:
        lucky = rng.choice(len(counts), short, replace=False, p=fraction / fraction.sum())
        kept[lucky] += 1
    return kept


class _SplitWriter:
    """Streams one split's CSV and groups file, hashing the CSV as it goes."""

    def __init__(self, stack: ExitStack, out: Path, name: str) -> None:
        self.name = name
        self.csv: BinaryIO = stack.enter_context((out / f"{name}.csv").open("wb"))
        self.groups: BinaryIO = stack.enter_context((out / f"{name}.groups").open("wb"))
        self.digest = hashlib.sha256()
        self.counts = [0, 0]
        self.images: list[dict[str, Any]] = []

    def write(self, item: Item, group: int, rows: Rows) -> None:
        line = f"{group}\n".encode()
        for start in range(0, len(rows.labels), _CHUNK):  # text is 16 B/row before packing
            chunk = rows.labels[start : start + _CHUNK]
            data = csv_bytes(chunk, rows.rgb[start : start + _CHUNK])
            self.csv.write(data)
            self.digest.update(data)
            self.groups.write(line * len(chunk))
        n1 = int(np.count_nonzero(rows.labels))  # labels are 0 or 1; bincount would copy
        n0 = len(rows.labels) - n1
        self.counts = [self.counts[0] + n0, self.counts[1] + n1]
        record: dict[str, Any] = {"path": str(item.image), "kind": item.kind}
        if item.annotation is not None:
            record["annotation"] = str(item.annotation.xml)
        if item.mask is not None:
            record["mask"] = str(item.mask)
        record.update(sha256=item.sha256, group=group, rows=n0 + n1, counts={"0": n0, "1": n1})
        self.images.append(record)

    def summary(self) -> dict[str, Any]:
        return {
            "csv": f"{self.name}.csv",
            "groups": f"{self.name}.groups",
            "sha256": self.digest.hexdigest(),
            "rows": sum(self.counts),
            "counts": {"0": self.counts[0], "1": self.counts[1]},
            "images": self.images,
        }


def build(config: Config, out: Path) -> Report:
    """Write out/{train,validation}.csv, .groups and dataset.json; see Report for problems."""
    if not 0.0 <= config.validation_fraction < 1.0:
        raise DatasetError(
            f"validation fraction must be in [0, 1), not {config.validation_fraction}"
        )
    if config.max_pixels_per_image is not None and config.max_pixels_per_image < 1:
        raise DatasetError("--max-pixels-per-image must be at least 1")
    if set(config.labels.values()) - {0, 1} or set(config.labels) & config.ignore:
        raise DatasetError(f"labels must map to 0 or 1 and not be ignored: {dict(config.labels)}")
    report = Report()
    items = discover(config, report)
    valid = validation_groups(
        [(it.sha256, stratum(it, config)) for it in items], config.validation_fraction, config.seed
    )
    sides = ["validation" if it.sha256 in valid else "train" for it in items]
    quotas = _balance_quotas(items, sides, config) if config.balance else {}
    group_of: dict[str, int] = {}
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        writers = {name: _SplitWriter(stack, out, name) for name in SPLITS}
        for i, (item, side) in enumerate(zip(items, sides, strict=True)):
            try:
                rows = image_rows(item, config, _rng(config, 0, i))
            except DatasetError as exc:
                report.skip(str(exc))
                continue
            report.add(rows)
            if i in quotas:
                major, kept = quotas[i]
                keep = rows.labels != major
                where = np.flatnonzero(~keep)
                keep[_rng(config, 1, i).choice(where, kept, replace=False)] = True
                rows.labels, rows.rgb = rows.labels[keep], rows.rgb[keep]
            writers[side].write(item, group_of.setdefault(item.sha256, len(group_of)), rows)
    report.splits = {name: w.summary() for name, w in writers.items()}
    for problem in split_problems(report.splits, Counter(sides), config.validation_fraction):
        _warn(problem, report.split_problems)
    _write_manifest(config, out, report)
    return report


def _write_manifest(config: Config, out: Path, report: Report) -> None:
    """dataset.json: enough to cite exactly what a model saw and to redo the split."""
    record = {
        "format": "class,R,G,B per row, no header, label first; 0 = clean, 1 = corroded",
        "groups": "<split>.groups: per CSV row, the group of its image (identical files share one)",
        "sources": {
            kind: [str(p) for p in getattr(config, kind)]
            for kind in ("voc", "crops", "masks", "negatives")
            if getattr(config, kind)
        },
        "labels": dict(config.labels),
        "ignored_labels": sorted(config.ignore),
        "crop": config.crop,
        "outside_boxes_negatives": config.outside_boxes_negatives,
        "outside_fraction": OUTSIDE_FRACTION if config.outside_boxes_negatives else None,
        "validation_fraction": config.validation_fraction,
        "max_pixels_per_image": config.max_pixels_per_image,
        "balance": config.balance,
        "seed": config.seed,
        "splits": report.splits,
        "ignored": dict(sorted(report.ignored.items())),
        "skipped": report.skipped,
        "split_problems": report.split_problems,
    }
    (out / "dataset.json").write_text(json.dumps(record, indent=2) + "\n")
