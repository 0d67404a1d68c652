"""fdet's synthetic shapes set: coloured shapes on textured backgrounds, with exact boxes and
instance masks, written as PNG images and COCO annotation files.

Every image is a function of ``(seed, split, index)`` alone, so a set is reproducible byte for
byte, and the first ``n`` images of a larger set are the images of a smaller one. Shapes are
drawn one over another; an object keeps only its visible pixels, its box is the tight box of
those pixels, and a shape that would hide too much of an earlier one is not drawn (so nothing
visible is ever left unannotated).

``generate`` writes a set to a folder; ``ensure_shapes`` keeps a cache of sets keyed by their
parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from fdet import specs

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "ShapesPaths",
    "default_cache_dir",
    "ensure_shapes",
    "find_set",
    "generate",
    "read_manifest",
    "render",
]

# Bump when a change to the generator changes its output: cached sets are keyed by it.
GENERATOR_VERSION = 1

CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ellipse")
"""Class names; category ``i + 1`` in the annotation files is ``CATEGORIES[i]``."""

MANIFEST = "shapes.json"  # written last: a folder with a manifest is a complete set

MIN_VISIBLE = 0.3  # an object keeps at least this share of its pixels (occlusion, image border)
MIN_SIDE = 4  # and a visible box at least this many pixels wide and high
_ATTEMPTS = 8  # placements tried for each object before it is left out
_MIN_CONTRAST = 90.0  # wanted RGB distance between an object and what lies under it


class ShapesPaths(NamedTuple):
    """Where a generated set lies."""

    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


class Rendered(NamedTuple):
    """One rendered image and its objects, in drawing order."""

    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [N, H, W], visible pixels only
    labels: np.ndarray  # int64 [N], 0-based index into CATEGORIES
    boxes: np.ndarray  # float64 [N, 4] xyxy, the tight box of each mask


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _normalized(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box on 0 and scale its larger side to 2 (extent [-1, 1])."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _regular(n: int, radii: tuple[float, ...] = (1.0,), start: float = math.pi / 2) -> np.ndarray:
    """Vertices of a regular polygon (one radius) or star (alternating radii)."""
    k = np.arange(n * len(radii))
    angles = start + 2 * math.pi * k / (n * len(radii))
    r = np.asarray(radii)[k % len(radii)]
    return np.stack((r * np.cos(angles), -r * np.sin(angles)), axis=1)


_CROSS = np.array(
    [
        (-1, -3),
        (1, -3),
        (1, -1),
        (3, -1),
        (3, 1),
        (1, 1),
        (1, 3),
        (-1, 3),
        (-1, 1),
        (-3, 1),
        (-3, -1),
        (-1, -1),
    ],
    dtype=np.float64,
)
# Unit shapes with extent [-1, 1]; the ellipse is made per object (its aspect ratio varies).
_UNIT = {
    "circle": _normalized(_regular(40)),
    "square": _normalized(_regular(4, start=math.pi / 4)),
    "triangle": _normalized(_regular(3)),
    "star": _normalized(_regular(5, radii=(1.0, 0.45))),
    "cross": _normalized(_CROSS),
}
# Rotations that give distinct outlines (symmetry period of each shape), in radians.
_PERIOD = {
    "circle": 0.0,
    "square": math.pi / 2,
    "triangle": 2 * math.pi / 3,
    "star": 2 * math.pi / 5,
    "cross": math.pi / 2,
    "ellipse": math.pi,
}


def _outline(name: str, rng: np.random.Generator, size: float) -> np.ndarray:
    """Polygon ``[V, 2]`` (x, y) of one shape of extent ``size`` (before rotation), at 0."""
    if name == "ellipse":
        t = 2 * math.pi * np.arange(40) / 40
        minor = rng.uniform(0.35, 0.6)
        unit = np.stack((np.cos(t), minor * np.sin(t)), axis=1)
    else:
        unit = _UNIT[name]
    angle = rng.uniform(0, _PERIOD[name])
    c, s = math.cos(angle), math.sin(angle)
    return unit @ np.array([[c, s], [-s, c]]) * (size / 2)


def _rasterize(polygon: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(x0, y0, mask): the polygon filled on a canvas of its own bounding box at (x0, y0)."""
    x0, y0 = np.floor(polygon.min(0)).astype(int)
    x1, y1 = np.ceil(polygon.max(0)).astype(int) + 1
    canvas = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in polygon.tolist()], fill=1)
    return int(x0), int(y0), np.asarray(canvas, dtype=bool)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """xyxy pixel-edge box of a boolean ``[H, W]`` mask (``x2`` exclusive), None if empty."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _big_enough(box: tuple[int, int, int, int] | None) -> bool:
    return box is not None and box[2] - box[0] >= MIN_SIDE and box[3] - box[1] >= MIN_SIDE


# ---------------------------------------------------------------------------------------------
# Colours and backgrounds
# ---------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in [0, 1]) -> RGB in [0, 255], ``[..., 3]``."""
    k = (np.stack((5.0, 3.0, 1.0)) + h[..., None] * 6) % 6  # [..., 3]
    f = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return f * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float ``[size, size, 3]`` background: a gradient, stripes, blobs or a checkerboard
    between two muted colours."""
    base = np.clip(rng.uniform(40, 215) + rng.uniform(-35, 35, 3), 0, 255)
    other = np.clip(base + rng.uniform(-60, 60) + rng.uniform(-20, 20, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(np.ptp(along), 1e-6)
    elif kind == 1:  # stripes
        period = rng.uniform(4, 24) / size
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
    elif kind == 2:  # smooth blobs: coarse noise, upsampled
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray((rng.uniform(0, 255, (cells, cells))).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float64) / 255
    else:  # checkerboard
        cell = rng.uniform(6, 24) / size
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * rng.uniform(0.4, 1.0)
    return base + t[..., None] * (other - base)


def _pick_colour(
    rng: np.random.Generator, under: np.ndarray, neighbours: list[np.ndarray]
) -> np.ndarray:
    """A saturated colour far (in RGB) from the mean background under the object and from the
    colours of the objects it overlaps: the best of a few random candidates."""
    h, s, v = rng.uniform(0, 1, 12), rng.uniform(0.45, 1.0, 12), rng.uniform(0.35, 1.0, 12)
    candidates = _hsv_to_rgb(h, s, v)  # [12, 3]
    away = np.linalg.norm(candidates - under, axis=1)
    for colour in neighbours:
        away = np.minimum(away, 1.5 * np.linalg.norm(candidates - colour, axis=1))
    good = away >= _MIN_CONTRAST
    return candidates[int(np.argmax(good))] if good.any() else candidates[int(np.argmax(away))]


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def render(
    seed: int, split: str, index: int, *, size: int, min_object_size: int, max_objects: int
) -> Rendered:
    """Render image ``index`` of ``split`` ("train" or "val"); a pure function of its arguments."""
    split_code = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([GENERATOR_VERSION, seed, split_code, index])
    background = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # which object shows at each pixel
    labels: list[int] = []
    colours: list[np.ndarray] = []
    full_area: list[int] = []  # pixels of each shape as drawn (inside and outside the image)
    visible: list[int] = []
    log_lo, log_hi = math.log(min_object_size), math.log(size / 2)

    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(_ATTEMPTS):
            label = int(rng.integers(len(CATEGORIES)))
            extent = math.exp(rng.uniform(log_lo, log_hi))
            polygon = _outline(CATEGORIES[label], rng, extent) + rng.uniform(0, size, 2)
            placed = _place(polygon, owner, full_area, visible)
            if placed is not None:
                break
        else:
            continue
        x0, y0, local, lost, area = placed
        inside = (slice(y0, y0 + local.shape[0]), slice(x0, x0 + local.shape[1]))
        neighbours = [colours[j] for j in np.flatnonzero(lost)]
        under = background[inside][local].mean(0)
        colours.append(_pick_colour(rng, under, neighbours))
        for j in np.flatnonzero(lost):
            visible[j] -= int(lost[j])
        owner[inside][local] = len(labels)
        labels.append(label)
        full_area.append(area)
        visible.append(int(local.sum()))

    if not labels:  # every placement failed (very unlikely): one small circle in the middle
        polygon = _outline("circle", rng, max(min_object_size, 2 * MIN_SIDE)) + size / 2
        x0, y0, local = _rasterize(polygon)
        owner[y0 : y0 + local.shape[0], x0 : x0 + local.shape[1]][local] = 0
        labels.append(0)
        colours.append(_pick_colour(rng, background[size // 2, size // 2], []))

    n = len(labels)
    masks = owner[None] == np.arange(n)[:, None, None]  # [N, H, W]
    boxes = np.array([_tight_box(m) for m in masks], dtype=np.float64)  # every mask non-empty
    # Objects are flat colours with a gentle linear shading, then the whole image gets noise.
    shade_dir = rng.normal(size=(n + 1, 2)) * rng.uniform(0, 0.35, (n + 1, 1))
    centre = np.concatenate(((boxes[:, :2] + boxes[:, 2:]) / 2, [[0.0, 0.0]]))
    span = np.concatenate((np.maximum(boxes[:, 2:] - boxes[:, :2], 1).max(1), [1.0]))
    yy, xx = np.mgrid[0:size, 0:size]
    o = owner  # -1 indexes the dummy last row of each table
    shade = (
        1
        + ((xx - centre[o, 0]) * shade_dir[o, 0] + (yy - centre[o, 1]) * shade_dir[o, 1]) / span[o]
    )
    table = np.concatenate((np.array(colours), [[0.0, 0.0, 0.0]]))
    image = np.where(o[..., None] >= 0, table[o] * shade[..., None], background)
    image += rng.normal(0, rng.uniform(1, 8), image.shape)
    return Rendered(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        masks=masks,
        labels=np.asarray(labels, dtype=np.int64),
        boxes=boxes,
    )


class _Placement(NamedTuple):
    x0: int
    y0: int
    local: np.ndarray  # bool mask of the part inside the image, at (x0, y0)
    lost: np.ndarray  # pixels each earlier object would lose
    full_area: int


def _place(
    polygon: np.ndarray, owner: np.ndarray, full_area: list[int], visible: list[int]
) -> _Placement | None:
    """The placement of a new shape on top, or None when it would break a visibility rule: the
    new shape must show ``MIN_VISIBLE`` of itself inside the image with a box of ``MIN_SIDE``
    pixels, and every earlier object must keep the same after being covered."""
    size = owner.shape[0]
    x0, y0, mask = _rasterize(polygon)
    area = int(mask.sum())
    # The part inside the image.
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + mask.shape[1], size), min(y0 + mask.shape[0], size)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    local = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    if local.sum() < MIN_VISIBLE * area or not _big_enough(_tight_box(local)):
        return None
    region = owner[cy0:cy1, cx0:cx1]
    lost = np.bincount(region[local] + 1, minlength=len(visible) + 1)[1:]  # [earlier objects]
    for j in np.flatnonzero(lost):
        if visible[j] - lost[j] < MIN_VISIBLE * full_area[j]:
            return None
        after = owner == j
        after[cy0:cy1, cx0:cx1] &= ~local
        if not _big_enough(_tight_box(after)):
            return None
    return _Placement(cx0, cy0, local, lost, area)


# ---------------------------------------------------------------------------------------------
# Writing a set
# ---------------------------------------------------------------------------------------------


def _manifest(
    *, train: int, val: int, size: int, seed: int, min_object_size: int, max_objects: int
) -> dict[str, Any]:
    return {
        "format": "fdet-shapes",
        "version": GENERATOR_VERSION,
        "train": train,
        "val": val,
        "size": size,
        "seed": seed,
        "min_object_size": min_object_size,
        "max_objects": max_objects,
    }


def _paths(root: Path) -> ShapesPaths:
    return ShapesPaths(
        root=root,
        train_images=root / "train",
        train_annotations=root / "annotations" / "train.json",
        val_images=root / "val",
        val_annotations=root / "annotations" / "val.json",
    )


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        with open(root / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of the complete shapes set in ``out_dir``: generator ``version`` and the
    parameters (``train``, ``val``, ``size``, ``seed``, ``min_object_size``, ``max_objects``);
    None when ``out_dir`` holds no complete set."""
    return _read_manifest(Path(out_dir))


def find_set(
    out_dir: str | os.PathLike[str],
    *,
    train: int,
    val: int,
    size: int = 128,
    seed: int = 0,
    min_object_size: int = 8,
    max_objects: int = 12,
) -> ShapesPaths | None:
    """The set in ``out_dir`` if it is a complete shapes set of this generator with these
    parameters (one that :func:`generate` returns as is, writing nothing), else None."""
    manifest = _manifest(
        train=train,
        val=val,
        size=size,
        seed=seed,
        min_object_size=min_object_size,
        max_objects=max_objects,
    )
    out = Path(out_dir)
    return _paths(out) if _read_manifest(out) == manifest else None


def _write_split(
    root: Path, split: str, count: int, *, size: int, seed: int, min_size: int, max_objects: int
) -> None:
    images_dir = root / split
    images_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        image_id = index + 1
        r = render(seed, split, index, size=size, min_object_size=min_size, max_objects=max_objects)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(r.image).save(images_dir / file_name, compress_level=6)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        rles = mask_utils.encode(np.asfortranarray(r.masks.transpose(1, 2, 0).astype(np.uint8)))
        for label, box, rle in zip(r.labels.tolist(), r.boxes.tolist(), rles):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)
    ]
    dataset = {
        "info": {"description": f"fdet shapes ({split})", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with open(root / "annotations" / f"{split}.json", "w") as f:
        json.dump(dataset, f, separators=(",", ":"))


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary folder next to ``out_dir``, removed on exit unless it was moved."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # the set is renamed into place: mode as any new folder's
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(
    out_dir: str | os.PathLike[str],
    *,
    train: int,
    val: int,
    size: int = 128,
    seed: int = 0,
    min_object_size: int = 8,
    max_objects: int = 12,
    overwrite: bool = False,
) -> ShapesPaths:
    """Write a shapes set to ``out_dir``: ``train/*.png``, ``val/*.png``,
    ``annotations/{train,val}.json`` (COCO, RLE masks, category ids from 1) and a manifest.

    The set is built in a temporary folder beside ``out_dir`` and renamed into place, so an
    interrupted run leaves no partial set. If ``out_dir`` already holds a complete set with the
    same parameters it is returned as is; any other non-empty ``out_dir`` is an error unless
    ``overwrite``.
    """
    for name, value in (("train", train), ("val", val), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if size < 2:
        raise ValueError(f"size: must be >= 2, got {size}")
    if min_object_size < 1 or 2 * min_object_size > size:
        raise ValueError(
            f"min_object_size: must be in [1, size / 2 = {size / 2}], got {min_object_size}"
        )
    if max_objects < 1:
        raise ValueError(f"max_objects: must be >= 1, got {max_objects}")
    out = Path(out_dir)
    manifest = _manifest(
        train=train,
        val=val,
        size=size,
        seed=seed,
        min_object_size=min_object_size,
        max_objects=max_objects,
    )
    if _read_manifest(out) == manifest:
        return _paths(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out}: exists and is not a shapes set with these parameters; "
            "choose another folder or overwrite it"
        )
    with _staging(out) as tmp:
        (tmp / "annotations").mkdir()
        for split, count in (("train", train), ("val", val)):
            _write_split(
                tmp,
                split,
                count,
                size=size,
                seed=seed,
                min_size=min_object_size,
                max_objects=max_objects,
            )
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
        _install(tmp, out, manifest)
    return _paths(out)


def _install(tmp: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Move the finished set ``tmp`` to ``out``, replacing what is there. If another process
    installed the same set meanwhile, keep theirs."""
    if out.exists():
        if _read_manifest(out) == manifest:
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "set")
        try:
            os.replace(tmp, out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)
    except OSError:  # a concurrent writer got there first
        if _read_manifest(out) != manifest:
            raise


def default_cache_dir() -> Path:
    """``$FDET_CACHE``, else ``~/.cache/fdet``."""
    env = os.environ.get("FDET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fdet"


def ensure_shapes(spec: specs.ShapesData) -> ShapesPaths:
    """The shapes set described by ``spec``, generated on first use and reused afterwards.

    It lives in ``<cache>/shapes-<size>px-<hash>``, where ``<cache>`` is ``spec.cache_dir`` or
    :func:`default_cache_dir` and the hash covers every field but ``cache_dir`` (and the
    generator version). Safe to call from several processes at once.
    """
    params = dict(
        train=spec.train_images,
        val=spec.val_images,
        size=spec.image_size,
        seed=spec.seed,
        min_object_size=spec.min_object_size,
        max_objects=spec.max_objects,
    )
    manifest = _manifest(**params)
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    root = cache / f"shapes-{spec.image_size}px-{key}"
    if _read_manifest(root) == manifest:
        return _paths(root)
    return generate(root, **params, overwrite=True)
