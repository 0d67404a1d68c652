"""Root specs: whole detectors, and the consistency checks every detector family shares."""

import abc
from collections.abc import Sequence
from typing import Protocol

import attrs

from fdet.specs._core import Spec, SpecError, spec_of
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Anchors, DeltaXYWHCoder, DensePostprocess, MaxIoUAssigner, Normalize
from fdet.specs.heads import RetinaHead
from fdet.specs.losses import BoxLoss, ClassificationLoss, L1Loss, SigmoidFocalLoss
from fdet.specs.necks import FPN


class Detector(Spec):
    """Base of whole-detector specs (abstract: make a subclass), the type of
    :attr:`fdet.specs.Experiment.model`.

    A subclass is an ``@attrs.frozen(kw_only=True)`` class holding its parts (backbone, neck,
    head, losses, …), defines :attr:`num_classes`, checks its parts fit together in
    ``__attrs_post_init__`` (with :func:`check_pyramid` and :func:`check_strides` for pyramid
    detectors), and has a builder registered with :func:`fdet.register` returning a module that
    follows the detector contract (docs/models.md).
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Object classes the detector predicts."""


class _Levels(Protocol):
    @property
    def out_levels(self) -> tuple[int, ...]: ...


class _Neck(Protocol):
    @property
    def in_levels(self) -> tuple[int, ...]: ...

    @property
    def out_levels(self) -> tuple[int, ...]: ...


def check_pyramid(backbone: _Levels, neck: _Neck, *, neck_field: str = "neck") -> None:
    """Raise a :class:`SpecError` (at ``{neck_field}.in_levels``) unless every level the neck
    reads is one the backbone returns."""
    missing = [lvl for lvl in neck.in_levels if lvl not in backbone.out_levels]
    if missing:
        raise SpecError(
            f"asks for backbone levels {missing} that backbone.out_levels "
            f"{backbone.out_levels} does not return",
            f"{neck_field}.in_levels",
        )


def check_strides(strides: Sequence[int], neck: _Levels, *, field: str = "anchors.strides") -> None:
    """Raise a :class:`SpecError` at ``field`` unless ``strides`` has one stride per output level
    of ``neck`` and each is ``2**level``."""
    if len(strides) != len(neck.out_levels):
        raise SpecError(
            f"has {len(strides)} levels but neck.out_levels has {len(neck.out_levels)}", field
        )
    expected = tuple(2**lvl for lvl in neck.out_levels)
    if tuple(strides) != expected:
        raise SpecError(
            f"must be {expected} for neck.out_levels {neck.out_levels}, got {tuple(strides)}",
            field,
        )


@attrs.frozen(kw_only=True)
class RetinaNet(Detector):
    """RetinaNet: backbone → FPN → RetinaHead on anchors, focal loss, max-IoU assignment.

    The defaults are torchvision's ``retinanet_resnet50_fpn`` recipe; ``head`` (which holds
    ``num_classes``) has no default.
    """

    backbone: ResNet = ResNet()
    neck: FPN = FPN()
    head: RetinaHead
    anchors: Anchors = Anchors()
    assigner: MaxIoUAssigner = MaxIoUAssigner()
    coder: DeltaXYWHCoder = DeltaXYWHCoder()
    cls_loss: ClassificationLoss = attrs.field(
        default=SigmoidFocalLoss(), validator=spec_of(ClassificationLoss)
    )
    box_loss: BoxLoss = attrs.field(default=L1Loss(), validator=spec_of(BoxLoss))
    postprocess: DensePostprocess = DensePostprocess()
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        check_pyramid(self.backbone, self.neck)
        check_strides(self.anchors.strides, self.neck)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


__all__ = ["Detector", "RetinaNet", "check_pyramid", "check_strides"]
