"""The optimizer of the DETR recipe: AdamW with per-module learning rates and clipping of the total gradient norm."""
import logging
import math
from typing import Dict, List, Mapping, NamedTuple

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["build_optimizer", "parameter_groups", "KeyOrigin", "SCHEDULE_KEYS", "settle_schedule"]

logger = logging.getLogger(__name__)

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


# the keys that settle_schedule weighs against each other by where they were set
SCHEDULE_KEYS = ("SOLVER.EPOCHS", "SOLVER.MAX_ITER", "SOLVER.LR_DROP_EPOCHS", "SOLVER.STEPS")


class KeyOrigin(NamedTuple):
    """Where a config key got its value: ``order`` grows with the merge (0: the defaults; then the files in the
    order they are merged, a file's ``_BASE_`` before the file; then the command line's pairs in their order);
    ``where`` names the place."""
    order: int
    where: str


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


def settle_schedule(cfg, origins: Mapping[str, KeyOrigin], dataset_size: int = 0) -> None:
    """Set SOLVER.MAX_ITER and SOLVER.STEPS in iterations, and log which keys decided them.

    The value set last decides (``origins``: where each key was set, see :func:`sparse_detr.cli.key_origins`):
    with ``SOLVER.EPOCHS > 0``, EPOCHS sets MAX_ITER unless MAX_ITER was set after it (in a file merged later,
    or on the command line), and LR_DROP_EPOCHS sets STEPS unless STEPS was set after it; a file that sets both
    of a pair keeps its epochs. Epochs become iterations of IMS_PER_BATCH of the ``dataset_size`` training
    images. Steps at or beyond MAX_ITER would never happen: they are dropped, and the log says so (Detectron2
    would drop them with a warning about STEPS).
    """
    solver = cfg.SOLVER
    epochs = solver.EPOCHS > 0
    iters_per_epoch = math.ceil(dataset_size / solver.IMS_PER_BATCH) if epochs else 0

    def decides(epoch_key: str, iteration_key: str) -> bool:
        return epochs and origins[f"SOLVER.{epoch_key}"].order >= origins[f"SOLVER.{iteration_key}"].order

    def source(key: str) -> str:
        return f"SOLVER.{key} {cfg.SOLVER[key]} ({origins['SOLVER.' + key].where})"

    if decides("EPOCHS", "MAX_ITER"):
        solver.MAX_ITER = int(solver.EPOCHS * iters_per_epoch)
        length = (f"MAX_ITER {solver.MAX_ITER} from {source('EPOCHS')}: {dataset_size} images, "
                  f"{iters_per_epoch} iterations an epoch")
    else:
        length = f"MAX_ITER {solver.MAX_ITER} from SOLVER.MAX_ITER ({origins['SOLVER.MAX_ITER'].where})"
        if epochs:
            length += f", set after {source('EPOCHS')}, which gives {int(solver.EPOCHS * iters_per_epoch)}"
    if decides("LR_DROP_EPOCHS", "STEPS"):
        steps = tuple(int(e * iters_per_epoch) for e in solver.LR_DROP_EPOCHS)
        drops = f"from {source('LR_DROP_EPOCHS')}"
    else:
        steps = tuple(solver.STEPS)
        drops = f"from SOLVER.STEPS ({origins['SOLVER.STEPS'].where})"
    solver.STEPS = tuple(step for step in steps if step < solver.MAX_ITER)
    drops = f"STEPS {solver.STEPS} {drops}"
    if solver.STEPS != steps:
        drops += f", {tuple(s for s in steps if s >= solver.MAX_ITER)} dropped: not before MAX_ITER {solver.MAX_ITER}"
    logger.info("schedule: %s; %s", length, drops)
