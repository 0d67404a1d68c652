"""Feature maps: the summary is the neck's output (hooked during the model's own forward), and
the PNG has one row a level."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from PIL import Image

from fdet import build
from fdet.analysis.features import feature_maps, feature_summary
from fdet.specs.loading import load

SHAPES = Path(__file__).resolve().parents[2] / "specs" / "shapes"


def tiny_model(file: str) -> torch.nn.Module:
    """The model of ``specs/shapes/<file>`` with a backbone of width 16, random weights."""
    spec = load(SHAPES / file, name="MODEL")
    spec = attrs.evolve(spec, backbone=attrs.evolve(spec.backbone, width=16))
    torch.manual_seed(0)
    return build(spec).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=generator)


def hooked_levels(model: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """The neck's output when the whole model runs on ``image`` (64 × 80) padded to 64 × 96
    (multiples of 32), caught by a forward hook."""
    caught: list[torch.Tensor] = []

    def hook(module, args, output):
        maps = [output] if isinstance(output, torch.Tensor) else list(output)
        caught.extend(m.detach().clone() for m in maps)

    x = torch.nn.functional.pad(image.float(), (0, 96 - image.shape[-1], 0, 64 - image.shape[-2]))
    handle = model.neck.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x[None])
    finally:
        handle.remove()
    return caught


@pytest.mark.parametrize(
    ("file", "strides"),
    [
        ("retinanet_r18_fpn.py", (8, 16, 32)),
        ("fcos_r18_fpn.py", (8, 16, 32)),
        ("faster_rcnn_r18_fpn.py", (8, 16, 32)),
        ("centernet_r18.py", (4,)),
    ],
)
def test_summary_is_the_hooked_neck_output(
    file: str, strides: tuple[int, ...], image: torch.Tensor
) -> None:
    model = tiny_model(file)
    levels = hooked_levels(model, image)
    summary = feature_summary(model, image, top_channels=2)
    assert [s.stride for s in summary] == list(strides)
    assert [s.level for s in summary] == list(range(len(strides)))
    assert len(levels) == len(summary)
    for s, level in zip(summary, levels):
        assert level.shape[-2:] == (64 // s.stride, 96 // s.stride)
        torch.testing.assert_close(s.mean_map, level[0].mean(dim=0))
        means = level[0].mean(dim=(1, 2))
        expected = torch.argsort(means, descending=True)[:2]
        assert s.top_channels == tuple(expected.tolist())
        assert means[s.top_channels[0]] >= means[s.top_channels[1]]
        torch.testing.assert_close(s.top_maps, level[0][list(s.top_channels)])
    assert not model.training  # left as found


def test_training_flag_is_restored(image: torch.Tensor) -> None:
    model = tiny_model("retinanet_r18_fpn.py").train()
    feature_summary(model, image)
    assert model.training


@pytest.mark.parametrize("file", ["retinanet_r18_fpn.py", "centernet_r18.py"])
def test_feature_maps_png_has_a_row_per_level(
    file: str, image: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model(file)
    rows = len(feature_summary(model, image))
    path = feature_maps(model, image, tmp_path / "sub" / "features.png", top_channels=3)
    assert path == tmp_path / "sub" / "features.png"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert height == round(240 * rows)  # 2.4 inches a row at 100 dpi
    assert width == round((2.2 * 4 * 80 / 64 + 0.4) * 100)  # mean + 3 channels
    assert not list(tmp_path.glob("sub/*.tmp*"))


def test_bad_input_is_named(image: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("retinanet_r18_fpn.py")
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        feature_summary(model, image.float())
    with pytest.raises(TypeError, match="no backbone or neck"):
        feature_summary(torch.nn.Linear(2, 2), image)
    with pytest.raises(ValueError, match="2 names for the neck's 3 levels"):
        feature_maps(model, image, tmp_path / "f.png", names=["a", "b"])


def test_feature_maps_of_a_trained_run(tiny_run: Path, tmp_path: Path) -> None:
    from fdet.train.data import make_datasets
    from fdet.train.run_dir import load_run

    exp, model = load_run(tiny_run)
    image = make_datasets(exp, with_train=False).val[0].image  # as the validation resize gives
    divisor = exp.val_transforms.pad_divisor
    summary = feature_summary(model, image, pad_divisor=divisor)
    height, width = image.shape[-2:]
    padded = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
    assert [s.stride for s in summary] == [8, 16, 32]
    for s in summary:
        assert s.mean_map.shape == (padded[0] // s.stride, padded[1] // s.stride)
        assert torch.isfinite(s.mean_map).all()
    path = feature_maps(model, image, tmp_path / "features.png", pad_divisor=divisor)
    with Image.open(path) as png:
        assert png.size[1] == 240 * len(summary)
