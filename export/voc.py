"""Pascal VOC annotations as labelImg writes them: one XML per image, one box per object.

Coordinates are read the way the AWS solution's notebook crops them (PIL's `crop`): 0-based,
`xmax`/`ymax` exclusive. labelImg's boxes are 1 px off under the VOC devkit's 1-based inclusive
reading, which does not matter for a middle-third crop but makes `xmax == width` legal here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax; max exclusive
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_COORDS = ("xmin", "ymin", "xmax", "ymax")


class VocError(ValueError):
    """An annotation file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class VocObject:
    name: str
    box: Box


@dataclass(frozen=True)
class Annotation:
    xml: Path
    image: Path
    size: tuple[int, int] | None  # (width, height) as the labelling tool saw the image
    objects: tuple[VocObject, ...]


def _coord(text: str | None, xml: Path, index: int, tag: str) -> int:
    try:
        return round(float(text or ""))  # some tools write "12.0"
    except (ValueError, OverflowError):
        raise VocError(f"{xml}: object {index} has no numeric bndbox/{tag} ({text!r})") from None


def _image_for(xml: Path, filename: str) -> Path:
    """`<filename>` beside the XML (base name only: never follow a path out of the folder),
    else the XML's stem with an image suffix, as the AWS notebook pairs them; in the
    standard VOC layout (`Annotations/x.xml`), the same names in `../JPEGImages/`."""
    folders = [xml.parent]
    if xml.parent.name == "Annotations":
        folders.append(xml.parent.parent / "JPEGImages")
    names = [Path(filename).name] if filename else []
    names += [xml.stem + s for s in IMAGE_SUFFIXES]
    names += [xml.stem + s.upper() for s in IMAGE_SUFFIXES]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    where = " or ".join(str(f) for f in folders)
    raise VocError(
        f"{xml}: no image found in {where} (filename {filename!r}, nor {xml.stem}.<jpg|png|...>)"
    )


def parse(xml: Path) -> Annotation:
    """Read one annotation; any structural problem is a VocError naming the file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise VocError(f"{xml}: not valid XML ({exc})") from None
    except OSError as exc:
        raise VocError(f"{xml}: cannot read ({exc.strerror or exc})") from None
    if root.tag != "annotation":
        raise VocError(f"{xml}: root element is <{root.tag}>, expected <annotation>")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise VocError(f"{xml}: object {i} has no <name>")
        xmin, ymin, xmax, ymax = (_coord(obj.findtext(f"bndbox/{t}"), xml, i, t) for t in _COORDS)
        objects.append(VocObject(name, (xmin, ymin, xmax, ymax)))
    width, height = (_size(root.findtext(f"size/{t}")) for t in ("width", "height"))
    size = (width, height) if width and height else None
    image = _image_for(xml, (root.findtext("filename") or "").strip())
    return Annotation(xml, image, size, tuple(objects))


def _size(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0  # an unusable <size> is not checked; the decoded image is the truth


def box_problem(box: Box, width: int, height: int) -> str | None:
    """Why a box cannot be cropped from a width x height image, or None if it can."""
    xmin, ymin, xmax, ymax = box
    if xmin >= xmax or ymin >= ymax:
        return "is empty or inverted"
    if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
        return f"lies outside the {width}x{height} image"
    return None


def middle_third(box: Box) -> Box:
    """The AWS solution's crop: the central third of the width and of the height (1/9 area),
    truncated to whole pixels exactly as its notebook does."""
    xmin, ymin, xmax, ymax = box
    a, b = (xmax - xmin) / 3.0, (ymax - ymin) / 3.0
    return int(xmin + a), int(ymin + b), int(xmax - a), int(ymax - b)
