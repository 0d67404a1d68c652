"""A tour of fdet's building blocks: a spec, its JSON, the built module, and the pure ops that
turn its outputs into a training signal and into detections.

Run: python examples/ops_tour.py
"""

from __future__ import annotations

import torch

from fdet import build, specs
from fdet.ops.anchors import anchor_offsets, grid_anchors, level_sizes
from fdet.ops.assign import POSITIVE, assign_max_iou
from fdet.ops.coding import encode_deltas
from fdet.ops.postprocess import postprocess_dense


def main() -> None:
    torch.manual_seed(0)
    spec = specs.RetinaNet(
        backbone=specs.ResNet(depth=18, norm=specs.BatchNorm(), out_levels=(3, 4, 5), width=16),
        neck=specs.FPN(channels=32),
        head=specs.RetinaHead(num_classes=3, num_convs=1, channels=32),
    )
    assert specs.from_json(specs.to_json(spec)) == spec
    model = build(spec).eval()

    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)

    a = spec.anchors
    offsets = [
        anchor_offsets(level_sizes(s, a.octave_scales, truncate=a.truncate_sizes), a.ratios)
        for s in a.base_sizes
    ]
    anchors = grid_anchors(offsets, out.feature_sizes, a.strides)  # [A, 4]
    print(f"{anchors.shape[0]} anchors over {len(out.feature_sizes)} levels")

    # a padded batch of ground truth: image 0 has two objects, image 1 none
    gt_boxes = torch.tensor(
        [[[10.0, 12.0, 60.0, 70.0], [64.0, 64.0, 120.0, 100.0]], [[0.0] * 4] * 2]
    )
    gt_valid = torch.tensor([[True, True], [False, False]])
    assignment = assign_max_iou(
        anchors, gt_boxes, gt_valid, pos_iou=spec.assigner.pos_iou, neg_iou=spec.assigner.neg_iou
    )
    positives = assignment.label == POSITIVE  # [B, A]
    print("positives per image:", positives.sum(dim=1).tolist())
    matched = torch.gather(gt_boxes, 1, assignment.gt_index[..., None].expand(-1, -1, 4))
    deltas = encode_deltas(anchors.expand_as(matched), matched)  # [B, A, 4] regression targets
    print("regression targets of positives:", tuple(deltas[positives].shape))

    pp = spec.postprocess
    detections = postprocess_dense(
        out.cls_logits,
        out.box_deltas,
        torch.split(anchors, [x.shape[1] for x in out.cls_logits]),
        torch.tensor([[128, 128], [128, 128]]),
        score_threshold=pp.score_threshold,
        topk_per_level=pp.topk_per_level,
        iou_threshold=pp.nms_iou,
        max_detections=pp.max_detections,
    )
    print("detections per image (untrained model):", detections.valid.sum(dim=1).tolist())


if __name__ == "__main__":
    main()
