"""Optimizers from their specs (through the registry), with parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from fdet import specs
from fdet.registry import build, register

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(
    model: nn.Module, *, weight_decay: float, options: specs.ParamGroups | None = None
) -> list[dict]:
    """Trainable parameters split by weight decay and learning-rate multiplier.

    Norm parameters and biases get no weight decay unless ``options`` asks for it; parameters
    under ``model.backbone`` get ``options.backbone_lr_mult`` times the learning rate (stored as
    ``lr_mult`` in each group). Empty groups are left out.
    """
    options = options or specs.ParamGroups()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        in_backbone = module_name == "backbone" or module_name.startswith("backbone.")
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, _NORMS)
            is_bias = name == "bias"
            decays = not (
                (is_norm and not options.norm_decay) or (is_bias and not options.bias_decay)
            )
            groups.setdefault((decays, in_backbone), []).append(param)
    out = []
    for (decays, in_backbone), params in sorted(
        groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])
    ):
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decays else 0.0,
                "lr_mult": options.backbone_lr_mult if in_backbone else 1.0,
                "name": ("decay" if decays else "no_decay") + ("/backbone" if in_backbone else ""),
            }
        )
    return out


def build_optimizer(
    spec: specs.Optimizer, model: nn.Module, options: specs.ParamGroups | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``model``'s parameter groups; each group's ``lr`` is the
    spec's peak rate times its ``lr_mult``. The optimizer comes from the builder registered for
    the spec's class: ``fn(spec, *, params: list[dict]) -> torch.optim.Optimizer``."""
    groups = parameter_groups(model, weight_decay=spec.weight_decay, options=options)
    for g in groups:
        g["lr"] = spec.lr * g["lr_mult"]
    return build(spec, params=groups)


def _fused(fused: bool | None, params: list[dict]) -> bool:
    """The spec's ``fused``, or with None whether torch has a fused kernel for every
    parameter's device (and a floating dtype)."""
    if fused is not None:
        return fused
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(
        p.device.type in devices and torch.is_floating_point(p)
        for group in params
        for p in group["params"]
    )


@register(specs.SGD)
def build_sgd(spec: specs.SGD, *, params: list[dict]) -> torch.optim.SGD:
    """``torch.optim.SGD`` over ``params`` (groups carrying their ``lr`` and ``weight_decay``),
    fused where ``spec.fused`` says (None: where torch has the kernel)."""
    return torch.optim.SGD(
        params,
        lr=spec.lr,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        fused=_fused(spec.fused, params) or None,
    )


@register(specs.AdamW)
def build_adamw(spec: specs.AdamW, *, params: list[dict]) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (groups carrying their ``lr`` and
    ``weight_decay``), fused where ``spec.fused`` says (None: where torch has the kernel)."""
    beta1, beta2 = spec.betas
    return torch.optim.AdamW(
        params,
        lr=spec.lr,
        betas=(beta1, beta2),
        eps=spec.eps,
        fused=_fused(spec.fused, params) or None,
    )
