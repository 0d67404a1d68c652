"""``fdet infer``: a trained run on image files, folders of images and videos.

Writes ``OUT/results.json`` (COCO results, one record a detection) and an annotated copy of
every input (``OUT/<stem>.png`` for an image, ``OUT/<stem>.mp4`` for a video).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdet import specs

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "InputFile",
    "add_infer_parser",
    "category_ids",
    "cmd_infer",
    "expand_inputs",
    "image_id_finder",
]


class InputFile:
    """One file to run: an image or a video, and how results name it (its path as given, or
    the folder given joined with the file's name)."""

    def __init__(self, path: Path, video: bool) -> None:
        self.path = path
        self.video = video


def expand_inputs(
    inputs: Sequence[str], *, skip_bad: bool, bad: list[tuple[str, str]]
) -> list[InputFile]:
    """The files the command-line inputs stand for, in order: a file as itself (a video by its
    ending), a folder as the images directly in it, sorted by name. A missing input, an
    unreadable folder or one without images is a :class:`DataError` naming it; with
    ``skip_bad`` it is appended to ``bad`` as ``(input, reason)`` instead."""
    from fdet.data.coco import DataError
    from fdet.inference.inputs import IMAGE_SUFFIXES, image_files, is_video

    files: list[InputFile] = []
    for given in inputs:
        path = Path(given)
        try:
            if path.is_dir():
                found = image_files(path)
                if not found:
                    raise DataError(
                        f"{path}: a folder without images (files ending in "
                        f"{', '.join(IMAGE_SUFFIXES)})"
                    )
                files.extend(InputFile(p, video=False) for p in found)
            elif path.exists():
                files.append(InputFile(path, video=is_video(path)))
            else:
                raise DataError(f"{path}: no such file or folder")
        except DataError as e:
            if not skip_bad:
                raise
            bad.append((given, _reason(e, given)))
    return files


def _reason(error: BaseException, name: str) -> str:
    """The message of an error about ``name`` without the name in front."""
    text = " ".join(str(error).split())
    return text[len(name) + 2 :] if text.startswith(f"{name}: ") else text


def category_ids(exp: specs.Experiment, class_names: Sequence[str]) -> tuple[int, ...] | None:
    """The data set's category id of each of the model's labels, matched by class name: the
    shapes set numbers its categories from 1 (:data:`fdet.data.shapes.CATEGORIES`); a
    COCO-format set's ids are read from its validation annotation file. None when they cannot
    be told (the annotation file is unreadable, or its names are not the model's)."""
    if isinstance(exp.data, specs.ShapesData):
        from fdet.data.shapes import CATEGORIES

        if not all(n in CATEGORIES for n in class_names):
            return None
        return tuple(CATEGORIES.index(n) + 1 for n in class_names)
    if isinstance(exp.data, specs.CocoData):
        from fdet.eval.classes import category_ids_by_name

        try:
            with open(exp.data.val_annotations, encoding="utf-8") as f:
                cats = sorted((int(c["id"]), str(c["name"])) for c in json.load(f)["categories"])
            return category_ids_by_name(
                class_names, [n for _, n in cats], [i for i, _ in cats], source=""
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _annotation_sets(exp: specs.Experiment) -> list[tuple[Path, Path]]:
    """(image folder, annotation file) of the run's training and validation sets that are on
    disk. The shapes set is looked up in its cache, never generated."""
    data = exp.data
    if isinstance(data, specs.CocoData):
        return [
            (Path(data.train_images), Path(data.train_annotations)),
            (Path(data.val_images), Path(data.val_annotations)),
        ]
    if isinstance(data, specs.ShapesData):
        from fdet.data.shapes import default_cache_dir, find_set

        cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
        pattern = os.path.join(glob.escape(str(cache)), f"shapes-{data.image_size}px-*")
        for root in sorted(glob.glob(pattern)):
            paths = find_set(
                root,
                train=data.train_images,
                val=data.val_images,
                size=data.image_size,
                seed=data.seed,
                min_object_size=data.min_object_size,
                max_objects=data.max_objects,
            )
            if paths is not None:
                return [
                    (paths.train_images, paths.train_annotations),
                    (paths.val_images, paths.val_annotations),
                ]
    return []


def image_id_finder(exp: specs.Experiment) -> Any:
    """A function from an image path to its COCO image id in the run's data (training or
    validation set), or None when the image is not one of them: an image counts when it lies
    in the set's image folder under the ``file_name`` of an image entry. An annotation file is
    read only when an image lies in its folder."""
    sets = [(folder.resolve(), ann) for folder, ann in _annotation_sets(exp) if folder.is_dir()]
    loaded: dict[Path, dict[str, int]] = {}

    def find(path: Path) -> int | None:
        resolved = path.resolve()
        for folder, annotation_file in sets:
            if not resolved.is_relative_to(folder):
                continue
            if folder not in loaded:
                try:
                    with open(annotation_file, encoding="utf-8") as f:
                        entries = json.load(f)["images"]
                    loaded[folder] = {
                        os.path.normpath(str(e["file_name"])): int(e["id"]) for e in entries
                    }
                except (OSError, ValueError, KeyError, TypeError):
                    loaded[folder] = {}
            found = loaded[folder].get(str(resolved.relative_to(folder)))
            if found is not None:
                return found
        return None

    return find


def _records(
    prediction: Any, lut: Sequence[int] | None, base: dict[str, Any]
) -> list[dict[str, Any]]:
    """COCO result records of one image's detections."""
    import torch

    from fdet.eval.coco import encode_masks

    boxes = prediction.boxes.double()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()
    labels = prediction.labels.tolist()
    scores = prediction.scores.tolist()
    rles = encode_masks(prediction.masks) if prediction.masks is not None else None
    out = []
    for k, (bbox, label, score) in enumerate(zip(xywh, labels, scores, strict=True)):
        record = dict(base)
        record["category_id"] = int(lut[label]) if lut is not None else int(label)
        record["bbox"] = bbox
        record["score"] = score
        if rles is not None:
            record["segmentation"] = rles[k]
        out.append(record)
    return out


def _draw(image: Tensor, prediction: Any, names: Sequence[str]) -> Tensor:
    from fdet.viz.draw import draw_boxes

    return draw_boxes(
        image,
        prediction.boxes,
        labels=prediction.labels,
        scores=prediction.scores,
        names=names,
        masks=prediction.masks,
    )


def _save_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    from fdet.atomic import atomic_write

    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


class _Names:
    """Output file names, each stem once: ``x.png``, then ``x-2.png``, ``x-3.png`` ..."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, stem: str, suffix: str) -> str:
        name, n = f"{stem}{suffix}", 1
        while name.lower() in self.used:
            n += 1
            name = f"{stem}-{n}{suffix}"
        self.used.add(name.lower())
        return name


def cmd_infer(args: argparse.Namespace) -> int:
    """``fdet infer``: see :func:`add_infer_parser`."""
    from fdet.data.coco import DataError
    from fdet.inference.inputs import load_image
    from fdet.inference.predictor import Predictor

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; --out takes a folder")
    bad: list[tuple[str, str]] = []
    files = expand_inputs(args.inputs, skip_bad=args.skip_bad, bad=bad)
    tta = specs.load(args.tta, specs.TTA, name="TTA") if args.tta else None
    predictor = Predictor.from_checkpoint(
        args.run,
        device=args.device,
        ema=not args.no_ema,
        best=args.best,
        score_threshold=args.score_threshold,
        tta=tta,
        compile=args.compile,
    )
    exp = predictor.experiment
    names = predictor.class_names
    lut = category_ids(exp, names)
    if lut is None:
        print(
            "fdet infer: warning: the category ids of the run's data cannot be told; "
            "category_id holds the model's label (0 to K-1)",
            file=sys.stderr,
        )
    find_image_id = image_id_finder(exp)
    out.mkdir(parents=True, exist_ok=True)
    images = [f for f in files if not f.video]
    videos = [f for f in files if f.video]
    bar = _progress(len(images), args)
    output_names = _Names()
    records: list[dict[str, Any]] = []
    counts = {"images": 0, "frames": 0, "detections": 0}

    def read_images() -> Iterator[Tensor]:
        for f in images:
            try:
                image = load_image(f.path)
            except DataError as e:
                if not args.skip_bad:
                    raise
                bad.append((str(f.path), _reason(e, str(f.path))))
                bar.update(1)
                continue
            good.append(f)
            pictures.append(image)
            yield image

    good: deque[InputFile] = deque()  # read, awaiting their predictions (which come in order)
    pictures: deque[Tensor] = deque()
    for prediction in predictor.predict_iter(read_images(), batch_size=args.batch_size):
        f, image = good.popleft(), pictures.popleft()
        base: dict[str, Any] = {"file_name": str(f.path)}
        image_id = find_image_id(f.path)
        if image_id is not None:
            base["image_id"] = image_id
        found = _records(prediction, lut, base)
        records.extend(found)
        counts["images"] += 1
        counts["detections"] += len(found)
        if not args.no_draw:
            name = output_names(f.path.stem, ".png")
            _save_png(_draw(image, prediction, names), out / name)
        bar.update(1)
    bar.close()

    for f in videos:
        try:
            _run_video(f, predictor, args, lut, out, output_names, records, counts)
        except DataError as e:
            if not args.skip_bad:
                raise
            bad.append((str(f.path), _reason(e, str(f.path))))

    from fdet.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(records) + "\n")
    what = f"{counts['images']} image(s)"
    if videos:
        what += f", {counts['frames']} video frame(s)"
    print(
        f"fdet infer: {predictor.checkpoint}: {counts['detections']} detection(s) in {what}; "
        f"wrote {out / 'results.json'}",
        file=sys.stderr,
    )
    if bad:
        listed = "; ".join(f"{name} ({why})" for name, why in bad)
        print(f"fdet infer: skipped {len(bad)} bad inputs: {listed}", file=sys.stderr)
    return 0


def _run_video(
    f: InputFile,
    predictor: Any,
    args: argparse.Namespace,
    lut: Sequence[int] | None,
    out: Path,
    output_names: _Names,
    records: list[dict[str, Any]],
    counts: dict[str, int],
) -> None:
    """Every frame of a video through the predictor; its records carry ``frame`` (from 0),
    and its annotated frames go to ``OUT/<stem>.mp4``."""
    from fdet.inference.video import VideoWriter, read_frames, video_info

    info = video_info(f.path)
    bar = _progress(info.frames, args, unit="frame", desc=f.path.name)
    frames: deque[Tensor] = deque()

    def remember() -> Iterator[Tensor]:
        for frame in read_frames(f.path):
            frames.append(frame)
            yield frame

    writer = (
        None if args.no_draw else VideoWriter(out / output_names(f.path.stem, ".mp4"), fps=info.fps)
    )
    try:
        predictions = predictor.predict_iter(remember(), batch_size=args.batch_size)
        for index, prediction in enumerate(predictions):
            frame = frames.popleft()
            base = {"file_name": str(f.path), "frame": index}
            found = _records(prediction, lut, base)
            records.extend(found)
            counts["frames"] += 1
            counts["detections"] += len(found)
            if writer is not None:
                writer.write(_draw(frame, prediction, predictor.class_names))
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, args: argparse.Namespace, *, unit: str = "image", desc: str = "") -> Any:
    """A tqdm bar on stderr for more than one item, when stderr is a terminal and
    ``--no-progress`` is not given."""
    if args.no_progress or total == 1 or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total or None, unit=unit, desc=desc or None, file=sys.stderr, dynamic_ncols=True
    )


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {number}")
    return number


def add_infer_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``infer`` subcommand to the ``fdet`` command's subparsers ``sub``."""
    p = sub.add_parser(
        "infer",
        help="detect objects in image files, folders of images and videos",
        description="Run a trained run on images and videos: OUT/results.json (COCO results) "
        "and an annotated copy of each input.",
    )
    p.add_argument(
        "run", help="a run folder (its newest checkpoints/iter_N.pt) or a checkpoint file"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="an image file, a folder of images (not its subfolders), or a video "
        "(.mp4, .avi, .mov, .mkv, .webm)",
    )
    p.add_argument("--out", required=True, help="the output folder (made if missing)")
    p.add_argument(
        "--score-threshold",
        type=_probability,
        default=0.0,
        help="leave out detections scoring below this (default 0: the model's own threshold)",
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=8,
        help="images a forward pass, or 'auto' (CUDA: from free memory; default 8)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="pass over inputs that cannot be read, count them and list them at the end",
    )
    p.add_argument(
        "--no-ema", action="store_true", help="the raw weights even where the run has EMA ones"
    )
    p.add_argument("--best", action="store_true", help="a run folder's checkpoints/best.pt")
    p.add_argument("--tta", metavar="FILE", help="a TTA spec file: test-time augmentation")
    p.add_argument("--compile", action="store_true", help="run the network through torch.compile")
    p.add_argument("--no-draw", action="store_true", help="write results.json only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_infer)
    return p
