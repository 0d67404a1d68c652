"""How big and how costly a model is: parameters and FLOPs by top-level module, and latency.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward call of the
model on a ``[batch, 3, H, W]`` input, which counts the operators it has formulas for (convs,
matrix products, attention; two FLOPs a multiply-add) and not element-wise ones (activations,
norms, additions). For a detector the forward is the network up to the head's outputs; decoding
and NMS (``postprocess``) are not in it.
"""

from __future__ import annotations

import statistics
import time

import attrs
import torch
from torch import nn

__all__ = ["ROOT", "Complexity", "model_complexity"]

ROOT = "(own)"
"""The breakdown's entry for what the model holds or computes outside its child modules."""


@attrs.frozen(kw_only=True)
class Complexity:
    """What :func:`model_complexity` measured.

    - ``params``: parameters of each top-level child module (in registration order), plus
      :data:`ROOT` for parameters the model holds itself where it has any; ``total_params``:
      the model's parameters, each shared tensor counted once (the parts sum to it unless
      children share tensors).
    - ``flops``: FLOPs of each top-level child module's calls during the forward, plus
      :data:`ROOT` for the operators the model's own ``forward`` runs outside its children
      (where there are any); they sum to ``total_flops``.
    - ``latency_ms``: the median wall time of ``repeats`` forward calls under
      ``torch.inference_mode`` (after ``warmup`` untimed ones), eager, on ``device``.
    """

    params: dict[str, int]
    total_params: int
    trainable_params: int
    flops: dict[str, int]
    total_flops: int
    latency_ms: float
    image_size: tuple[int, int]
    batch: int
    device: str

    def to_table(self) -> str:
        """A fixed-width text table: one row a module with its parameters and FLOPs (and
        shares of the total), then the totals and the latency."""
        names = list(self.params) + [n for n in self.flops if n not in self.params]
        width = max([len(n) for n in names] + [len("module"), len("total")])

        def share(part: int, whole: int) -> str:
            return f"{100 * part / whole:5.1f}%" if whole else "    -"

        lines = [
            f"{'module':<{width}}  {'params':>12}  {'share':>6}  {'FLOPs':>10}  {'share':>6}",
            "-" * (width + 44),
        ]
        for name in names:
            p, f = self.params.get(name, 0), self.flops.get(name, 0)
            lines.append(
                f"{name:<{width}}  {p:>12,}  {share(p, self.total_params):>6}  "
                f"{_si(f):>10}  {share(f, self.total_flops):>6}"
            )
        lines.append("-" * (width + 44))
        lines.append(
            f"{'total':<{width}}  {self.total_params:>12,}  {'':>6}  {_si(self.total_flops):>10}"
        )
        h, w = self.image_size
        lines.append(
            f"input {self.batch}×3×{h}×{w}, trainable parameters {self.trainable_params:,}, "
            f"latency {self.latency_ms:.2f} ms (median, eager, {self.device})"
        )
        return "\n".join(lines)


def _si(value: float) -> str:
    """``647.2 M``-style: four significant figures and an SI prefix."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}"
    return f"{value:g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_complexity(
    model: nn.Module,
    image_size: tuple[int, int],
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
    repeats: int = 5,
    warmup: int = 1,
) -> Complexity:
    """Parameters, FLOPs and latency of ``model`` on a ``[batch, 3, H, W]`` input
    (:class:`Complexity`).

    The input is uniform noise in ``[0, 1]`` (a detector's forward reads images in
    ``[0, input_range]``; FLOPs do not depend on the values). ``device``: where to run (default:
    where the model's parameters are). The model is put in eval mode for the measurement and
    back in its former mode after. ``repeats`` ≥ 1 timed calls; ``warmup`` untimed ones before.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = image_size
    if h < 1 or w < 1 or batch < 1:
        raise ValueError(f"image_size {image_size} and batch {batch}: must be positive")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (
        first.device if first is not None else torch.device("cpu")
    )  # fmt: skip

    params: dict[str, int] = {}
    children = list(model.named_children())
    in_children: set[int] = set()
    for name, child in children:
        tensors = list(child.parameters())
        params[name] = sum(p.numel() for p in tensors)
        in_children.update(id(p) for p in tensors)
    own = sum(p.numel() for p in model.parameters() if id(p) not in in_children)
    if own:
        params[ROOT] = own
    total_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    images = torch.rand(batch, 3, h, w, device=dev)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(images)
        counts = counter.get_flop_counts()
        total_flops = int(counter.get_total_flops())
        root = type(model).__name__
        flops = {name: int(sum(counts.get(f"{root}.{name}", {}).values())) for name, _ in children}
        rest = total_flops - sum(flops.values())
        if rest:
            flops[ROOT] = rest

        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(dev)
                start = time.perf_counter()
                model(images)
                _sync(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return Complexity(
        params=params,
        total_params=total_params,
        trainable_params=trainable,
        flops=flops,
        total_flops=total_flops,
        latency_ms=1000 * statistics.median(times),
        image_size=(h, w),
        batch=batch,
        device=str(dev),
    )
