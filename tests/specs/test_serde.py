"""Specs: construction-time validation, the JSON round trip, strict JSON reading."""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, assume, given, settings

from fdet import specs
from fdet.specs import Spec, SpecError


def _strategy_for(t: Any) -> st.SearchStrategy[Any]:
    """Values of a spec field's type (valid or not: construction decides)."""
    origin = get_origin(t)
    if t is bool:
        return st.booleans()
    if t is int:
        return st.integers(-2, 9)
    if t is float:
        return st.floats(-1.0, 600.0, allow_nan=False, allow_infinity=False) | st.sampled_from(
            [0.0, 0.25, 0.5, 1.0, 1 / 3, 1e-7]
        )
    if t is str:
        return st.text(max_size=8)
    if origin is Literal:
        return st.sampled_from(get_args(t))
    if origin is tuple:
        args = get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            items = st.lists(_strategy_for(args[0]), min_size=1, max_size=5).map(tuple)
            if args[0] is int:  # levels and strides are mostly runs or powers of two
                runs = st.builds(
                    lambda a, n: tuple(range(a, a + n)), st.integers(2, 6), st.integers(1, 5)
                )
                powers = st.builds(
                    lambda a, n: tuple(2 ** (a + i) for i in range(n)),
                    st.integers(2, 4),
                    st.integers(1, 5),
                )
                return items | runs | powers
            return items
        return st.tuples(*(_strategy_for(a) for a in args))
    if origin in (Union, types.UnionType):
        return st.one_of(*(_strategy_for(a) for a in get_args(t)))
    if t is type(None):
        return st.none()
    if isinstance(t, type) and issubclass(t, Spec):
        if attrs.has(t):
            return spec_instances(t)
        # an abstract base: any of fdet's classes under it
        return st.one_of(*(spec_instances(c) for c in _fdet_subclasses(t)))
    raise NotImplementedError(t)


def _fdet_subclasses(base: type[Spec]) -> list[type[Spec]]:
    found = specs.concrete_subclasses(base).values()
    return sorted((c for c in found if c.__module__.startswith("fdet.")), key=lambda c: c.__name__)


def spec_instances(cls: type[Spec]) -> st.SearchStrategy[Spec]:
    attrs.resolve_types(cls)

    @st.composite
    def build(draw: st.DrawFn) -> Spec:
        kwargs = {}
        for f in attrs.fields(cls):
            if f.default is attrs.NOTHING or draw(st.booleans()):
                kwargs[f.name] = draw(_strategy_for(f.type))
        try:
            return cls(**kwargs)
        except SpecError:
            assume(False)
            raise AssertionError from None

    return build()


LEAF_SPECS = [
    specs.ResNet,
    specs.FPN,
    specs.RetinaHead,
    specs.FrozenBatchNorm,
    specs.BatchNorm,
    specs.GroupNorm,
    specs.Anchors,
    specs.MaxIoUAssigner,
    specs.DeltaXYWHCoder,
    specs.DensePostprocess,
    specs.Normalize,
    specs.SigmoidFocalLoss,
    specs.SmoothL1Loss,
    specs.L1Loss,
    specs.GIoULoss,
    specs.ShapesData,
    specs.CocoData,
    specs.Transforms,
    specs.SGD,
    specs.AdamW,
    specs.LinearWarmup,
    specs.ConstantWarmup,
    specs.StepDecay,
    specs.CosineDecay,
    specs.PolyDecay,
    specs.ConstantDecay,
    specs.Schedule,
    specs.EMA,
    specs.ParamGroups,
    # the dense families' parts
    specs.Points,
    specs.FCOSAssigner,
    specs.DistanceCoder,
    specs.FCOSHead,
    specs.ATSSAssigner,
    specs.ATSSHead,
    specs.GFLHead,
    specs.QualityFocalLoss,
    specs.DistributionFocalLoss,
    specs.CenterNetNeck,
    specs.CenterNetHead,
    specs.CenterNetPostprocess,
    specs.GaussianRadius,
    specs.HeatmapFocalLoss,
    # the two-stage family's parts
    specs.RPN,
    specs.Sampler,
    specs.RoIAlign,
    specs.BoxHead,
    specs.RoIPostprocess,
    specs.RoIHead,
    specs.MaskHead,
    # test-time augmentation
    specs.TTA,
    # semi-supervised training
    specs.StrongAugment,
    specs.UnlabeledImages,
    specs.SemiSupervised,
]
# drawn with valid parts in the tests below (RetinaNet, Experiment) and in each family's tests
ROOT_SPECS = [
    specs.RetinaNet,
    specs.Experiment,
    specs.FCOS,
    specs.ATSS,
    specs.GFL,
    specs.CenterNet,
    specs.FasterRCNN,
    specs.MaskRCNN,
    specs.CascadeRCNN,
]


def test_every_spec_class_is_covered() -> None:
    assert set(_fdet_subclasses(Spec)) == set(LEAF_SPECS) | set(ROOT_SPECS)


@pytest.mark.parametrize("cls", LEAF_SPECS, ids=lambda c: c.__name__)
@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_json_round_trip_is_exact(cls: type[Spec], data: st.DataObject) -> None:
    spec = data.draw(spec_instances(cls))
    text = specs.to_json(spec)
    back = specs.from_json(text)
    assert back == spec
    assert type(back) is type(spec)
    assert specs.to_json(back) == text


def _retinanet(**kw: Any) -> specs.RetinaNet:
    return specs.RetinaNet(**{"head": specs.RetinaHead(num_classes=3), **kw})


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(
    box_loss=_strategy_for(specs.BoxLoss),
    cls_loss=_strategy_for(specs.ClassificationLoss),
    norm=_strategy_for(specs.Norm),
    fpn_norm=_strategy_for(specs.Norm | None),
    head=spec_instances(specs.RetinaHead),
    schedule=spec_instances(specs.Schedule),
    optimizer=_strategy_for(specs.Optimizer),
)
def test_root_round_trip_with_fields_typed_by_bases(
    box_loss: specs.BoxLoss,
    cls_loss: specs.ClassificationLoss,
    norm: specs.Norm,
    fpn_norm: specs.Norm | None,
    head: specs.RetinaHead,
    schedule: specs.Schedule,
    optimizer: specs.Optimizer,
) -> None:
    try:
        model = _retinanet(
            box_loss=box_loss,
            cls_loss=cls_loss,
            backbone=specs.ResNet(norm=norm),
            neck=specs.FPN(norm=fpn_norm),
            head=head,
        )
        spec = specs.Experiment(
            model=model, schedule=schedule, optimizer=optimizer, iterations=100_000
        )
    except SpecError:
        assume(False)
        raise AssertionError from None
    text = specs.to_json(spec)
    assert specs.from_json(text) == spec
    assert specs.to_json(specs.from_json(text)) == text


def test_every_spec_class_is_tagged_by_its_name() -> None:
    spec = _retinanet()
    data = specs.to_dict(spec)
    assert data["schema_version"] == specs.SCHEMA_VERSION
    assert data["spec"]["type"] == "RetinaNet"
    assert data["spec"]["head"]["type"] == "RetinaHead"
    assert data["spec"]["box_loss"]["type"] == "L1Loss"
    for name, cls in specs.spec_types().items():
        assert cls.__name__ == name


def _error(data: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        specs.from_dict(data)
    return info.value


def _doc() -> dict[str, Any]:
    return specs.to_dict(_retinanet())


def test_misspelled_key_names_path_and_allowed_keys() -> None:
    data = _doc()
    data["spec"]["head"]["num_clases"] = 3
    err = _error(data)
    assert err.path == "head.num_clases"
    assert "num_classes" in str(err) and "did you mean" in str(err)
    for key in ("num_convs", "channels", "prior_prob"):
        assert key in str(err)


def test_unknown_key_at_root_and_top_level() -> None:
    data = _doc()
    data["spec"]["heads"] = {}
    assert _error(data).path == "heads"
    data = _doc()
    data["version"] = 1
    assert "unknown top-level key 'version'" in str(_error(data))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("head", "num_classes"), "3", "expected an integer"),
        (("head", "num_classes"), 3.0, "expected an integer"),
        (("head", "num_classes"), True, "expected an integer"),
        (("head", "prior_prob"), "0.01", "expected a number"),
        (("anchors", "truncate_sizes"), 1, "expected true or false"),
        (("anchors", "ratios"), 0.5, "expected a list"),
        (("backbone", "depth"), 42, "must be one of"),
        (("backbone", "norm"), "batchnorm", "expected an object"),
        (("backbone", "norm", "groups"), 3, "unknown key in FrozenBatchNorm"),
        (("head", "norm"), {"groups": 8}, 'needs a "type" key, one of: BatchNorm, Fro'),
        (("coder", "means"), [0, 0, 0], "must have 4 values"),
        (("head", "num_classes"), 0, "must be > 0"),
        (("assigner", "neg_iou"), 0.7, "must be <= pos_iou"),
        (("neck",), [], "expected an object"),
    ],
)
def test_wrong_values_name_their_path(path: tuple[str, ...], value: Any, message: str) -> None:
    data = _doc()
    node = data["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    err = _error(data)
    assert err.path == ".".join(path)
    assert message in str(err)


def test_wrong_list_item_names_its_index() -> None:
    data = _doc()
    data["spec"]["anchors"]["ratios"][1] = "wide"
    err = _error(data)
    assert err.path == "anchors.ratios[1]"
    assert "expected a number" in str(err)


def test_missing_required_field() -> None:
    data = _doc()
    del data["spec"]["head"]["num_classes"]
    err = _error(data)
    assert err.path == "head.num_classes" and "missing required field" in str(err)


def test_missing_optional_field_takes_its_default() -> None:
    data = _doc()
    del data["spec"]["head"]["num_convs"]
    assert specs.from_dict(data).head.num_convs == specs.RetinaHead(num_classes=3).num_convs


def test_union_field_needs_a_known_type() -> None:
    data = _doc()
    data["spec"]["box_loss"] = {"type": "HuberLoss"}
    err = _error(data)
    assert err.path == "box_loss.type"
    assert "GIoULoss" in str(err) and "SmoothL1Loss" in str(err)
    data["spec"]["box_loss"] = {"beta": 0.1}
    assert 'needs a "type" key' in str(_error(data))
    data["spec"]["box_loss"] = {"type": "FPN"}  # a spec, but not a box loss
    assert _error(data).path == "box_loss.type"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("head.norm", {"type": "LayerNorm"}, "expected one of: BatchNorm, FrozenBatchNorm, Group"),
        ("cls_loss", {"type": "L1Loss"}, "expected one of: SigmoidFocalLoss"),
        ("backbone.norm", {"type": "Norm"}, "expected one of: BatchNorm, FrozenBatchNorm, Group"),
    ],
)
def test_field_typed_by_a_base_names_its_known_classes(
    field: str, value: dict[str, Any], message: str
) -> None:
    data = _doc()
    *parents, key = field.split(".")
    node = data["spec"]
    for parent in parents:
        node = node[parent]
    node[key] = value
    err = _error(data)
    assert err.path == f"{field}.type"
    assert message in str(err)


def test_wrong_type_tag_on_a_plain_field() -> None:
    data = _doc()
    data["spec"]["head"]["type"] = "FPN"
    err = _error(data)
    assert err.path == "head.type"


def test_cross_field_error_names_the_field() -> None:
    data = _doc()
    data["spec"]["anchors"]["strides"] = [8, 16, 32]
    data["spec"]["anchors"]["base_sizes"] = [32, 64, 128]
    err = _error(data)
    assert err.path == "anchors.strides"


def test_schema_version_checks() -> None:
    data = _doc()
    data["schema_version"] = specs.SCHEMA_VERSION + 1
    assert "newer fdet" in str(_error(data))
    del data["schema_version"]
    assert "schema_version" in str(_error(data))
    data["schema_version"] = "1"
    assert "positive integer" in str(_error(data))


def test_invalid_json_text_says_where() -> None:
    with pytest.raises(SpecError, match=r"invalid JSON at line 2 column"):
        specs.from_json('{"schema_version": 1,\n "spec": }', source="run/spec.json")
    with pytest.raises(SpecError, match=r"^run/spec.json: "):
        specs.from_json("[]", source="run/spec.json")


def test_expected_root_type_is_checked() -> None:
    text = specs.to_json(specs.FPN())
    with pytest.raises(SpecError, match="expected one of: RetinaNet"):
        specs.from_json(text, specs.RetinaNet)
    assert specs.from_json(text, specs.FPN) == specs.FPN()


@attrs.frozen(kw_only=True)
class UncheckedNumber(specs.Spec):
    """A spec class of one's own whose float field has no validator."""

    value: float = 0.0


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_with_their_path(number: float) -> None:
    with pytest.raises(SpecError, match=r"^min_box_size: must be (finite|>= 0)"):
        specs.DensePostprocess(min_box_size=number)
    with pytest.raises(SpecError, match=r"^lr: must be (finite|> 0)"):
        specs.SGD(lr=number)
    with pytest.raises(SpecError, match=r"^grad_clip_norm: must be a finite number > 0"):
        specs.Experiment(
            model=specs.RetinaNet(head=specs.RetinaHead(num_classes=2)), grad_clip_norm=number
        )
    # JSON as Python reads it (Infinity, NaN, 1e999): refused where it stands
    text = specs.to_json(specs.SGD()).replace('"lr": 0.01', f'"lr": {json.dumps(number)}')
    with pytest.raises(SpecError, match=r"^f\.json: lr: expected a finite number, got"):
        specs.from_json(text, source="f.json")
    overflow = specs.to_json(specs.SGD()).replace('"lr": 0.01', '"lr": 1e999')
    with pytest.raises(SpecError, match=r"^lr: expected a finite number, got inf"):
        specs.from_json(overflow)
    # a float field without a validator still cannot be written
    with pytest.raises(SpecError, match="cannot be written as JSON"):
        specs.to_json(UncheckedNumber(value=number))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: specs.RetinaHead(num_classes=-1), "num_classes"),
        (lambda: specs.RetinaHead(num_classes=2, prior_prob=1.0), "prior_prob"),
        (lambda: specs.ResNet(depth=20), "depth"),  # type: ignore[arg-type]
        (lambda: specs.ResNet(frozen_stages=5), "frozen_stages"),
        (lambda: specs.ResNet(out_levels=(5, 3)), "out_levels"),
        (lambda: specs.FPN(in_levels=(3, 5)), "in_levels"),
        (lambda: specs.FPN(out_levels=(6, 7)), "out_levels"),
        (lambda: specs.Anchors(ratios=(0.5, -1.0)), "ratios[1]"),
        (lambda: specs.Anchors(base_sizes=(32.0,)), "base_sizes"),
        (lambda: specs.DeltaXYWHCoder(stds=(1, 1, 0, 1)), "stds[2]"),
        (lambda: specs.DensePostprocess(nms_iou=1.5), "nms_iou"),
        (lambda: specs.MaxIoUAssigner(crowd_ioa=1.5), "crowd_ioa"),
        (lambda: specs.SigmoidFocalLoss(alpha=math.nan), "alpha"),
        (lambda: specs.SigmoidFocalLoss(alpha=math.inf), "alpha"),
        (lambda: specs.SigmoidFocalLoss(alpha=1.01), "alpha"),
        (lambda: specs.GroupNorm(groups=0), "groups"),
        (lambda: specs.ResNet(norm=specs.GroupNorm(groups=5)), "norm.groups"),
        (lambda: specs.ResNet(norm="bn"), "norm"),  # type: ignore[arg-type]
        (lambda: specs.FPN(channels=20, norm=specs.GroupNorm()), "norm.groups"),
        (
            lambda: specs.RetinaHead(num_classes=2, channels=24, norm=specs.GroupNorm(groups=16)),
            "norm.groups",
        ),
        (lambda: specs.StepDecay(milestones=(0.5, 0.25)), "milestones"),
        (lambda: specs.LinearWarmup(factor=2.0), "factor"),
        (lambda: specs.Schedule(decay="cosine"), "decay"),  # type: ignore[arg-type]
        (lambda: specs.Schedule(warmup=specs.CosineDecay()), "warmup"),  # type: ignore[arg-type]
        (lambda: _retinanet(box_loss=specs.SigmoidFocalLoss()), "box_loss"),  # type: ignore[arg-type]
        (lambda: specs.Experiment(model=specs.FPN()), "model"),  # type: ignore[arg-type]
        (
            lambda: specs.Experiment(
                model=_retinanet(),
                iterations=10,
                schedule=specs.Schedule(warmup=specs.LinearWarmup(iters=11)),
            ),
            "schedule.warmup.iters",
        ),
        (
            lambda: _retinanet(anchors=specs.Anchors(strides=(8, 16, 32, 64, 256))),
            "anchors.strides",
        ),
        (
            lambda: _retinanet(backbone=specs.ResNet(out_levels=(4, 5))),
            "neck.in_levels",
        ),
    ],
)
def test_construction_rejects_impossible_values(make: Any, field: str) -> None:
    with pytest.raises(SpecError) as info:
        make()
    assert info.value.path == field
    assert str(info.value).startswith(f"{field}: ")


def test_specs_are_immutable_and_hashable() -> None:
    spec = _retinanet()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.head = specs.RetinaHead(num_classes=4)  # type: ignore[misc]
    assert hash(spec) == hash(specs.from_json(specs.to_json(spec)))
    assert attrs.evolve(spec, head=specs.RetinaHead(num_classes=4)).num_classes == 4


def test_lists_become_tuples() -> None:
    anchors = specs.Anchors(ratios=[0.5, 1, 2])  # type: ignore[arg-type]
    assert anchors.ratios == (0.5, 1.0, 2.0)
    assert all(isinstance(r, float) for r in anchors.ratios)


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        specs.RetinaHead(3)  # type: ignore[misc]


def test_json_is_plain_and_readable() -> None:
    data = json.loads(specs.to_json(_retinanet()))
    assert data["spec"]["anchors"]["ratios"] == [0.5, 1.0, 2.0]
    assert typing.cast(dict, data["spec"]["coder"])["clip"] == math.log(1000 / 16)
    assert data["spec"]["backbone"]["norm"] == {"type": "FrozenBatchNorm"}
    assert data["spec"]["neck"]["norm"] is None


def test_abstract_bases_are_not_json_types_and_cannot_be_made() -> None:
    bases = [
        specs.Detector,
        specs.Norm,
        specs.ClassificationLoss,
        specs.BoxLoss,
        specs.Warmup,
        specs.Decay,
        specs.Optimizer,
    ]
    for base in bases:
        assert base.__name__ not in specs.spec_types()
        assert not attrs.has(base)
        with pytest.raises(TypeError, match="abstract"):
            base()
    assert set(specs.concrete_subclasses(specs.Norm)) >= {
        "BatchNorm",
        "FrozenBatchNorm",
        "GroupNorm",
    }
    data = _doc()
    data["spec"]["box_loss"] = {"type": "BoxLoss"}
    assert "expected one of: GIoULoss, L1Loss, SmoothL1Loss" in str(_error(data))


def test_detector_subclass_must_define_num_classes() -> None:
    @attrs.frozen(kw_only=True)
    class NoClassesDetector(specs.Detector):  # type: ignore[misc]
        head: specs.RetinaHead

    with pytest.raises(TypeError, match="num_classes"):
        NoClassesDetector(head=specs.RetinaHead(num_classes=2))  # type: ignore[abstract]


def test_pyramid_checks_name_the_field() -> None:
    backbone = specs.ResNet(out_levels=(3, 4, 5))
    specs.check_pyramid(backbone, specs.FPN())
    with pytest.raises(SpecError) as info:
        specs.check_pyramid(backbone, specs.FPN(in_levels=(2, 3, 4), out_levels=(2, 3)))
    assert info.value.path == "neck.in_levels" and "[2]" in info.value.message
    specs.check_strides((8, 16, 32, 64, 128), specs.FPN())
    with pytest.raises(SpecError) as info:
        specs.check_strides((8, 16, 32, 64, 128), specs.FPN(out_levels=(3, 4, 5)), field="points")
    assert info.value.path == "points" and "neck.out_levels has 3" in info.value.message
    with pytest.raises(SpecError, match=r"must be \(8, 16, 32\)"):
        specs.check_strides((8, 16, 64), specs.FPN(out_levels=(3, 4, 5)))
