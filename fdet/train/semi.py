"""The teacher–student step: semi-supervised training on the engine's loop.

:func:`semi_step` is a step factory like :func:`fdet.train.step.supervised_step`; the engine
uses it for an experiment with ``semi`` set (:class:`fdet.specs.SemiSupervised`). Each
micro-batch of a step:

1. the labeled micro-batch through the student: the detector's own loss terms;
2. after the burn-in, the unlabeled micro-batch (:class:`fdet.data.semi.PairBatch`: a weak and a
   strong view of each image and the map between them):

   - the **teacher** labels the weak view: the EMA weights of the run (``trainer.ema``) run
     with ``torch.func.functional_call`` on the detector in eval mode, without gradients; its
     detections above ``score_threshold`` become padded pseudo-labels with a validity mask
     (:func:`fdet.ops.pseudo.pseudo_labels`), each marked reliable or not (its score, or Soft
     Teacher's box jitter: :func:`fdet.ops.pseudo.jitter_std` of boxes the teacher refines);
   - the pseudo-labels are carried into the strong view by its geometric map
     (:func:`fdet.ops.views.map_boxes`: flip, scale, crop; cropped-away boxes become invalid);
   - the student's outputs on the strong view give the unlabeled terms ``u_<name>``: the
     detector's classification terms against all pseudo-labels, its ``box_terms`` against the
     reliable ones, weighted by the unlabeled weight (ramped up after the burn-in).

All terms go through :func:`fdet.train.step.update` (:func:`~fdet.train.step.backward_terms`,
the exact normalization over micro-batches and processes, then the optimizer step); the loop then
updates the EMA weights, that is the teacher, with the pure EMA update
(:func:`fdet.train.ema.ema_update_`).
When the burn-in ends (``reset_teacher``), the teacher starts from the student's weights.

The teacher is part of the run's state as the EMA weights are: saved in every checkpoint and
evaluated beside the student (``bbox_ema`` in ``metrics.json``). Both data streams resume at
their position: the labeled one at ``iteration × accumulate`` micro-batches, the unlabeled one
at ``(iteration − burn_in) × accumulate``; a step's randomness (box jitter) draws from torch's
global generator, whose state checkpoints carry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Term
from fdet.train.data import TrainingError
from fdet.train.step import (
    DATA_WAIT,
    Step,
    StepContext,
    autocast,
    update,
)

__all__ = ["SemiContext", "Teacher", "semi_step", "unsup_weight"]


class SemiContext(StepContext, Protocol):
    """What :func:`semi_step` reads besides a step's context (:class:`fdet.train.loop.Trainer`
    provides it all)."""

    ema: Any  # fdet.train.ema.EmaState: the teacher
    datasets: Any  # fdet.train.data.DataSets with ``unlabeled``
    state: Any  # fdet.train.state.TrainState (``iteration``)
    dist: Any  # fdet.train.distributed.DistInfo (``rank``)


def unsup_weight(semi: specs.SemiSupervised, iteration: int) -> float:
    """The weight of the unlabeled terms at ``iteration`` (0-based): 0 during the burn-in, then
    ``unsup_weight`` ramped up linearly over ``unsup_warmup`` iterations."""
    done = iteration - semi.burn_in + 1
    if done <= 0:
        return 0.0
    if semi.unsup_warmup == 0:
        return semi.unsup_weight
    return semi.unsup_weight * min(1.0, done / semi.unsup_warmup)


class _Labeler(nn.Module):
    """The teacher's work on a weak view, as one module call so that ``functional_call`` runs
    all of it (network, postprocess, box refinement) with the teacher's weights."""

    def __init__(self, detector: nn.Module, semi: specs.SemiSupervised, precision: str) -> None:
        super().__init__()
        self.detector = detector
        self.semi = semi
        self.precision = precision

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Any, Tensor]:
        from fdet.ops.pseudo import jitter_boxes, jitter_std, pseudo_labels

        semi = self.semi
        detector: Any = self.detector  # a Detector (postprocess, refine_boxes)
        with autocast(self.precision, images.device):
            outputs = detector(images)
        detections = detector.postprocess(outputs, image_sizes)
        pseudo = pseudo_labels(
            detections, score_threshold=semi.score_threshold, max_labels=semi.max_pseudo_labels
        )
        if semi.reliability == "score":
            return pseudo, pseudo.valid & (pseudo.scores >= semi.box_score_threshold)
        b, k = pseudo.labels.shape
        times = semi.jitter_times
        jittered = jitter_boxes(pseudo.boxes, times=times, scale=semi.jitter_scale)  # [B,K,J,4]
        refined = detector.refine_boxes(
            outputs,
            jittered.reshape(b, k * times, 4),
            pseudo.labels.repeat_interleave(times, dim=1),
            image_sizes,
        ).reshape(b, k, times, 4)
        unreliability = jitter_std(refined.float(), pseudo.boxes)
        return pseudo, pseudo.valid & (unreliability <= semi.jitter_max_std)


class Teacher:
    """The teacher: the detector run with the EMA weights (``ctx.ema``) through
    ``torch.func.functional_call``, in eval mode and without gradients. Calling it on a weak
    view returns the pseudo-labels (:class:`fdet.ops.pseudo.PseudoLabels`) and which of them are
    reliable for box terms ``[B, K]``. The detector's own weights, gradients and train/eval mode
    are untouched."""

    def __init__(self, detector: nn.Module, semi: specs.SemiSupervised, precision: str) -> None:
        self.detector = detector
        self.labeler = _Labeler(detector, semi, precision)

    @torch.no_grad()
    def __call__(self, ema: Any, images: Tensor, image_sizes: Tensor) -> tuple[Any, Tensor]:
        tree = {f"detector.{k}": v for k, v in ema.params.items()}
        tree.update({f"detector.{k}": v for k, v in ema.buffers.items()})
        was_training = self.detector.training
        self.labeler.eval()
        try:
            return torch.func.functional_call(
                self.labeler, tree, (images, image_sizes), strict=True
            )
        finally:
            self.detector.train(was_training)


def _check_model(ctx: SemiContext, semi: specs.SemiSupervised) -> frozenset[str]:
    """The detector's box terms, after the checks that it can train semi-supervised."""
    raw = ctx.raw
    if getattr(ctx.exp.model, "mask_head", None) is not None:
        raise TrainingError(
            f"semi-supervised training of {type(raw).__name__}: pseudo-labels carry no masks, "
            "so a mask head cannot learn from unlabeled images; train the model without its "
            "mask head semi-supervised instead"
        )
    if semi.reliability == "jitter" and not callable(getattr(raw, "refine_boxes", None)):
        raise TrainingError(
            f"semi.reliability 'jitter' needs a detector that refines given boxes (a "
            f"refine_boxes method); {type(raw).__name__} has none: use reliability 'score'"
        )
    if ctx.ema is None:
        raise TrainingError("semi-supervised training needs the experiment's ema (the teacher)")
    if getattr(ctx.datasets, "unlabeled", None) is None:
        raise TrainingError("semi-supervised training needs an unlabeled data set")
    return frozenset(getattr(raw, "box_terms", frozenset()))


def _copy_student_into(ema: Any, model: nn.Module) -> None:
    """The teacher's weights := the student's (in place; the update count is kept)."""
    from fdet.train.distributed import unwrap

    base = unwrap(model)
    params = dict(base.named_parameters(remove_duplicate=False))
    buffers = dict(base.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        torch._foreach_copy_(
            [*ema.params.values(), *ema.buffers.values()],
            [*(params[k] for k in ema.params), *(buffers[k] for k in ema.buffers)],
        )


def semi_step(ctx: SemiContext) -> Step:
    """The teacher–student step of ``ctx.exp.semi`` (see the module docstring)."""
    from fdet.data.loader import infinite
    from fdet.ops.pseudo import pseudo_quality
    from fdet.ops.views import map_boxes
    from fdet.train.data import unlabeled_loader

    exp = ctx.exp
    semi = exp.semi
    if semi is None:
        raise TrainingError("semi_step: the experiment has no semi spec")
    box_terms = _check_model(ctx, semi)
    teacher = Teacher(ctx.raw, semi, ctx.precision)
    micro_batches = exp.accumulate
    hidden_labels = bool(getattr(ctx.datasets, "unlabeled_has_labels", False))
    streams: dict[str, Iterator[Any]] = {}
    waited = [0.0]
    stats: dict[str, Tensor] = {}

    def next_of(stream: Iterator[Any]) -> Any:
        start = time.perf_counter()
        item = next(stream)
        waited[0] += time.perf_counter() - start
        return item

    def unlabeled() -> Any:
        if "pairs" not in streams:  # opened at the first unlabeled step: no workers in burn-in
            loader = unlabeled_loader(
                exp, ctx.datasets.unlabeled, rank=ctx.dist.rank, world_size=ctx.world_size
            )
            done = max(0, ctx.state.iteration - semi.burn_in)
            streams["pairs"] = infinite(loader, start_iteration=done * micro_batches)
        return next_of(streams["pairs"]).to(ctx.device, non_blocking=True)

    def add_stat(name: str, value: Tensor) -> None:
        stats[name] = stats[name] + value if name in stats else value

    def compute(_: int) -> LossTerms:
        batch = next_of(ctx.batches).to(ctx.device, non_blocking=True)
        with autocast(ctx.precision, ctx.device):
            outputs = ctx.forward(batch.images)
        terms: dict[str, Term] = dict(ctx.loss_fn(outputs, batch))
        if ctx.state.iteration < semi.burn_in:
            return terms
        weight = unsup_weight(semi, ctx.state.iteration)
        pair = unlabeled()
        pseudo, reliable = teacher(ctx.ema, pair.weak.images, pair.weak.image_sizes)
        boxes, valid = map_boxes(
            pseudo.boxes,
            pseudo.valid,
            pair.affine,
            pair.strong.image_sizes,
            min_visible=semi.strong.crop_min_visible,
        )
        strong = pair.strong._replace(
            gt_boxes=boxes,
            gt_labels=pseudo.labels,
            gt_valid=valid,
            gt_crowd=torch.zeros_like(valid),
            gt_masks=None,
        )
        with autocast(ctx.precision, ctx.device):
            outputs_u = ctx.forward(strong.images)
        every = ctx.loss_fn(outputs_u, strong)
        boxed = ctx.loss_fn(outputs_u, strong._replace(gt_valid=valid & reliable))
        for name, term in every.items():
            source = boxed[name] if name in box_terms else term
            terms[f"u_{name}"] = Term(source.total, source.count, source.weight * weight)
        images = float(pseudo.valid.shape[0])
        add_stat("pseudo_per_image", valid.sum().float() / images)
        add_stat("pseudo_reliable_per_image", (valid & reliable).sum().float() / images)
        if hidden_labels:
            hits, made, found, objects = pseudo_quality(
                pseudo, pair.weak.gt_boxes, pair.weak.gt_labels, pair.weak.gt_valid
            )
            add_stat("pseudo_precision", hits / made.clamp(min=1.0))
            add_stat("pseudo_recall", found / objects.clamp(min=1.0))
        return terms

    def step() -> dict[str, Tensor]:
        waited[0] = 0.0
        stats.clear()
        if semi.reset_teacher and ctx.state.iteration == semi.burn_in:
            _copy_student_into(ctx.ema, ctx.raw)
        values = update(ctx, compute)
        device = values["loss"].device
        zero = torch.zeros((), device=device)
        names = [n for n in values if not n.endswith("_count") and not n.startswith("u_")]
        for name in names:  # the same keys every step, also in the burn-in
            if name != "loss":
                values.setdefault(f"u_{name}", zero)
        keys = ["pseudo_per_image", "pseudo_reliable_per_image"]
        if hidden_labels:
            keys += ["pseudo_precision", "pseudo_recall"]
        for key in keys:
            values[key] = stats[key].to(device) / micro_batches if key in stats else zero
        values["unsup_weight"] = torch.tensor(
            unsup_weight(semi, ctx.state.iteration), device=device
        )
        values[DATA_WAIT] = torch.tensor(waited[0] * 1e3, device=device)
        return values

    return step
