"""Retrain from labelled captures: labels -> dataset -> train -> convert -> publish, one command.

Labels come from a SageMaker Ground Truth output manifest (JSON Lines: `source-ref`, and per
labelling job an attribute plus `<attribute>-metadata` whose `type` says the task) and/or
folders of masks, VOC annotations and clean photos. Ground Truth labels are turned into what
`export.datasets` already reads, so labels and the split by image follow the `dataset`
command's rules:

- semantic segmentation: the attribute (named `<label>-ref`) is the s3:// URI of a colour
  PNG; the colours of the classes labelled 1 in `internal-color-map` become `<stem>.mask.png`
  (255 = corroded) beside the image; BACKGROUND and classes labelled 0 are clean.
- bounding boxes: `annotations` (class_id, left, top, width, height, named by `class-map`)
  become a labelImg VOC XML beside the image.

Everything s3:// is downloaded to the work directory first. The new version is published
signed but not promoted: devices keep their model until someone runs the printed `promote`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent import __version__
from agent.contract import MANIFEST_FILE, Decision, Provenance, RegistryUrl, manifest_key
from agent.imageio import ImageError, read
from export import dataset_cli, registry
from export.argtypes import int_at_least
from export.convert import export_model, load_booster
from export.datasets import MASK_SUFFIX, DatasetError, build
from export.registry import TRANSFER, aws_errors, head_object
from export.train import fit, hyperparameters
from export.voc import IMAGE_SUFFIXES

SEGMENTATION = "groundtruth/semantic-segmentation"
BOXES = "groundtruth/object-detection"
BACKGROUND = "BACKGROUND"  # Ground Truth's own name for unlabelled pixels


def object_ref(ref: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// object URI. Any key S3 allows is taken as it is ('#', '?',
    spaces: Ground Truth writes what the images were called); only the bucket is checked."""
    bucket, _, key = ref.removeprefix("s3://").partition("/")
    if not key:
        raise DatasetError(f"{ref}: expected s3://BUCKET/KEY of one object")
    RegistryUrl.parse(f"s3://{bucket}")  # a ValueError naming a bad bucket
    return bucket, key


def fetch(s3: Any, ref: str, dest: Path) -> Path:
    """Copy an s3:// object or a local file to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if ref.startswith("s3://"):
        bucket, key = object_ref(ref)
        with aws_errors(ref):
            s3.download_file(bucket, key, str(dest), Config=TRANSFER)
        return dest
    try:
        shutil.copyfile(ref, dest)
    except OSError as exc:
        raise DatasetError(f"{ref}: cannot read ({exc.strerror or exc})") from None
    return dest


def fetch_folder(s3: Any, ref: str, dest: Path) -> Path:
    """A local folder as it is; an s3:// prefix downloaded below `dest`. A key whose path
    below the prefix would land outside `dest` ('..', or an empty segment) is refused."""
    if not ref.startswith("s3://"):
        return Path(ref)
    url = RegistryUrl.parse(ref)
    prefix = url.prefix + "/" if url.prefix else ""
    with aws_errors(ref):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix)
        keys = [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"][-1] != "/"]
    jobs = []
    for key in keys:
        parts = key.removeprefix(prefix).split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise DatasetError(f"{url.uri(key)}: a key that would be written outside {dest}")
        jobs.append((url.uri(key), dest.joinpath(*parts)))
    _download(s3, jobs)
    return dest


def _download(s3: Any, jobs: list[tuple[str, Path]]) -> None:
    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe
        list(pool.map(lambda job: fetch(s3, *job), jobs))


def _task(line: dict[str, Any], attribute: str | None) -> tuple[str, str] | None:
    """(attribute, task type) of the line's labelling job; None when it has no label."""
    jobs = {
        key.removesuffix("-metadata"): meta.get("type")
        for key, meta in line.items()
        if key.endswith("-metadata") and isinstance(meta, dict)
    }
    if attribute is None:
        found = [a for a, kind in jobs.items() if kind in (SEGMENTATION, BOXES)]
        if len(found) > 1:
            raise DatasetError(f"labels of several jobs ({', '.join(found)}): pass --attribute")
        attribute = found[0] if found else None
    if (
        attribute is None
        or attribute not in line
        or jobs.get(attribute) not in (SEGMENTATION, BOXES)
    ):
        return None
    return attribute, str(jobs[attribute])


def _corroded(colour_png: Path, colours: dict[str, Any], labels: dict[str, int]) -> np.ndarray:
    """0/255 mask: pixels whose colour is a class labelled 1."""
    bgr = read(colour_png).image
    mask = np.zeros(bgr.shape[:2], bool)
    for entry in colours.values():
        if labels.get(entry["class-name"]) == 1:
            r, g, b = bytes.fromhex(entry["hex-color"].lstrip("#"))
            mask |= np.all(bgr == (b, g, r), axis=2)
    return mask.astype(np.uint8) * 255


def _write_voc(
    xml: Path, image: Path, size: dict[str, int], objects: list[tuple[str, Any]]
) -> None:
    """A labelImg-style annotation, the format export.voc reads."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = image.name
    dims = ET.SubElement(root, "size")
    for tag in ("width", "height", "depth"):
        ET.SubElement(dims, tag).text = str(size.get(tag, 3 if tag == "depth" else 0))
    for name, box in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        bnd = ET.SubElement(obj, "bndbox")
        left, top = box["left"], box["top"]
        corners = (left, top, left + box["width"], top + box["height"])
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
            ET.SubElement(bnd, tag).text = str(value)
    ET.ElementTree(root).write(xml, encoding="utf-8")


def from_ground_truth(
    s3: Any, ref: str, work: Path, labels: dict[str, int], attribute: str | None = None
) -> tuple[Path, Path, Path]:
    """Convert a Ground Truth output manifest into (masks, VOC, negatives) folders under
    `work`.

    Lines without a label (a failed or skipped task) are reported and left out; a
    segmentation class that --label does not name is an error, so no rust is silently clean.
    A photo a labeller answered with no box at all is a checked photo without rust: every
    pixel clean (the `sample` captures are uploaded for this).
    """
    masks, voc, negatives = work / "gt-masks", work / "gt-voc", work / "gt-negatives"
    for folder in (masks, voc, negatives):
        folder.mkdir(parents=True, exist_ok=True)
    text = fetch(s3, ref, work / "ground-truth.manifest").read_text()
    todo: list[tuple[str, Path]] = []
    # (where, line, attribute, task type, image path) of every labelled line
    labelled: list[tuple[str, dict[str, Any], str, str, Path]] = []
    unknown: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{ref} line {n}"
        try:
            line = json.loads(raw) if raw.strip() else {}
            task = _task(line, attribute)
            name = Path(str(line.get("source-ref", ""))).name
            if task is None or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                if raw.strip():
                    print(f"warning: {where}: no label or no image; skipped", file=sys.stderr)
                continue
            attr, kind = task
            image = (masks if kind == SEGMENTATION else voc) / f"{n:05d}-{name}"
            todo.append((line["source-ref"], image))
            if kind == SEGMENTATION:
                todo.append((str(line[attr]), image.with_suffix(".colour.png")))
                classes = line[f"{attr}-metadata"]["internal-color-map"].values()
                unknown |= {c["class-name"] for c in classes} - set(labels) - {BACKGROUND}
        except DatasetError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{where}: not a Ground Truth output record ({exc!r})") from None
        labelled.append((where, line, attr, kind, image))
    if unknown:
        raise DatasetError(
            f"{ref}: classes without a --label NAME=0|1: {', '.join(sorted(unknown))}"
        )
    _download(s3, todo)
    for where, line, attr, kind, image in labelled:
        meta = line[f"{attr}-metadata"]
        try:
            if kind == SEGMENTATION:
                colour = image.with_suffix(".colour.png")
                mask = _corroded(colour, meta["internal-color-map"], labels)
                _write_png(image.with_name(image.stem + MASK_SUFFIX), mask)
                colour.unlink()
            else:
                names = meta.get("class-map", {})
                boxes = line[attr]["annotations"]
                if not boxes:
                    image.replace(negatives / image.name)
                    continue
                objects = [(names.get(str(b["class_id"]), str(b["class_id"])), b) for b in boxes]
                size = (line[attr].get("image_size") or [{}])[0]
                _write_voc(image.with_suffix(".xml"), image, size, objects)
        except ImageError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: not a Ground Truth output record ({exc!r})") from None
    return masks, voc, negatives


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def next_version(s3: Any, url: RegistryUrl, name: str) -> str:
    """The patch after the highest published version of `name`; 1.0.0 for a new model. A
    manifest that cannot be read may be the highest: guessing past it could publish below it."""
    listing = registry.list_registry(s3, url, name)
    manifests = [bad for bad in listing.invalid if bad.uri.endswith(f"/{MANIFEST_FILE}")]
    if manifests:
        raise manifests[0]
    published = listing.manifests
    if not published:
        return "1.0.0"
    major, minor, patch = published[-1].version.partition("+")[0].partition("-")[0].split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def cmd_retrain(args: argparse.Namespace) -> int:
    s3, url = registry.s3_client(args.endpoint_url), RegistryUrl.parse(args.registry)
    key = registry.load_private_key(args.key)  # before any work: a bad key fails in a second
    version = args.version or next_version(s3, url, args.name)
    mkey = manifest_key(url.prefix, args.name, version)
    if head_object(s3, url, mkey) is not None:
        raise registry.RegistryError(f"{url.uri(mkey)}: {args.name} {version} already exists")
    decision = Decision(pixel_threshold=args.pixel_threshold, flag_pct=args.flag_pct)
    params = hyperparameters(args.objective, args.num_round, args.set)
    if args.work and args.work.is_dir() and any(args.work.iterdir()):
        raise DatasetError(f"{args.work}: --work must be new or empty (stale labels otherwise)")
    with tempfile.TemporaryDirectory(prefix="corrosion-retrain-") as tmp:
        work = args.work or Path(tmp)
        labels = dataset_cli.labels_of(args)
        masks = [fetch_folder(s3, m, work / f"masks-{i}") for i, m in enumerate(args.masks)]
        voc = [fetch_folder(s3, v, work / f"voc-{i}") for i, v in enumerate(args.voc)]
        negatives = [fetch_folder(s3, d, work / f"neg-{i}") for i, d in enumerate(args.negatives)]
        if args.ground_truth:
            gt_masks, gt_voc, gt_negatives = from_ground_truth(
                s3, args.ground_truth, work, labels, args.attribute
            )
            masks.append(gt_masks)
            voc.append(gt_voc)
            negatives.append(gt_negatives)
        if not (masks or voc or negatives):
            raise DatasetError("no labels: give --ground-truth, --masks, --voc and/or --negatives")
        config = dataset_cli.config_of(args, voc=voc, masks=masks, negatives=negatives)
        report = build(config, work / "dataset")
        # Metrics of one class (or of none) say nothing, and such a model would be published.
        if report.split_problems:
            raise DatasetError(
                "not training: "
                + "; ".join(report.split_problems)
                + " (--validation-fraction 0 trains on every image and scores on the training data)"
            )
        sources = [*args.masks, *args.voc, *args.negatives]
        record = fit(work / "dataset", work / "model", params, threads=args.threads, seed=args.seed)
        provenance = Provenance(
            training_data_sha256=record["training_data_sha256"],
            hyperparameters=record["hyperparameters"],
            metrics=record["metrics"],
            trainer=f"corrosion-export {__version__} retrain",
            notes="labels: " + " ".join(filter(None, [args.ground_truth, *sources])),
        )
        export_model(
            load_booster(work / "model" / "model.json"),
            work / "export",
            name=args.name,
            version=version,
            decision=decision,
            provenance=provenance,
            parity=not args.skip_parity,
            seed=args.seed,
        )
        signed = registry.publish(s3, url, work / "export", key)
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(signed.provenance.metrics.items()))
    print(f"published {signed.name} {signed.version}: {url.uri(mkey)} ({metrics})", file=sys.stderr)
    public = args.key.with_name(registry.PUBLIC_KEY_FILE)
    endpoint = f" --endpoint-url {args.endpoint_url}" if args.endpoint_url else ""
    print("not promoted; when satisfied, run:", file=sys.stderr)
    print(
        f"corrosion-export promote --registry {url}{endpoint} {signed.name} {signed.version} "
        f"--channel stable --public-key {public if public.is_file() else 'PUBLIC.pem'} "
        f"--key {args.key}"
    )
    return 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "retrain", help="labelled captures -> dataset -> train -> convert -> publish"
    )
    p.add_argument("--registry", required=True, metavar="s3://BUCKET/PREFIX")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible store")
    p.add_argument("--key", type=Path, required=True, metavar="PRIVATE.pem", help="signing key")
    p.add_argument("--name", required=True, help="model name in the registry")
    p.add_argument("--version", help="default: the patch after the highest published")
    p.add_argument("--ground-truth", metavar="MANIFEST", help="Ground Truth output, s3:// or local")
    p.add_argument("--attribute", help="its label attribute (default: the one labelling job)")
    for flag, text in (
        ("--masks", "images with <stem>.mask.png beside them"),
        ("--voc", "Pascal VOC: images + labelImg XML"),
        ("--negatives", "photos without corrosion"),
    ):
        p.add_argument(flag, action="append", default=[], metavar="DIR", help=f"{text}; or s3://")
    dataset_cli.add_options(p)
    p.add_argument("--objective", choices=["multi:softmax", "multi:softprob", "binary:logistic"])
    p.add_argument("--num-round", type=int_at_least(1), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--pixel-threshold", type=float, default=0.5)
    p.add_argument("--flag-pct", type=float, default=5.0)
    p.add_argument("--skip-parity", action="store_true", help="skip the all-colour parity proof")
    p.add_argument("--work", type=Path, help="keep downloads, dataset and model here")
    p.set_defaults(func=cmd_retrain)
