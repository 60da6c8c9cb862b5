"""Hungarian matching, the set losses of every output set, and the DAM (decoder cross-attention map) loss."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detectron2.utils import comm

from .dam import dam_recall_masses, dam_recall_summary, output_dam, updated_token_mask
from .transformer import TransformerOutput

__all__ = ["HungarianMatcher", "SetCriterion", "dam_target"]

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
def dam_target(dam: Tensor, padding_mask: Tensor, sparse_token_nums: Tensor) -> Tensor:
    """(N, S) binary target: 1 on the top n_i tokens of image i's DAM (padded tokens rank last)."""
    dam = dam.masked_fill(padding_mask, dam.min() - 1)
    k = min(int(sparse_token_nums.max()), dam.shape[1])
    top = dam.topk(k, dim=1).indices
    ranked = (torch.arange(k, device=dam.device)[None] < sparse_token_nums[:, None]).to(dam.dtype)
    return torch.zeros_like(dam).scatter_(1, top, ranked)


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
