"""The Predictor against fdet's evaluation path (COCO results of the same images), mixed inputs
against each input alone, EMA weights, masks at the original size, bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

import fdet
from fdet import specs
from fdet.data.coco import DataError
from fdet.data.loader import make_loader
from fdet.eval.evaluate import predict_coco
from fdet.inference import Prediction, Predictor
from fdet.train import load_run
from fdet.train.data import make_datasets
from tests.inference.conftest import MASK_RCNN_DETECTS, RETINANET_DETECTS, MakeTinyRun


@pytest.fixture(scope="module")
def retina_run(make_tiny_run: MakeTinyRun) -> Path:
    return make_tiny_run("retinanet_r18_fpn.py", RETINANET_DETECTS)


@pytest.fixture(scope="module")
def predictor(retina_run: Path) -> Predictor:
    return Predictor.from_checkpoint(retina_run)


def assert_same(a: Prediction, b: Prediction, atol: float = 1e-4) -> None:
    assert a.image_size == b.image_size
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    assert torch.equal(a.labels, b.labels) and a.names == b.names


def coco_records_by_image(run: Path) -> tuple[Any, dict[int, list[dict[str, Any]]]]:
    """The validation set of a run and the COCO results ``fdet eval`` computes for it."""
    exp, model = load_run(run)
    dataset = make_datasets(exp, with_train=False).val
    loader = make_loader(
        dataset,
        batch_size=2,
        shuffle=False,
        seed=0,
        num_workers=0,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
    )
    results = predict_coco(model, loader, dataset).results
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return dataset, by_image


@pytest.mark.parametrize("family", ["retinanet", "mask_rcnn"])
def test_results_equal_the_evaluation_path(
    family: str, make_tiny_run: MakeTinyRun, tmp_path: Path
) -> None:
    if family == "retinanet":
        run = make_tiny_run("retinanet_r18_fpn.py", RETINANET_DETECTS)
    else:
        run = make_tiny_run("mask_rcnn_r18_fpn.py", MASK_RCNN_DETECTS)
    dataset, by_image = coco_records_by_image(run)
    predictor = Predictor.from_checkpoint(run)
    images = dataset.coco.imgs
    ids = sorted(images)
    paths = [Path(dataset.images_dir) / images[i]["file_name"] for i in ids]
    results = predictor(paths, batch_size=3)
    category_of_label = sorted(dataset.coco.cats)  # label k is the k-th category by id
    compared = 0
    for image_id, path, got in zip(ids, paths, results, strict=True):
        want = by_image.get(image_id, [])
        assert got.source == str(path) and got.error is None
        assert got.image_size == (images[image_id]["height"], images[image_id]["width"])
        assert len(got) == len(want)
        if not want:
            continue
        xyxy = got.boxes.double()
        xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), 1)
        expected = torch.tensor([r["bbox"] for r in want], dtype=torch.float64)
        torch.testing.assert_close(xywh, expected, atol=1e-3, rtol=0)
        scores = torch.tensor([r["score"] for r in want], dtype=torch.float32)
        torch.testing.assert_close(got.scores, scores, atol=1e-5, rtol=0)
        assert [category_of_label[k] for k in got.labels.tolist()] == [
            r["category_id"] for r in want
        ]
        assert got.names == tuple(predictor.class_names[k] for k in got.labels.tolist())
        if family == "mask_rcnn":
            assert got.masks is not None and got.masks.dtype == torch.bool
            assert got.masks.shape == (len(got), *got.image_size)
            decoded = np.stack([mask_utils.decode(r["segmentation"]) for r in want])
            assert np.array_equal(got.masks.numpy(), decoded.astype(bool))
        else:
            assert got.masks is None
        compared += len(want)
    assert compared > 0  # detections were compared, not only empty lists


def test_masks_have_each_original_size(make_tiny_run: MakeTinyRun) -> None:
    predictor = Predictor.from_checkpoint(make_tiny_run("mask_rcnn_r18_fpn.py", MASK_RCNN_DETECTS))
    rng = np.random.default_rng(0)
    sizes = [(50, 90), (64, 64), (33, 47)]
    results = predictor([rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes])
    for size, p in zip(sizes, results, strict=True):
        assert p.image_size == size
        assert p.masks is not None and p.masks.shape == (len(p), *size) and len(p) > 0
        # each mask lies within its box (pasted on the box in original pixels), give a pixel
        for mask, box in zip(p.masks, p.boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(ys):
                assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
                assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1


def inputs_of_every_kind(folder: Path) -> list[Any]:
    """One image of each kind, of different sizes."""
    rng = np.random.default_rng(3)

    def pixels(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    Image.fromarray(pixels(64, 64)).save(folder / "rgb.png")
    Image.fromarray(pixels(40, 72)[..., 0], mode="L").save(folder / "gray.png")
    deep = (pixels(48, 48)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    rgba = np.concatenate([pixels(70, 50), pixels(70, 50)[..., :1]], axis=2)
    return [
        folder / "rgb.png",
        Image.fromarray(pixels(80, 48)),
        pixels(64, 64),
        torch.from_numpy(pixels(30, 100)).permute(2, 0, 1),
        torch.from_numpy(pixels(64, 64)).permute(2, 0, 1).float(),
        str(folder / "gray.png"),
        rgba,
        folder / "deep.png",
    ]


def test_mixed_inputs_give_what_each_gives_alone(predictor: Predictor, tmp_path: Path) -> None:
    items = inputs_of_every_kind(tmp_path)
    together = predictor(items, batch_size=3)
    assert len(together) == len(items)
    for index, (item, got) in enumerate(zip(items, together, strict=True)):
        alone = predictor(item)
        assert len(alone) == 1
        assert_same(got, alone[0])
        name = str(item) if isinstance(item, (str, Path)) else f"input {index}"
        assert got.source == name
    # batch size and "auto" (on the CPU: a fixed size) change nothing
    for batch_size in (1, "auto"):
        for a, b in zip(predictor(items, batch_size=batch_size), together, strict=True):
            assert_same(a, b)
    # the conversions: gray, 16-bit and RGBA inputs equal their RGB readings
    rgb_of = {
        5: np.repeat(np.asarray(Image.open(items[5]))[..., None], 3, axis=2),
        6: items[6][..., :3],
        7: np.repeat((np.asarray(Image.open(items[7])).astype(np.uint16) >> 8)[..., None], 3, 2),
    }
    for index, rgb in rgb_of.items():
        assert_same(predictor(rgb.astype(np.uint8))[0], together[index])


def test_boxes_are_in_original_pixels(predictor: Predictor) -> None:
    """A 40×60 image is resized to 64×96 (shorter side 96, longer at most 96: factor 1.6); the
    same image resized to 64×96 beforehand reaches the network unchanged. The same input, so
    the small image's boxes are the other's divided by 1.6."""
    small = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    chw = torch.from_numpy(small).permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(
        chw[None], size=(64, 96), mode="bilinear", antialias=True, align_corners=False
    )[0]
    a, b = predictor([small, resized])
    assert (a.image_size, b.image_size) == ((40, 60), (64, 96))
    assert len(a) > 0
    torch.testing.assert_close(a.boxes, b.boxes / 1.6, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(a.scores, b.scores)
    assert float(a.boxes[:, 2].max()) <= 60 + 1e-3 and float(a.boxes[:, 3].max()) <= 40 + 1e-3


def test_score_threshold_drops_low_scores(retina_run: Path, predictor: Predictor) -> None:
    image = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    everything = predictor(image)[0]
    cut = float(everything.scores.median())
    strict = Predictor.from_checkpoint(retina_run, score_threshold=cut)(image)[0]
    keep = everything.scores >= cut
    assert 0 < len(strict) < len(everything)
    torch.testing.assert_close(strict.boxes, everything.boxes[keep])


def test_ema_option_loads_the_raw_or_the_averaged_weights(make_tiny_run: MakeTinyRun) -> None:
    run = make_tiny_run(
        "retinanet_r18_fpn.py",
        {**RETINANET_DETECTS, "ema": {"decay": 0.5, "warmup_updates": 0}},
    )
    checkpoint = sorted((run / "checkpoints").glob("iter_*.pt"))[-1]
    entries = torch.load(checkpoint, weights_only=True)
    assert entries.get("ema") is not None
    averaged = Predictor.from_checkpoint(run).model.state_dict()
    raw = Predictor.from_checkpoint(run, ema=False).model.state_dict()
    for name, tensor in entries["model"].items():
        assert torch.equal(raw[name], tensor)  # the raw weights, exactly as saved
    differ = [n for n, t in entries["model"].items() if t.is_floating_point()]
    assert any(not torch.equal(averaged[n], raw[n]) for n in differ)
    _, ema_model = load_run(run)  # load_run's default: the EMA weights
    for name, tensor in ema_model.state_dict().items():
        assert torch.equal(averaged[name], tensor)


def test_a_bad_input_is_named_and_skip_bad_keeps_the_others(
    predictor: Predictor, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    good = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    items: list[Any] = [good[0], bad, good[1], good[2]]
    with pytest.raises(DataError, match=f"^{bad}: not a readable image"):
        predictor(items)
    results = predictor(items, skip_bad=True, batch_size=2)
    assert [r.error is None for r in results] == [True, False, True, True]
    assert results[1].source == str(bad) and "not a readable image" in str(results[1].error)
    assert len(results[1]) == 0
    alone = predictor(good)
    for got, want in zip([results[0], results[2], results[3]], alone, strict=True):
        assert_same(got, want)


def test_predict_iter_windows_keep_the_order(predictor: Predictor) -> None:
    rng = np.random.default_rng(8)
    sizes = [(64, 64), (30, 90), (64, 64), (90, 30), (64, 64)]
    items = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    whole = predictor(items)
    streamed = list(predictor.predict_iter(iter(items), batch_size=2, window=2))
    for a, b in zip(streamed, whole, strict=True):
        assert_same(a, b)
    assert [p.image_size for p in streamed] == sizes


def test_bad_arguments(predictor: Predictor, retina_run: Path) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    for batch_size in (0, -1, "big", 1.5, True):
        with pytest.raises(ValueError, match="batch_size: must be a positive integer or 'auto'"):
            predictor(image, batch_size=batch_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"score_threshold: must lie in \[0, 1\]"):
        Predictor.from_checkpoint(retina_run, score_threshold=2.0)
    with pytest.raises(FileNotFoundError, match="no run folder or checkpoint file"):
        Predictor.from_checkpoint(retina_run / "nothing")


def test_fdet_exposes_the_predictor_lazily() -> None:
    assert fdet.Predictor is Predictor
    with pytest.raises(AttributeError, match="no attribute 'Predicter'"):
        _ = fdet.Predicter


def test_tta_detections_come_from_predict_tta(predictor: Predictor, retina_run: Path) -> None:
    from fdet.data.collate import collate
    from fdet.inference.tta import predict_tta

    tta = specs.TTA(flip=True, scales=(1.0,))
    with_tta = Predictor.from_checkpoint(retina_run, tta=tta)
    image = np.random.default_rng(9).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    got = with_tta(image)[0]
    # by hand: the run's validation resize, one padded batch, predict_tta, back to the original
    sample = with_tta._sample(torch.from_numpy(image).permute(2, 0, 1).contiguous(), 0)
    batch = collate([sample], pad_divisor=with_tta.pad_divisor)
    with torch.inference_mode():
        det = predict_tta(
            with_tta.model, batch.images, batch.image_sizes, tta, size_divisor=with_tta.pad_divisor
        )
    keep = det.valid[0]
    sy, sx = batch.scales[0].tolist()
    want = det.boxes[0][keep] / torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(got.boxes, want.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.scores, det.scores[0][keep])
    plain = predictor(image)[0]
    assert len(got) > 0 and not (
        len(got) == len(plain) and torch.allclose(got.boxes, plain.boxes)
    )  # the flipped view changed something


@pytest.mark.compile
def test_compiled_equals_eager(retina_run: Path, predictor: Predictor) -> None:
    compiled = Predictor.from_checkpoint(retina_run, compile=True)
    rng = np.random.default_rng(10)
    items = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    for a, b in zip(compiled(items), predictor(items), strict=True):
        assert_same(a, b, atol=1e-3)


def test_auto_batch_size_halves_on_out_of_memory(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that holds at most two images a batch: "auto" (4 on a CPU) halves and retries;
    a fixed batch size does not."""
    rng = np.random.default_rng(11)
    items = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    want = predictor(items, batch_size=1)
    run_batch = predictor._run_batch
    sizes: list[int] = []

    def small_device(part: list[Any]) -> list[Prediction]:
        sizes.append(len(part))
        if len(part) > 2:
            raise torch.cuda.OutOfMemoryError("out of memory (pretend)")
        return run_batch(part)

    monkeypatch.setattr(predictor, "_run_batch", small_device)
    for got, expected in zip(predictor(items, batch_size="auto"), want, strict=True):
        assert_same(got, expected)
    assert sizes == [4, 2, 2, 1]  # 4 refused, then 2 + 2 + the last one
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor(items, batch_size=4)
