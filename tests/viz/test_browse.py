"""`fdet data browse`: the gallery shows the samples training reads first, transformed, with
their own boxes drawn; it is reproducible; COCO files work with --images; bad input is one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdet import specs
from fdet.cli import main
from fdet.data.shapes import generate
from fdet.train.data import experiment_loader, make_datasets
from fdet.viz.browse import browse, open_source
from fdet.viz.draw import label_color

SPEC = Path(__file__).resolve().parents[2] / "specs" / "shapes" / "retinanet_r18_fpn.py"
FDET = Path(sys.executable).parent / "fdet"
FIGURE = re.compile(
    r'<figure data-index="(\d+)" data-image-id="(\d+)"><a href="([^"]+)"><img src="([^"]+)"'
    r'.*?data-objects="(\d+)".*?data-width="(\d+)" data-height="(\d+)"',
    re.S,
)


def overrides(cache: Path) -> list[str]:
    """A shapes experiment of 64² images, resized to 96² and always flipped for training, so
    that drawn boxes differ from the stored ones."""
    sets = {
        "data.train_images": 8,
        "data.val_images": 3,
        "data.image_size": 64,
        "data.min_object_size": 8,
        "data.cache_dir": str(cache),
        "train_transforms.min_size": [96],
        "train_transforms.max_size": 96,
        "train_transforms.hflip_prob": 1.0,
        "batch_size": 4,
        "num_workers": 0,
        "seed": 5,
    }
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browse-cache")


def figures(index_html: Path) -> list[tuple[int, int, str, int, int, int]]:
    """(index, image id, png, objects, width, height) of each thumbnail of a gallery."""
    found = []
    for index, image_id, href, src, objects, width, height in FIGURE.findall(
        index_html.read_text()
    ):
        assert href == src
        found.append((int(index), int(image_id), src, int(objects), int(width), int(height)))
    return found


def edge_hits(pixels: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> int:
    """Boxes with the midpoint of at least one edge in their label's colour."""
    height, width = pixels.shape[:2]
    hits = 0
    for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
        xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
        points = [(ym, x1), (ym, min(x2, width - 1)), (y1, xm), (min(y2, height - 1), xm)]
        color = label_color(int(label))
        hits += any(tuple(pixels[y, x]) == color for y, x in points)
    return hits


def test_gallery_shows_what_training_reads_first(cache: Path, tmp_path: Path) -> None:
    source = open_source(SPEC, overrides=overrides(cache))
    index_html = browse(
        source.dataset, tmp_path / "g", count=3, seed=source.seed, class_names=source.class_names
    )
    shown = figures(index_html)
    assert len(shown) == 3
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == sorted(s[2] for s in shown)

    # the first batch of the real training loader of the same experiment
    exp = specs.apply_overrides(specs.load(SPEC, specs.Experiment), overrides(cache))
    train = make_datasets(exp).train
    batch = next(iter(experiment_loader(exp, train, train=True)))
    assert [s[1] for s in shown] == batch.image_ids[:3].tolist()
    total = hits = stored_hits = 0
    for b, (index, image_id, png, objects, width, height) in enumerate(shown):
        valid = batch.gt_valid[b]
        boxes, labels = batch.gt_boxes[b][valid].numpy(), batch.gt_labels[b][valid].numpy()
        assert objects == int(valid.sum()) > 0  # the caption counts the sample's objects
        image = Image.open(tmp_path / "g" / png)
        assert image.size == (width, height) == tuple(batch.image_sizes[b].flip(0).tolist())
        assert image.size == (96, 96)  # resized from 64²
        pixels = np.asarray(image.convert("RGB"))
        total += len(boxes)
        hits += edge_hits(pixels, boxes, labels)
        stored = train.read(index)  # the same image's boxes before the transforms
        assert stored.image_id == image_id
        stored_hits += edge_hits(pixels, stored.boxes.numpy(), stored.labels.numpy())
    # boxes drawn over each other hide some edges; the stored (unflipped, 64²) boxes are not
    # what was drawn
    assert hits >= 0.8 * total, (hits, total)
    assert stored_hits <= 0.3 * total, (stored_hits, total)


def test_same_seed_same_files_and_val_split(cache: Path, tmp_path: Path) -> None:
    def run(out: str, *extra: str) -> int:
        args = ["data", "browse", str(SPEC), "--out", str(tmp_path / out), "--count", "4"]
        return main(args + [x for o in overrides(cache) for x in ("--set", o)] + list(extra))

    assert run("a", "--seed", "3") == 0
    assert run("b", "--seed", "3") == 0
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 5
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert run("a", "--seed", "4") == 0  # a gallery is written over; another order
    assert figures(tmp_path / "a" / "index.html") != figures(tmp_path / "b" / "index.html")
    assert len(list((tmp_path / "a").glob("*.png"))) == 4

    # all 3 val images, resized by the spec's val_transforms (128²); none of the training flip
    assert run("v", "--split", "val", "--count", "10") == 0
    shown = figures(tmp_path / "v" / "index.html")
    assert sorted(s[1] for s in shown) == [1, 2, 3]
    assert {(s[4], s[5]) for s in shown} == {(128, 128)}
    assert run("n", "--no-transforms", "--count", "2") == 0  # as stored: 64²
    assert {(s[4], s[5]) for s in figures(tmp_path / "n" / "index.html")} == {(64, 64)}


def test_coco_file_with_images_through_the_installed_command(tmp_path: Path) -> None:
    if not FDET.is_file():
        pytest.skip(f"the fdet command is not installed beside {sys.executable}")
    paths = generate(tmp_path / "set", train=0, val=3, size=48, seed=2, min_object_size=6)
    proc = subprocess.run(
        [str(FDET), "data", "browse", str(paths.val_annotations), "--images",
         str(paths.val_images), "--out", str(tmp_path / "g"), "--count", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fdet data browse: wrote {tmp_path / 'g' / 'index.html'}"
    data = json.loads(paths.val_annotations.read_text())
    per_image = Counter(a["image_id"] for a in data["annotations"])
    entries = {im["id"]: im for im in data["images"]}
    shown = figures(tmp_path / "g" / "index.html")
    assert len(shown) == 2 == len(list((tmp_path / "g").glob("*.png")))
    for _, image_id, png, objects, width, height in shown:
        assert objects == per_image[image_id]  # hand count from the annotation file
        assert (width, height) == (entries[image_id]["width"], entries[image_id]["height"])
        assert Image.open(tmp_path / "g" / png).size == (48, 48)  # no transforms
        assert entries[image_id]["file_name"] in (tmp_path / "g" / "index.html").read_text()


def error_of(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["data", "browse", *args]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdet data: error: "), err
    return lines[0]


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "g")]
    missing = tmp_path / "nope.json"
    assert f"{missing}: no such file" in error_of([str(missing), *out], capsys)

    not_coco = tmp_path / "other.json"
    not_coco.write_text('{"foo": 1}')
    line = error_of([str(not_coco), *out], capsys)
    assert f"{not_coco}: neither a COCO annotation file" in line

    model_only = tmp_path / "model.py"
    model_only.write_text(f"import runpy\nMODEL = runpy.run_path({str(SPEC)!r})['MODEL']\n")
    line = error_of([str(model_only), *out], capsys)
    assert str(model_only) in line and "holds a RetinaNet, not an experiment" in line

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    line = error_of([str(empty), "--images", str(tmp_path), *out], capsys)
    assert f"{empty}: has no images to browse" in line
    assert "give its image folder, --images" in error_of([str(empty), *out], capsys)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    paths = generate(tmp_path / "set", train=0, val=1, size=32, seed=1, min_object_size=4)
    coco = [str(paths.val_annotations), "--images", str(paths.val_images)]
    line = error_of([*coco, "--out", str(taken)], capsys)
    assert f"{taken}: is not empty and holds no gallery" in line
    assert (taken / "notes.txt").read_text() == "mine"


def test_json_spec_gives_the_same_gallery(cache: Path, tmp_path: Path) -> None:
    exp = specs.apply_overrides(specs.load(SPEC, specs.Experiment), overrides(cache))
    spec_json = tmp_path / "exp.json"
    spec_json.write_text(specs.to_json(exp))
    for source, out in (
        (open_source(spec_json), "j"),
        (open_source(SPEC, overrides=overrides(cache)), "p"),
    ):
        browse(source.dataset, tmp_path / out, count=2, seed=source.seed, title="t")
    pngs = sorted((tmp_path / "j").glob("*.png"))
    assert len(pngs) == 2
    assert [p.read_bytes() for p in pngs] == [(tmp_path / "p" / p.name).read_bytes() for p in pngs]
