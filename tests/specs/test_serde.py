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
        return spec_instances(t)
    raise NotImplementedError(t)


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
    specs.Schedule,
    specs.EMA,
    specs.ParamGroups,
]


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
    return specs.RetinaNet(head=specs.RetinaHead(num_classes=3), **kw)


@given(box_loss=spec_instances(specs.SmoothL1Loss) | spec_instances(specs.GIoULoss))
def test_root_round_trip_with_union_fields(box_loss: Spec) -> None:
    spec = _retinanet(box_loss=box_loss)
    assert specs.from_json(specs.to_json(spec)) == spec


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
        (("backbone", "norm"), "batchnorm", "must be one of"),
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


def test_nan_cannot_be_written() -> None:
    spec = specs.SigmoidFocalLoss(alpha=math.nan)
    with pytest.raises(SpecError, match="cannot be written as JSON"):
        specs.to_json(spec)


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
    assert typing.cast(dict, data["spec"]["coder"])["clip"] == pytest.approx(math.log(1000 / 16))
