"""``--set PATH=VALUE`` overrides: results equal hand-made ``attrs.evolve``; errors name paths."""

from __future__ import annotations

import attrs
import pytest

from fdet import specs
from fdet.specs import SpecError, apply_overrides, parse_override


def _experiment(**kw: object) -> specs.Experiment:
    model = specs.RetinaNet(head=specs.RetinaHead(num_classes=5))
    return specs.Experiment(model=model, iterations=1000, **kw)  # type: ignore[arg-type]


def _error(spec: specs.Experiment, *items: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        apply_overrides(spec, list(items))
    return info.value


def test_each_kind_of_value_equals_evolve_by_hand() -> None:
    base = _experiment()
    assert isinstance(base.data, specs.ShapesData)
    got = apply_overrides(
        base,
        [
            "optimizer.lr=0.01",
            "model.head.num_classes=3",
            'ema={"decay": 0.999}',
            "schedule.decay.milestones=[0.5,0.8]",
            "data.train_images=100",
            "precision=bf16",
            "grad_clip_norm=10",
            "deterministic=true",
        ],
    )
    want = attrs.evolve(
        base,
        optimizer=attrs.evolve(base.optimizer, lr=0.01),
        model=attrs.evolve(base.model, head=attrs.evolve(base.model.head, num_classes=3)),
        ema=specs.EMA(decay=0.999),
        schedule=attrs.evolve(
            base.schedule, decay=attrs.evolve(base.schedule.decay, milestones=(0.5, 0.8))
        ),
        data=attrs.evolve(base.data, train_images=100),
        precision="bf16",
        grad_clip_norm=10.0,
        deterministic=True,
    )
    assert got == want
    assert type(got.grad_clip_norm) is float  # read back through the spec's types


def test_no_overrides_is_the_spec_itself() -> None:
    base = _experiment()
    assert apply_overrides(base, []) is base


def test_null_removes_and_object_sets_optional_spec() -> None:
    base = _experiment(ema=specs.EMA(decay=0.99, warmup_updates=10))
    assert apply_overrides(base, ["ema=null"]).ema is None
    # An object replaces the whole value: fields it leaves out take their defaults.
    assert apply_overrides(base, ['ema={"decay": 0.9}']).ema == specs.EMA(decay=0.9)
    assert apply_overrides(base, ["ema.warmup_updates=0"]).ema == specs.EMA(
        decay=0.99, warmup_updates=0
    )


def test_union_object_without_type_keeps_current_type_and_type_switches() -> None:
    base = _experiment(optimizer=specs.SGD(lr=0.02, momentum=0.8))
    assert apply_overrides(base, ['optimizer={"lr": 0.5}']).optimizer == specs.SGD(lr=0.5)
    got = apply_overrides(base, ['optimizer={"type": "AdamW"}', "optimizer.betas=[0.9, 0.95]"])
    assert got.optimizer == specs.AdamW(betas=(0.9, 0.95))
    box = apply_overrides(base, ['model.box_loss={"type": "GIoULoss"}'])
    assert box.model.box_loss == specs.GIoULoss()


def test_later_overrides_win_and_cross_field_rules_see_all_of_them() -> None:
    base = _experiment()
    assert apply_overrides(base, ["seed=1", "seed=2"]).seed == 2
    # accumulate must divide batch_size: valid only once both are applied, in either order.
    for items in (["accumulate=3", "batch_size=6"], ["batch_size=6", "accumulate=3"]):
        got = apply_overrides(base, items)
        assert (got.batch_size, got.accumulate) == (6, 3)


def test_path_into_field_left_out_by_an_earlier_object_uses_its_default() -> None:
    base = _experiment(train_transforms=specs.Transforms(hflip_prob=0.25))
    model = base.model
    got = apply_overrides(base, ['model={"head": {"num_classes": 2}}', "model.backbone.depth=101"])
    assert got.model == specs.RetinaNet(
        head=specs.RetinaHead(num_classes=2), backbone=specs.ResNet(depth=101)
    )
    assert model.backbone.depth == 50  # the input spec is untouched
    # Experiment.train_transforms defaults to a non-default Transforms (hflip_prob=0.5).
    got = apply_overrides(
        base, ['train_transforms={"max_size": 512}', "train_transforms.pad_divisor=32"]
    )
    assert got.train_transforms == specs.Transforms(max_size=512, pad_divisor=32)


def test_plain_strings_and_quoted_json() -> None:
    base = _experiment(data=specs.ShapesData(cache_dir="/a"))

    def cache_dir(item: str) -> str | None:
        data = apply_overrides(base, [item]).data
        assert isinstance(data, specs.ShapesData)
        return data.cache_dir

    assert cache_dir("data.cache_dir=/tmp/x y") == "/tmp/x y"
    assert cache_dir('data.cache_dir="null"') == "null"
    assert cache_dir("data.cache_dir=null") is None
    assert parse_override(" optimizer.lr = 1e-3") == ("optimizer.lr", 1e-3)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a=") == ("a", "")


def test_unknown_segment_names_full_path_and_allowed_keys() -> None:
    base = _experiment()
    e = _error(base, "optimizer.lrr=1")
    assert e.path == "optimizer.lrr"
    assert "did you mean 'lr'?" in e.message
    assert "allowed keys: lr, momentum, weight_decay, nesterov" in e.message
    e = _error(base, "model.hed.num_classes=3")
    assert e.path == "model.hed.num_classes"
    assert "unknown key 'hed' in RetinaNet (at model.hed)" in e.message
    assert "head" in e.message and "backbone" in e.message
    e = _error(base, "batch_sise=4")
    assert e.path == "batch_sise" and "did you mean 'batch_size'?" in e.message
    # Keys are checked against the current type: momentum is SGD's, not AdamW's.
    e = _error(base, 'optimizer={"type": "AdamW"}', "optimizer.momentum=0.5")
    assert e.path == "optimizer.momentum" and "in AdamW" in e.message


def test_path_through_null_says_to_set_the_object_first() -> None:
    e = _error(_experiment(), "ema.decay=0.99")
    assert e.path == "ema.decay"
    assert "ema is null; set ema={...} first" in e.message
    assert 'ema={"decay": 0.99}' in e.message


def test_malformed_items() -> None:
    base = _experiment()
    for item in ("optimizer.lr", "=3", "optimizer..lr=1", ".lr=1"):
        e = _error(base, item)
        assert "PATH=VALUE" in e.message or "empty segment" in e.message, item
    assert "not PATH=VALUE" in _error(base, "optimizer.lr").message
    with pytest.raises(TypeError, match="sequence"):
        apply_overrides(base, "optimizer.lr=1")


def test_paths_into_non_objects_and_type_keys() -> None:
    base = _experiment()
    e = _error(base, "batch_size.x=1")
    assert e.path == "batch_size.x" and "not an object" in e.message
    e = _error(base, "schedule.decay.milestones.0=0.5")
    assert "is a list; set it whole" in e.message
    e = _error(base, "optimizer.type=AdamW")
    assert e.path == "optimizer.type" and 'optimizer={"type": ' in e.message
    assert all(n in e.message for n in ("AdamW", "SGD"))


def test_validation_errors_name_path_and_the_override() -> None:
    base = _experiment()
    e = _error(base, "seed=3", "optimizer.lr=-1")
    assert e.path == "optimizer.lr"
    assert "must be > 0" in e.message and "'optimizer.lr=-1'" in e.message
    assert "seed=3" not in e.message
    e = _error(base, "batch_size=abc")
    assert e.path == "batch_size" and "expected an integer" in e.message
    e = _error(base, 'optimizer={"type": "Adam"}')
    assert e.path == "optimizer.type" and all(n in e.message for n in ("AdamW", "SGD"))
    e = _error(base, 'ema={"decay": 0.9, "warmup": 3}')
    assert e.path == "ema.warmup" and "allowed keys" in e.message
    e = _error(base, "accumulate=3")
    assert e.path == "accumulate" and "must divide batch_size" in e.message
    e = _error(base, "precision=fp8")
    assert e.path == "precision" and "fp8" in e.message


def test_fields_typed_by_a_base_switch_class_and_keep_it() -> None:
    base = _experiment()
    got = apply_overrides(base, ['schedule.decay={"type": "CosineDecay", "min_factor": 0.05}'])
    assert got.schedule == specs.Schedule(decay=specs.CosineDecay(min_factor=0.05))
    got = apply_overrides(base, ["schedule.warmup=null", 'schedule.decay={"type": "PolyDecay"}'])
    assert got.schedule == specs.Schedule(warmup=None, decay=specs.PolyDecay())
    got = apply_overrides(base, ['schedule.warmup={"iters": 10}', "schedule.warmup.factor=0.5"])
    assert got.schedule.warmup == specs.LinearWarmup(iters=10, factor=0.5)  # the current class
    got = apply_overrides(base, ['model.backbone.norm={"type": "GroupNorm", "groups": 16}'])
    assert got.model.backbone == specs.ResNet(norm=specs.GroupNorm(groups=16))  # type: ignore[attr-defined]
    got = apply_overrides(
        base, ['model.neck.norm={"type": "GroupNorm"}', "model.neck.norm.groups=8"]
    )
    assert got.model.neck.norm == specs.GroupNorm(groups=8)  # type: ignore[attr-defined]


def test_errors_in_fields_typed_by_a_base() -> None:
    base = _experiment()
    e = _error(base, 'schedule.decay={"type": "ExpDecay"}')
    assert e.path == "schedule.decay.type"
    assert "ConstantDecay, CosineDecay, PolyDecay, StepDecay" in e.message
    e = _error(base, 'model.neck.norm={"groups": 8}')  # null now: no class to keep
    assert e.path == "model.neck.norm" and 'needs a "type" key' in e.message
    e = _error(base, "schedule.decay.min_factor=0.1")  # StepDecay has no min_factor
    assert e.path == "schedule.decay.min_factor" and "in StepDecay" in e.message
    e = _error(base, "schedule.warmup.iters=1001")
    assert e.path == "schedule.warmup.iters" and "must not exceed iterations" in e.message


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optimizer.lr=Infinity", "optimizer.lr: inf is not a finite number"),
        ("optimizer.lr=-Infinity", "optimizer.lr: -inf is not a finite number"),
        ("optimizer.lr=NaN", "optimizer.lr: nan is not a finite number"),
        ("optimizer.lr=1e999", "optimizer.lr: inf is not a finite number"),
        ("model.anchors.ratios=[0.5, Infinity]", "model.anchors.ratios[1]: inf is not a finite"),
        ('optimizer={"lr": NaN}', "optimizer.lr: nan is not a finite number"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_path(item: str, message: str) -> None:
    error = _error(_experiment(), item)
    assert str(error).startswith(message) and repr(item) in str(error)
    with pytest.raises(SpecError, match="is not a finite number"):
        parse_override(item)
