"""Training specs: optimizers, parameter groups, EMA, and the experiment root."""

import math
from typing import Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    float_tuple,
    non_negative,
    one_of,
    positive,
    probability,
    spec_of,
)
from fdet.specs.data import CocoData, ShapesData, Transforms
from fdet.specs.detectors import Detector
from fdet.specs.schedules import Schedule
from fdet.specs.semi import SemiSupervised


@attrs.frozen(kw_only=True)
class ParamGroups(Spec):
    """Per-parameter options: weight decay on norm parameters and biases (off by default), and
    a learning-rate multiplier for the backbone (e.g. 0.1 when fine-tuning)."""

    norm_decay: bool = False
    bias_decay: bool = False
    backbone_lr_mult: float = attrs.field(default=1.0, validator=non_negative)


class Optimizer(Spec):
    """Base of optimizer specs (abstract: make a subclass). Every subclass has ``lr`` (the peak
    learning rate, after warm-up) and ``weight_decay`` fields; its builder, registered with
    :func:`fdet.register`, is ``fn(spec, *, params: list[dict]) -> torch.optim.Optimizer`` over
    parameter groups that already carry their ``lr`` and ``weight_decay``."""

    __slots__ = ()
    lr: float
    weight_decay: float


@attrs.frozen(kw_only=True)
class SGD(Optimizer):
    """SGD with momentum; ``lr`` is the peak learning rate (after warm-up)."""

    lr: float = attrs.field(default=0.01, validator=positive)
    momentum: float = attrs.field(default=0.9, validator=probability)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    nesterov: bool = False
    fused: bool | None = None
    """torch's fused kernel (one kernel for every parameter's update); None: fused where torch
    has the kernel for the parameters' device, the multi-tensor (foreach) path elsewhere."""


@attrs.frozen(kw_only=True)
class AdamW(Optimizer):
    """AdamW; ``lr`` is the peak learning rate (after warm-up)."""

    lr: float = attrs.field(default=1e-4, validator=positive)
    betas: tuple[float, ...] = attrs.field(default=(0.9, 0.999), converter=float_tuple)
    weight_decay: float = attrs.field(default=0.05, validator=non_negative)
    eps: float = attrs.field(default=1e-8, validator=positive)
    fused: bool | None = None
    """torch's fused kernel (2.5× faster than the foreach path on the shapes model's 12 M
    parameters on a CPU); None: fused where torch has the kernel for the parameters' device,
    the multi-tensor (foreach) path elsewhere."""

    def __attrs_post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"must be two values in [0, 1), got {self.betas}", "betas")


@attrs.frozen(kw_only=True)
class EMA(Spec):
    """An exponential moving average of the weights (and buffers), evaluated beside the raw
    weights. The decay warms up as ``decay × (1 - exp(-updates / warmup_updates))`` so early,
    poor weights fade quickly (0 disables the warm-up)."""

    decay: float = attrs.field(default=0.9998, validator=probability)
    warmup_updates: int = attrs.field(default=2000, validator=non_negative)


@attrs.frozen(kw_only=True)
class Experiment(Spec):
    """A whole training run: the model, its data, and how to train it.

    ``model``: any :class:`Detector` (``RetinaNet``, or one of your own); ``optimizer``: any
    :class:`Optimizer` (``SGD``, ``AdamW``, …); ``schedule``: a warm-up and a decay.
    ``iterations`` optimizer steps of ``batch_size`` images a process, accumulated over
    ``accumulate`` micro-batches of ``batch_size / accumulate``; validation (COCO AP and loss)
    every ``eval_interval`` iterations (0: only at the end) on at most ``eval_images`` images
    (0: all); a checkpoint every ``checkpoint_interval`` iterations and at the end, keeping the
    last ``keep_checkpoints`` and the best by validation AP.

    ``precision``: ``fp32``, ``bf16`` autocast (CPU or CUDA), ``fp16`` autocast with a gradient
    scaler (CUDA only), or ``auto``: ``bf16`` where the device computes in bfloat16 natively
    (:func:`fdet.runtime.native_bf16`), ``fp32`` elsewhere; losses and box coding stay in
    float32. ``allocator``: ``retain`` makes glibc keep freed memory in the heap
    (:func:`fdet.runtime.configure_allocator`), ``default`` leaves the allocator alone.
    ``base_batch_size``: when set, the learning rate is scaled by (total batch over all
    processes) / ``base_batch_size``.
    ``compile``: ``"objective"`` compiles the loss function only (cheap, and what pays on CPU),
    ``"model"`` also the network, ``"none"`` nothing. ``deterministic``: deterministic
    algorithms, for bit-identical resumes. ``early_stopping``: stop after that many evaluations
    without a better AP (0: never). ``semi``: train teacher–student on labeled and unlabeled
    images (:class:`SemiSupervised`; needs ``ema``, the teacher).
    """

    model: Detector = attrs.field(validator=spec_of(Detector))
    data: ShapesData | CocoData = ShapesData()
    train_transforms: Transforms = Transforms(hflip_prob=0.5)
    val_transforms: Transforms = Transforms()
    optimizer: Optimizer = attrs.field(default=SGD(), validator=spec_of(Optimizer))
    schedule: Schedule = Schedule()
    batch_size: int = attrs.field(default=16, validator=positive)
    iterations: int = attrs.field(default=90_000, validator=positive)
    eval_interval: int = attrs.field(default=0, validator=non_negative)
    eval_images: int = attrs.field(default=0, validator=non_negative)
    checkpoint_interval: int = attrs.field(default=5000, validator=positive)
    log_interval: int = attrs.field(default=20, validator=positive)
    grad_clip_norm: float | None = attrs.field(default=None)
    seed: int = 0
    num_workers: int = attrs.field(default=2, validator=non_negative)
    param_groups: ParamGroups = ParamGroups()
    precision: Literal["fp32", "bf16", "fp16", "auto"] = attrs.field(
        default="fp32", validator=one_of("fp32", "bf16", "fp16", "auto")
    )
    allocator: Literal["default", "retain"] = attrs.field(
        default="default", validator=one_of("default", "retain")
    )
    accumulate: int = attrs.field(default=1, validator=positive)
    ema: EMA | None = None
    base_batch_size: int | None = None
    keep_checkpoints: int = attrs.field(default=2, validator=positive)
    compile: Literal["none", "objective", "model"] = attrs.field(
        default="none", validator=one_of("none", "objective", "model")
    )
    deterministic: bool = False
    sync_batch_norm: bool = False
    early_stopping: int = attrs.field(default=0, validator=non_negative)
    semi: SemiSupervised | None = None

    def __attrs_post_init__(self) -> None:
        if self.semi is not None:
            if self.ema is None:
                raise SpecError(
                    "a semi-supervised experiment needs ema: the teacher is the EMA of the "
                    "student (e.g. ema=EMA(decay=0.999, warmup_updates=0))",
                    "semi",
                )
            if self.semi.unlabeled_batch_size % self.accumulate:
                raise SpecError(
                    f"({self.accumulate}) must divide semi.unlabeled_batch_size "
                    f"({self.semi.unlabeled_batch_size})",
                    "accumulate",
                )
        if self.batch_size % self.accumulate:
            raise SpecError(
                f"({self.accumulate}) must divide batch_size ({self.batch_size})", "accumulate"
            )
        if self.base_batch_size is not None and self.base_batch_size <= 0:
            raise SpecError(f"must be > 0 or null, got {self.base_batch_size}", "base_batch_size")
        if self.grad_clip_norm is not None and not 0 < self.grad_clip_norm < math.inf:
            raise SpecError(
                f"must be a finite number > 0, or null, got {self.grad_clip_norm}",
                "grad_clip_norm",
            )
        warmup = self.schedule.warmup
        if warmup is not None and warmup.iters > self.iterations:
            raise SpecError(
                f"({warmup.iters}) must not exceed iterations ({self.iterations})",
                "schedule.warmup.iters",
            )
