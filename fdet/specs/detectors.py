"""Root specs: whole detectors."""

import attrs

from fdet.specs._core import Spec, SpecError
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Anchors, DeltaXYWHCoder, DensePostprocess, MaxIoUAssigner, Normalize
from fdet.specs.heads import RetinaHead
from fdet.specs.losses import BoxLoss, L1Loss, SigmoidFocalLoss
from fdet.specs.necks import FPN


@attrs.frozen(kw_only=True)
class RetinaNet(Spec):
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
    cls_loss: SigmoidFocalLoss = SigmoidFocalLoss()
    box_loss: BoxLoss = L1Loss()
    postprocess: DensePostprocess = DensePostprocess()
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        missing = [lvl for lvl in self.neck.in_levels if lvl not in self.backbone.out_levels]
        if missing:
            raise SpecError(
                f"asks for backbone levels {missing} that backbone.out_levels "
                f"{self.backbone.out_levels} does not return",
                "neck.in_levels",
            )
        if len(self.anchors.strides) != len(self.neck.out_levels):
            raise SpecError(
                f"has {len(self.anchors.strides)} levels but neck.out_levels has "
                f"{len(self.neck.out_levels)}",
                "anchors.strides",
            )
        expected = tuple(2**lvl for lvl in self.neck.out_levels)
        if self.anchors.strides != expected:
            raise SpecError(
                f"must be {expected} for neck.out_levels {self.neck.out_levels}, "
                f"got {self.anchors.strides}",
                "anchors.strides",
            )

    @property
    def num_classes(self) -> int:
        return self.head.num_classes
