"""`retrain` from Ground Truth output: labels converted exactly, a new version published over
real HTTP (moto), channels untouched until the printed `promote` command is run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.contract import ChannelPointer, RegistryUrl, manifest_key
from agent.signing import keyring, load_public_key, verify_manifest
from export import registry, retrain
from export.cli import main
from export.datasets import DatasetError
from export.synthetic import generate
from export.voc import parse

RUST, PAINT = "#ff7f0e", "#1f77b4"  # Ground Truth's palette; RUST is not BGR-symmetric


def colour_map() -> dict[str, Any]:
    names = (("BACKGROUND", "#ffffff"), ("rust", RUST), ("paint", PAINT))
    return {
        str(i): {"class-name": name, "hex-color": colour, "confidence": 0.9}
        for i, (name, colour) in enumerate(names)
    }


def colour_png(mask: np.ndarray) -> bytes:
    """What Ground Truth writes: one colour per class (BGR order for OpenCV)."""
    rust = np.frombuffer(bytes.fromhex(RUST[1:]), np.uint8)
    rgb = np.where(mask[..., None] > 0, rust, np.uint8(255))
    ok, png = cv2.imencode(".png", rgb[..., ::-1].astype(np.uint8))
    assert ok
    return png.tobytes()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("scenes"), 6, seed=1, width=96, height=72)


def segmentation_manifest(s3: Any, bucket: str, scenes: list[Path]) -> str:
    """Images and colour masks in S3, and the labelling job's output manifest beside them."""
    lines = []
    for i, image in enumerate(scenes):
        s3.put_object(Bucket=bucket, Key=f"gt/images/{image.name}", Body=image.read_bytes())
        mask = cv2.imread(str(image.with_name(f"{image.stem}.mask.png")), cv2.IMREAD_GRAYSCALE)
        s3.put_object(Bucket=bucket, Key=f"gt/annotations/{i}.png", Body=colour_png(mask))
        metadata = {
            "internal-color-map": colour_map(),
            "type": "groundtruth/semantic-segmentation",
            "human-annotated": "yes",
            "creation-date": "2024-05-03T10:00:00.000000",
            "job-name": "labeling-job/rust",
        }
        lines.append(
            {
                "source-ref": f"s3://{bucket}/gt/images/{image.name}",
                "rust-ref": f"s3://{bucket}/gt/annotations/{i}.png",
                "rust-ref-metadata": metadata,
            }
        )
    failed = {"type": "groundtruth/semantic-segmentation", "failure-reason": "ClientError: timeout"}
    lines.append({"source-ref": f"s3://{bucket}/gt/images/x.jpg", "rust-ref-metadata": failed})
    body = "".join(json.dumps(line) + "\n" for line in lines)
    s3.put_object(Bucket=bucket, Key="gt/output/output.manifest", Body=body.encode())
    return f"s3://{bucket}/gt/output/output.manifest"


def test_segmentation_masks_are_exact(
    aws_endpoint: str, s3: Any, s3_bucket: str, scenes: list[Path], tmp_path: Path
) -> None:
    ref = segmentation_manifest(s3, s3_bucket, scenes)
    client = registry.s3_client()
    with pytest.raises(ValueError, match=r"classes without a --label NAME=0\|1: paint"):
        retrain.from_ground_truth(client, ref, tmp_path / "a", {"rust": 1})
    masks, _, _ = retrain.from_ground_truth(client, ref, tmp_path / "b", {"rust": 1, "paint": 0})
    converted = sorted(masks.glob("*.mask.png"))
    assert len(converted) == len(scenes)  # the failed task is left out
    for path, scene in zip(converted, scenes, strict=True):
        truth = cv2.imread(str(scene.with_name(f"{scene.stem}.mask.png")), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), truth)
        assert path.with_name(path.name.replace(".mask.png", ".jpg")).is_file()


def test_boxes_become_voc(scenes: list[Path], tmp_path: Path) -> None:
    """Local paths work too: the manifest and its images need not be in S3."""
    lines = []
    for image in scenes:
        annotation = parse(image.with_suffix(".xml"))
        boxes = [
            {"class_id": 0, "left": x0, "top": y0, "width": x1 - x0, "height": y1 - y0}
            for x0, y0, x1, y1 in (o.box for o in annotation.objects)
        ]
        size = [{"width": 96, "height": 72, "depth": 3}]
        metadata = {"class-map": {"0": "rust"}, "type": "groundtruth/object-detection"}
        lines.append(
            {
                "source-ref": str(image),
                "rust": {"image_size": size, "annotations": boxes},
                "rust-metadata": metadata,
            }
        )
    manifest = tmp_path / "output.manifest"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, voc, clean = retrain.from_ground_truth(None, str(manifest), tmp_path / "work", {"rust": 1})
    boxed = [
        image for image, line in zip(scenes, lines, strict=True) if line["rust"]["annotations"]
    ]
    assert len(list(clean.iterdir())) == len(scenes) - len(boxed)  # answered "no rust": clean
    for xml, image in zip(sorted(voc.glob("*.xml")), boxed, strict=True):
        got, want = parse(xml), parse(image.with_suffix(".xml"))
        assert [(o.name, o.box) for o in got.objects] == [(o.name, o.box) for o in want.objects]
        assert got.size == (96, 72)
        assert got.image.read_bytes() == image.read_bytes()

    manifest.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"manifest line 2: not a Ground Truth output record"):
        retrain.from_ground_truth(None, str(manifest), tmp_path / "bad", {"rust": 1})


def test_a_photo_answered_with_no_box_is_clean(scenes: list[Path], tmp_path: Path) -> None:
    """`annotations: []` is a labeller's answer (no rust here): it gave no rows at all, and
    the clean photos the `sample` captures are uploaded for were lost."""
    metadata = {"class-map": {"0": "rust"}, "type": "groundtruth/object-detection"}
    line = {
        "source-ref": str(scenes[0]),
        "rust": {"image_size": [{"width": 96, "height": 72, "depth": 3}], "annotations": []},
        "rust-metadata": metadata,
    }
    manifest = tmp_path / "output.manifest"
    manifest.write_text(json.dumps(line) + "\n")
    _, voc, negatives = retrain.from_ground_truth(None, str(manifest), tmp_path / "w", {"rust": 1})
    assert not list(voc.iterdir())
    [clean] = negatives.iterdir()
    assert clean.read_bytes() == scenes[0].read_bytes()


@pytest.mark.usefixtures("aws_endpoint")
def test_retrain_publishes_without_promoting(
    s3: Any,
    s3_bucket: str,
    scenes: list[Path],
    logistic_model: Path,
    tmp_path: Path,
    *,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry.keygen(tmp_path / "keys")
    private = tmp_path / "keys" / registry.PRIVATE_KEY_FILE
    url = RegistryUrl(s3_bucket, "reg")
    client = registry.s3_client()
    registry.publish(client, url, logistic_model.parent, registry.load_private_key(private))
    registry.promote(client, url, "test-rgb", "1.0.0", "stable", public_keys=None, promoted_by="t")
    pointer_key = "reg/channels/test-rgb/stable.json"
    before = s3.get_object(Bucket=s3_bucket, Key=pointer_key)["Body"].read()

    ref = segmentation_manifest(s3, s3_bucket, scenes)
    code = main(
        [
            *("retrain", "--registry", f"s3://{s3_bucket}/reg", "--key", str(private)),
            *(
                "--name",
                "test-rgb",
                "--ground-truth",
                ref,
                "--label",
                "rust=1",
                "--label",
                "paint=0",
            ),
            *("--num-round", "5", "--max-pixels-per-image", "2000", "--threads", "2"),
            *("--skip-parity", "--flag-pct", "3"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "published test-rgb 1.0.1" in err
    assert "not promoted" in err
    assert s3.get_object(Bucket=s3_bucket, Key=pointer_key)["Body"].read() == before

    listing = registry.list_registry(client, url, "test-rgb")
    assert [m.version for m in listing.manifests] == ["1.0.0", "1.0.1"]
    new = listing.manifests[-1]
    assert new.decision.flag_pct == 3.0
    assert new.output.objective == "multi:softmax"  # the AWS payload, five rounds
    assert new.provenance.metrics["accuracy"] > 0.8
    assert new.provenance.training_data_sha256 is not None
    public = tmp_path / "keys" / registry.PUBLIC_KEY_FILE
    verify_manifest(new, keyring([load_public_key(public)]), required=True)

    # the printed command is the one to run when satisfied
    promote = shlex.split(out.strip())
    assert promote[:2] == ["corrosion-export", "promote"]
    assert str(public) in promote
    assert main(promote[1:]) == 0
    data = s3.get_object(Bucket=s3_bucket, Key=pointer_key)["Body"].read()
    assert ChannelPointer.parse(data, pointer_key).version == "1.0.1"


@pytest.mark.usefixtures("aws_endpoint")
def test_a_validation_split_of_one_class_is_not_trained_nor_published(
    s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One clean photo trains, so validation held rust only: early stopping kept round 0
    (AUC 0.5) and that model was published."""
    registry.keygen(tmp_path / "keys")
    private = tmp_path / "keys" / registry.PRIVATE_KEY_FILE
    generate(tmp_path / "voc", 3, seed=4, width=96, height=72, clean_fraction=0.0)
    negatives = tmp_path / "neg"
    negatives.mkdir()
    assert cv2.imwrite(str(negatives / "clean.png"), np.full((72, 96, 3), 128, np.uint8))
    argv = ["retrain", "--registry", f"s3://{s3_bucket}", "--key", str(private), "--name", "m"]
    sources = ["--voc", str(tmp_path / "voc"), "--negatives", str(negatives), "--label", "rust=1"]
    assert main([*argv, *sources, "--num-round", "3", "--skip-parity"]) == 2
    err = capsys.readouterr().err
    assert "error: not training: validation split has no clean (0) rows" in err
    listing = registry.list_registry(registry.s3_client(), RegistryUrl(s3_bucket, ""))
    assert listing.manifests == [] and listing.invalid == []


def test_refuses_an_existing_version_before_training(
    aws_endpoint: str,
    s3_bucket: str,
    logistic_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry.keygen(tmp_path / "keys")
    private = tmp_path / "keys" / registry.PRIVATE_KEY_FILE
    key = registry.load_private_key(private)
    registry.publish(registry.s3_client(), RegistryUrl(s3_bucket, ""), logistic_model.parent, key)
    argv = ["retrain", "--registry", f"s3://{s3_bucket}", "--key", str(private)]
    assert main([*argv, "--name", "test-rgb", "--version", "1.0.0", "--masks", "nowhere"]) == 2
    assert "test-rgb 1.0.0 already exists" in capsys.readouterr().err
    assert main([*argv, "--name", "test-rgb"]) == 2
    assert "error: no labels: give --ground-truth" in capsys.readouterr().err
    assert main([*argv, "--name", "test-rgb", "--masks", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err
    torn = manifest_key("", "test-rgb", "1.0.5")  # unreadable here, and maybe the highest
    registry.s3_client().put_object(Bucket=s3_bucket, Key=torn, Body=b'{"name": "test-rgb"')
    assert main([*argv, "--name", "test-rgb", "--masks", str(tmp_path / "nowhere")]) == 2
    assert f"s3://{s3_bucket}/{torn}: invalid manifest" in capsys.readouterr().err


def test_fetch_takes_every_legal_key_and_nothing_outside_dest(
    s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """Keys with '#', '?' or spaces are legal in S3 (Ground Truth keeps the image names);
    they stopped the whole run. A key that would climb out of the download folder is not."""
    names = ["rust #2.png", "what?.png", "sub/a b.png"]
    for i, name in enumerate(names):
        s3.put_object(Bucket=s3_bucket, Key=f"masks/{name}", Body=bytes([i]))
    got = retrain.fetch_folder(s3, f"s3://{s3_bucket}/masks", tmp_path / "masks")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*.png")) == sorted(names)
    assert (got / "what?.png").read_bytes() == b"\x01"
    one = retrain.fetch(s3, f"s3://{s3_bucket}/masks/rust #2.png", tmp_path / "one.png")
    assert one.read_bytes() == b"\x00"
    s3.put_object(Bucket=s3_bucket, Key="masks/../escape.png", Body=b"x")
    with pytest.raises(DatasetError, match=r"masks/\.\./escape\.png: a key that would be written"):
        retrain.fetch_folder(s3, f"s3://{s3_bucket}/masks", tmp_path / "again")
    assert not (tmp_path / "escape.png").exists()
    with pytest.raises(DatasetError, match="expected s3://BUCKET/KEY"):
        retrain.fetch(s3, f"s3://{s3_bucket}", tmp_path / "none")
