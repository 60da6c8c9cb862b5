"""Hungarian matching, the set losses of every output set, and the DAM (decoder cross-attention map) loss."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detectron2.utils import comm

from .transformer import TransformerOutput

__all__ = ["HungarianMatcher", "SetCriterion", "decoder_attention_map", "dam_target", "output_dam", "updated_token_mask",
           "dam_recall_masses", "dam_recall_summary"]

Targets = List[Dict[str, Tensor]]  # per image: "labels" (T,) int64, "boxes" (T, 4) normalised cxcywh


def _at_least_float32(x: Tensor) -> Tensor:
    """Losses and matching costs in float32 (or float64) even when the model ran in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _matched(targets: Targets, indices, key: str) -> Tensor:
    """The matched ground truth ``key`` ("labels" or "boxes") of every image, concatenated."""
    return torch.cat([t[key][j.to(t[key].device)] for t, (_, j) in zip(targets, indices)])


def _xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground truth per image (scipy's linear_sum_assignment).

    cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: Targets) -> List[Tuple[Tensor, Tensor]]:
        """logits (N, Q, K), boxes (N, Q, 4) -> per image (prediction indices, target indices)."""
        indices = []
        for prob, pred, target in zip(logits.sigmoid(), boxes, targets):
            labels, gt = target["labels"], target["boxes"]
            neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
            pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            cost = (self.cost_bbox * torch.cdist(pred, gt, p=1)
                    + self.cost_class * (pos[:, labels] - neg[:, labels])
                    + self.cost_giou * -generalized_box_iou(_xyxy(pred), _xyxy(gt)))
            rows, cols = linear_sum_assignment(cost.cpu())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices


@torch.no_grad()
def decoder_attention_map(spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """Splat every decoder attention weight bilinearly onto the token grid and sum: the DAM.

    Args:
        sampling_locations: (N, ..., L, P, 2) in [0, 1]; attention_weights: (N, ..., L, P).
    Returns:
        (N, S): each cell gets the bilinear share of the weights at location * (W, H) (no half-pixel
        shift) from its four neighbours; shares falling outside a level's map are dropped.
    """
    n, num_levels = sampling_locations.shape[0], spatial_shapes.shape[0]
    wh = spatial_shapes.flip(-1).to(sampling_locations.dtype)  # (L, 2) as (W, H)
    pixel = sampling_locations * wh[:, None, :]
    low = pixel.floor()
    frac = pixel - low
    low = low.long()
    weights, cells = [], []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        col, row = low[..., 0] + dx, low[..., 1] + dy
        share = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
        width, height = spatial_shapes[:, 1].view(num_levels, 1), spatial_shapes[:, 0].view(num_levels, 1)
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        weights.append(attention_weights * share * inside)
        cells.append(torch.where(inside, level_start_index.view(num_levels, 1) + row * width + col, 0))
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    dam = attention_weights.new_zeros(n, total)
    return dam.scatter_add_(1, torch.stack(cells, -1).reshape(n, -1), torch.stack(weights, -1).reshape(n, -1))


@torch.no_grad()
def dam_target(dam: Tensor, padding_mask: Tensor, sparse_token_nums: Tensor) -> Tensor:
    """(N, S) binary target: 1 on the top n_i tokens of image i's DAM (padded tokens rank last)."""
    dam = dam.masked_fill(padding_mask, dam.min() - 1)
    k = min(int(sparse_token_nums.max()), dam.shape[1])
    top = dam.topk(k, dim=1).indices
    ranked = (torch.arange(k, device=dam.device)[None] < sparse_token_nums[:, None]).to(dam.dtype)
    return torch.zeros_like(dam).scatter_(1, top, ranked)


def output_dam(out: TransformerOutput) -> Tensor:
    """(N, S) DAM of a model's predictions, in at least float32."""
    return decoder_attention_map(out.spatial_shapes, out.level_start_index,
                                 _at_least_float32(out.dec_sampling_locations),
                                 _at_least_float32(out.dec_attention_weights))


def updated_token_mask(out: TransformerOutput) -> Tensor:
    """(N, S) bool: the tokens the sparse encoder updated, the first n_i of each image's kept tokens."""
    k = out.kept_tokens.shape[1]
    updated = torch.arange(k, device=out.kept_tokens.device)[None] < out.sparse_token_nums[:, None]
    mask = torch.zeros(out.kept_tokens.shape[0], int(out.spatial_shapes.prod(1).sum()), dtype=torch.bool,
                       device=out.kept_tokens.device)
    return mask.scatter_(1, out.kept_tokens, updated)


@torch.no_grad()
def dam_recall_masses(dam: Tensor, kept: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
    """Per image and level, the DAM's mass on the kept tokens and its whole mass (padding excluded).

    Args:
        dam: (N, S) decoder attention map; kept: (N, S) bool; padding_mask: (N, S) bool, True on padding.
    Returns:
        ``(kept_mass, total_mass)``, each (N, L). Their ratio is the DAM recall (the authors' "corr").
    """
    level = torch.repeat_interleave(torch.arange(spatial_shapes.shape[0], device=dam.device),
                                    spatial_shapes.prod(1).to(dam.device))
    mass = dam.masked_fill(padding_mask, 0)
    total = mass.new_zeros(dam.shape[0], spatial_shapes.shape[0])
    return total.index_add(1, level, mass * kept), total.index_add_(1, level, mass)


def dam_recall_summary(kept_mass: Tensor, total_mass: Tensor) -> Dict[str, float]:
    """``dam_recall`` and ``dam_recall_level{l}`` from summed (L,) masses: pooled shares of the DAM's mass."""
    kept_mass, total_mass = kept_mass.double().cpu(), total_mass.double().cpu()
    summary = {"dam_recall": (kept_mass.sum() / total_mass.sum().clamp(min=1e-12)).item()}
    for level, (k, t) in enumerate(zip(kept_mass.tolist(), total_mass.tolist())):
        summary[f"dam_recall_level{level}"] = k / t if t > 0 else float("nan")
    return summary


class SetCriterion(nn.Module):
    """Weighted losses of every output set (one helper for all of them) and the DAM prediction loss.

    Names follow the authors' code: ``loss_{ce,bbox,giou}`` for the last decoder layer, ``_0 .. _{D-2}``
    for the others, ``_enc`` for the two-stage head, ``_enc_0 ..`` for the encoder auxiliary heads,
    and ``loss_mask_prediction``.
    """

    def __init__(self, matcher: HungarianMatcher, *, weight_ce: float = 2.0, weight_bbox: float = 5.0,
                 weight_giou: float = 2.0, weight_mask_prediction: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, class_agnostic_two_stage: bool = True):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.weight_mask_prediction = weight_mask_prediction
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_agnostic_two_stage = class_agnostic_two_stage

    def _num_boxes(self, targets: Targets, device) -> float:
        num = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num)
        return max(num.item() / comm.get_world_size(), 1.0)

    def set_losses(self, logits: Tensor, boxes: Tensor, targets: Targets, num_boxes: float,
                   suffix: str = "") -> Tuple[Dict[str, Tensor], List[Tuple[Tensor, Tensor]]]:
        """Match one output set to the targets and return its weighted losses (keys end in ``suffix``)."""
        logits, boxes = _at_least_float32(logits), _at_least_float32(boxes)
        indices = self.matcher(logits, boxes, targets)
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        src = torch.cat([s for s, _ in indices]).to(logits.device)
        labels, gt = _matched(targets, indices, "labels"), _matched(targets, indices, "boxes")

        onehot = torch.zeros_like(logits)
        onehot[batch, src, labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_boxes
        matched = boxes[batch, src]
        loss_bbox = F.l1_loss(matched, gt, reduction="sum") / num_boxes
        loss_giou = (1 - torch.diag(generalized_box_iou(_xyxy(matched), _xyxy(gt)))).sum() / num_boxes
        losses = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {k + suffix: v * self.weights[k] for k, v in losses.items()}, indices

    def forward(self, out: TransformerOutput, targets: Targets,
                metrics: Optional[Dict[str, float]] = None) -> Dict[str, Tensor]:
        """Weighted loss dict; ``metrics``, when given, receives class error, cardinality error and DAM recall."""
        num_boxes = self._num_boxes(targets, out.pred_logits[-1].device)
        losses, indices = self.set_losses(out.pred_logits[-1], out.pred_boxes[-1], targets, num_boxes)
        for i, (logits, boxes) in enumerate(zip(out.pred_logits[:-1], out.pred_boxes[:-1])):
            losses.update(self.set_losses(logits, boxes, targets, num_boxes, f"_{i}")[0])
        if out.enc_logits is not None:
            enc_targets = targets
            if self.class_agnostic_two_stage:
                enc_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            losses.update(self.set_losses(out.enc_logits, out.enc_boxes, enc_targets, num_boxes, "_enc")[0])
        for i, (logits, boxes) in enumerate(zip(out.enc_aux_logits, out.enc_aux_boxes)):
            losses.update(self.set_losses(logits, boxes, targets, num_boxes, f"_enc_{i}")[0])

        dam = None
        if out.token_scores is not None:
            dam = output_dam(out)
            target = dam_target(dam, out.padding_mask, out.sparse_token_nums)
            losses["loss_mask_prediction"] = (
                F.multilabel_soft_margin_loss(_at_least_float32(out.token_scores), target) * self.weight_mask_prediction)
        if metrics is not None:
            metrics.update(self._metrics(out, targets, indices, dam))
        return losses

    @torch.no_grad()
    def _metrics(self, out: TransformerOutput, targets: Targets, indices, dam: Optional[Tensor]) -> Dict[str, float]:
        logits = out.pred_logits[-1]
        matched_logits = torch.cat([lg[s.to(lg.device)] for lg, (s, _) in zip(logits, indices)])
        labels = _matched(targets, indices, "labels")
        accuracy = 100.0 * (matched_logits.argmax(-1) == labels).float().mean().item() if len(labels) else 0.0
        metrics = {"class_error": 100.0 - accuracy}
        # predictions with a class probability above 0.5 against the number of objects, per image
        confident = (logits.sigmoid().max(-1).values > 0.5).sum(1).float()
        counts = torch.tensor([float(len(t["labels"])) for t in targets], device=confident.device)
        metrics["cardinality_error"] = F.l1_loss(confident, counts).item()
        if dam is not None:
            kept, total = dam_recall_masses(dam, updated_token_mask(out), out.padding_mask, out.spatial_shapes)
            metrics.update(dam_recall_summary(kept.sum(0), total.sum(0)))
        return metrics
