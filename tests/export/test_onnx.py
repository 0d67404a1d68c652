"""ONNX export: the file passes onnx.checker, and onnxruntime gives PyTorch's detections (same
counts and labels, boxes within 1e-3, scores within 1e-4) for every dense family and Faster
R-CNN (Cascade R-CNN: test_cli_export.py), at batch sizes 1, 3 and 6 from one session; an
image without detections and a model without any stay empty."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fdet import build, specs
from fdet.export import ExportError, export_onnx
from fdet.export.graph import default_image_size
from tests.export.conftest import (
    EXPORTED,
    SHAPES,
    SIZE,
    graph_outputs,
    make_case,
    match_detections,
    tiny_spec,
)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, images: torch.Tensor) -> list[np.ndarray]:
    return sess.run(None, {"images": images.numpy().astype(np.float32)})


@pytest.mark.parametrize("name", EXPORTED)
def test_onnxruntime_gives_the_detections_of_pytorch(name: str, tmp_path: Path) -> None:
    case = make_case(name)
    path = export_onnx(
        case.model, tmp_path / "model.onnx", image_size=(SIZE, SIZE), dynamic_batch=True
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "valid"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fdet.model"] == type(case.model).__name__
    assert meta["fdet.image_size"] == f"{SIZE},{SIZE}"

    sess = session(path)
    (images_input,) = sess.get_inputs()
    assert images_input.type == "tensor(float)" and images_input.shape[1:] == [3, SIZE, SIZE]
    assert not isinstance(images_input.shape[0], int)  # the batch dimension is dynamic
    expected = graph_outputs(case.model, case.images)
    got = run(sess, case.images)
    assert [a.dtype for a in got] == [np.float32, np.float32, np.int64, np.bool_]
    assert got[0].shape == (len(case.images), 300, 4)
    compared = match_detections(got, expected)
    assert compared >= 20 * (len(case.images) - 1)
    if case.empty is not None:
        assert not got[3][case.empty].any()
    # other batch sizes, same session: each image's detections do not depend on the others
    for index in ([4], [0, 2, 5]):
        got = run(sess, case.images[index])
        match_detections(got, tuple(t[index] for t in expected))


def test_a_model_without_detections_at_a_fixed_batch_and_opset(tmp_path: Path) -> None:
    """Every score below the threshold: ONNX NMS gets no candidate, and every slot is padding.
    Exported at batch 1 and opset 18."""
    torch.manual_seed(0)
    model = build(tiny_spec("retinanet_r18_fpn")).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-30.0)
    path = export_onnx(model, tmp_path / "none.onnx", image_size=(SIZE, 2 * SIZE), opset=18)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    sess = session(path)
    assert sess.get_inputs()[0].shape == [1, 3, SIZE, 2 * SIZE]
    image = torch.rand(1, 3, SIZE, 2 * SIZE) * 255
    got = run(sess, image)
    expected = graph_outputs(model, image)
    assert not expected[3].any()
    assert match_detections(got, expected) == 0
    assert got[0].shape == (1, 100, 4) and not got[0].any() and not got[1].any()


def test_instance_masks_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    model = build(tiny_spec("mask_rcnn_r18_fpn")).eval()
    with pytest.raises(ExportError, match="masks, which are not exported"):
        export_onnx(model, tmp_path / "mask.onnx", image_size=(SIZE, SIZE))
    assert not (tmp_path / "mask.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": (SIZE, SIZE), "opset": 11}, "opset 18 or later"),
        ({"image_size": (SIZE, 0)}, "image_size"),
        ({"image_size": (SIZE,)}, "image_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str, tmp_path: Path) -> None:
    model = build(tiny_spec("retinanet_r18_fpn")).eval()
    with pytest.raises(ExportError, match=message):
        export_onnx(model, tmp_path / "x.onnx", **kwargs)


def test_default_image_size_holds_every_resized_image() -> None:
    shapes = specs.load(SHAPES / "retinanet_r18_fpn.py", specs.Experiment)
    assert default_image_size(shapes.val_transforms) == (128, 128)
    coco = attrs.evolve(shapes.val_transforms, min_size=(800,), max_size=1333, pad_divisor=32)
    assert default_image_size(coco) == (1344, 1344)
    odd = attrs.evolve(shapes.val_transforms, max_size=100, pad_divisor=32)
    assert default_image_size(odd) == (128, 128)
