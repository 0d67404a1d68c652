"""Optimizers from their specs, with parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from fdet import specs

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two groups: weights that decay, and norm parameters and biases that do not."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _NORMS) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(spec: specs.SGD | specs.AdamW, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay=spec.weight_decay)
    if isinstance(spec, specs.SGD):
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    beta1, beta2 = spec.betas
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(beta1, beta2), eps=spec.eps)
