"""The dataset options `dataset` and `retrain` share, and the Config they make: one place,
so that a dataset built on a workstation and one built from labelled captures are cut the
same way."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from export.argtypes import int_at_least
from export.datasets import DEFAULT_LABELS, Config


def label_pair(pair: str) -> tuple[str, int]:
    name, sep, value = pair.rpartition("=")
    if not sep or not name or value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected NAME=0 or NAME=1, not {pair!r}")
    return name, int(value)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--label",
        type=label_pair,
        action="append",
        default=[],
        metavar="NAME=CLASS",
        help="VOC/crop label to class 0 or 1, added to the AWS convention's Clean=0 "
        "Corroded=1 (--ignore-label drops one of those)",
    )
    p.add_argument(
        "--ignore-label",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this label on purpose (any other unmapped label fails the run before "
        "anything is written)",
    )
    p.add_argument(
        "--crop",
        choices=["middle", "whole"],
        default="middle",
        help="VOC box crop: the AWS middle third (1/9 of the area) or the whole box",
    )
    p.add_argument(
        "--outside-boxes-negatives",
        action="store_true",
        help="sample VOC pixels outside every box as clean",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        help="share of the photos (not pixels) held out for validation (default 0.2)",
    )
    p.add_argument(
        "--max-pixels-per-image",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="at most N rows from each photo, drawn at random (default: all)",
    )
    p.add_argument("--balance", action="store_true", help="cut the majority class per split")
    p.add_argument("--seed", type=int_at_least(0), default=0)


def labels_of(args: argparse.Namespace) -> dict[str, int]:
    """The AWS convention's names (Clean-*/Corroded-* crops, Clean/Corroded boxes) and the
    --label pairs over them: `--label rust=1 --crops DIR` once refused the crops' own names."""
    labels = {k: v for k, v in DEFAULT_LABELS.items() if k not in args.ignore_label}
    return labels | dict(args.label)


def config_of(
    args: argparse.Namespace,
    *,
    voc: Sequence[Path] = (),
    crops: Sequence[Path] = (),
    masks: Sequence[Path] = (),
    negatives: Sequence[Path] = (),
) -> Config:
    return Config(
        voc=tuple(voc),
        crops=tuple(crops),
        masks=tuple(masks),
        negatives=tuple(negatives),
        labels=labels_of(args),
        ignore=frozenset(args.ignore_label),
        crop=args.crop,
        outside_boxes_negatives=args.outside_boxes_negatives,
        validation_fraction=args.validation_fraction,
        max_pixels_per_image=args.max_pixels_per_image,
        balance=args.balance,
        seed=args.seed,
    )
