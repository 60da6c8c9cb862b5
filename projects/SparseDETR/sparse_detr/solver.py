"""The optimizer of the DETR recipe: AdamW with per-module learning rates and clipping of the total gradient norm."""
import logging
import math
from typing import Collection, Dict, List

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["build_optimizer", "parameter_groups", "apply_epoch_schedule"]

logger = logging.getLogger(__name__)

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def parameter_groups(model: nn.Module, base_lr: float, backbone_multiplier: float, linear_proj_multiplier: float,
                     weight_decay: float) -> List[Dict]:
    """Trainable parameters in three groups: backbone, sampling-offset / reference-point layers, the rest."""
    groups = {"backbone": [], "linear_proj": [], "other": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone.") or ".backbone." in name:
            groups["backbone"].append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(param)
        else:
            groups["other"].append(param)
    lrs = {"backbone": base_lr * backbone_multiplier, "linear_proj": base_lr * linear_proj_multiplier,
           "other": base_lr}
    return [{"params": params, "lr": lrs[name], "weight_decay": weight_decay, "name": name}
            for name, params in groups.items() if params]


def _with_total_norm_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """A subclass of ``optimizer_cls`` that clips the norm of all gradients together before each step."""

    class TotalNormClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    TotalNormClipped.__name__ = f"TotalNormClipped{optimizer_cls.__name__}"
    return TotalNormClipped


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) on :func:`parameter_groups`; ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` clips the
    norm of all gradients together, "value"/"norm" are Detectron2's per-parameter clipping.
    With ``SOLVER.SQRT_LR_SCALING`` the learning rates are scaled by sqrt(IMS_PER_BATCH / 16), as the authors do."""
    solver = cfg.SOLVER
    base_lr = solver.BASE_LR
    if solver.SQRT_LR_SCALING:
        base_lr *= math.sqrt(solver.IMS_PER_BATCH / 16)
    groups = parameter_groups(model, base_lr, solver.BACKBONE_MULTIPLIER, solver.LINEAR_PROJ_MULTIPLIER,
                              solver.WEIGHT_DECAY)
    optimizer_type = solver.OPTIMIZER.upper()
    if optimizer_type == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    elif optimizer_type == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {solver.OPTIMIZER!r}")
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_total_norm_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.ENABLED:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    logger.info("optimizer %s, learning rates %s", optimizer_cls.__name__,
                {g["name"]: g["lr"] for g in groups})
    return optimizer_cls(groups, lr=base_lr, **kwargs)


def apply_epoch_schedule(cfg, dataset_size: int, command_line_keys: Collection[str] = ()) -> None:
    """With ``SOLVER.EPOCHS > 0``, set MAX_ITER and STEPS (from SOLVER.LR_DROP_EPOCHS) in iterations, and log them.

    ``SOLVER.MAX_ITER`` or ``SOLVER.STEPS`` in ``command_line_keys`` (given on the command line) keep their
    value: a short run of a config with an epoch schedule is ``... SOLVER.MAX_ITER 5``.
    """
    if cfg.SOLVER.EPOCHS <= 0:
        return
    iters_per_epoch = math.ceil(dataset_size / cfg.SOLVER.IMS_PER_BATCH)
    derived = {"MAX_ITER": int(cfg.SOLVER.EPOCHS * iters_per_epoch),
               "STEPS": tuple(int(e * iters_per_epoch) for e in cfg.SOLVER.LR_DROP_EPOCHS)}
    schedule = []
    for key, value in derived.items():
        if f"SOLVER.{key}" in command_line_keys:
            schedule.append(f"{key} {cfg.SOLVER[key]} (from the command line; the epochs give {value})")
        else:
            cfg.SOLVER[key] = value
            schedule.append(f"{key} {value}")
    logger.info("SOLVER.EPOCHS %g of %d images, %d iterations an epoch: %s", cfg.SOLVER.EPOCHS, dataset_size,
                iters_per_epoch, ", ".join(schedule))
