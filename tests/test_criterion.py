"""The DAM (decoder cross-attention map) and its target, the Hungarian matcher and the set losses.

Golden values are computed by hand in the comments; the random cases are checked against slow Python loops.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.criterion import HungarianMatcher, SetCriterion, dam_target
from sparse_detr.dam import decoder_attention_map
from sparse_detr.transformer import TransformerOutput

pytestmark = pytest.mark.usefixtures("single_thread")

# Two levels: 3 x 4 (tokens 0..11) and 1 x 2 (tokens 12, 13).
SHAPES = torch.tensor([[3, 4], [1, 2]])
STARTS = torch.tensor([0, 12])


def dam_reference(spatial_shapes, level_start_index, locations, weights):
    """Slow DAM: every weight splatted on the cells around location * (W, H) (no half-pixel shift)."""
    n, num_levels = locations.shape[0], locations.shape[-3]
    total = int(spatial_shapes.prod(1).sum())
    dam = torch.zeros(n, total, dtype=torch.float64)
    flat_locations = locations.reshape(n, -1, num_levels, locations.shape[-2], 2)
    flat_weights = weights.reshape(n, -1, num_levels, weights.shape[-1])
    for b in range(n):
        for entry in range(flat_locations.shape[1]):
            for level, (h, w) in enumerate(spatial_shapes.tolist()):
                for point in range(flat_locations.shape[3]):
                    x = float(flat_locations[b, entry, level, point, 0]) * w
                    y = float(flat_locations[b, entry, level, point, 1]) * h
                    x0, y0 = math.floor(x), math.floor(y)
                    for cx, share_x in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                        for cy, share_y in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            if 0 <= cx < w and 0 <= cy < h:
                                dam[b, int(level_start_index[level]) + cy * w + cx] += (
                                    float(flat_weights[b, entry, level, point]) * share_x * share_y)
    return dam


def xy(x, y):
    return torch.tensor([x, y], dtype=torch.float64)


def test_dam_hand_computed_splats():
    loc = torch.zeros(2, 1, 2, 4, 2, dtype=torch.float64)  # (N, Q, L, P, 2)
    wgt = torch.zeros(2, 1, 2, 4, dtype=torch.float64)
    # image 0, level 0 (H 3, W 4)
    loc[0, 0, 0, 0], wgt[0, 0, 0, 0] = xy(1 / 4, 1 / 3), 0.5  # pixel (1, 1): a cell corner
    loc[0, 0, 0, 1], wgt[0, 0, 0, 1] = xy(2.25 / 4, 0.5 / 3), 0.3  # pixel (2.25, 0.5)
    loc[0, 0, 0, 2], wgt[0, 0, 0, 2] = xy(3.5 / 4, 2.5 / 3), 0.2  # pixel (3.5, 2.5): 3 corners outside
    loc[0, 0, 0, 3], wgt[0, 0, 0, 3] = xy(-0.5 / 4, 1 / 3), 0.4  # pixel (-0.5, 1): left half outside
    # image 0, level 1 (H 1, W 2)
    loc[0, 0, 1, 0], wgt[0, 0, 1, 0] = xy(0.75, 0.5), 0.6  # pixel (1.5, 0.5)
    loc[0, 0, 1, 1], wgt[0, 0, 1, 1] = xy(0.0, 0.0), 0.1  # pixel (0, 0)
    loc[0, 0, 1, 2], wgt[0, 0, 1, 2] = xy(1.0, 0.5), 0.7  # pixel (2, 0.5): wholly outside
    # image 1: one point, pixel (0.5, 2) on level 0
    loc[1, 0, 0, 0], wgt[1, 0, 0, 0] = xy(0.5 / 4, 2 / 3), 1.0

    expected = torch.zeros(2, 14, dtype=torch.float64)
    expected[0, 5] += 0.5  # (row 1, col 1) takes all of the corner point
    expected[0, 2] += 0.3 * 0.75 * 0.5  # (0, 2)
    expected[0, 3] += 0.3 * 0.25 * 0.5  # (0, 3)
    expected[0, 6] += 0.3 * 0.75 * 0.5  # (1, 2)
    expected[0, 7] += 0.3 * 0.25 * 0.5  # (1, 3)
    expected[0, 11] += 0.2 * 0.5 * 0.5  # (2, 3); (2, 4), (3, 3), (3, 4) are outside
    expected[0, 4] += 0.4 * 0.5  # (1, 0); column -1 is outside
    expected[0, 12 + 1] += 0.6 * 0.5 * 0.5  # level 1 (0, 1); column 2 and row 1 are outside
    expected[0, 12 + 0] += 0.1  # level 1 (0, 0)
    expected[1, 8] += 0.5  # (2, 0)
    expected[1, 9] += 0.5  # (2, 1)

    dam = decoder_attention_map(SHAPES, STARTS, loc, wgt)
    assert dam.shape == (2, 14) and dam.dtype == torch.float64
    torch.testing.assert_close(dam, expected, rtol=0, atol=1e-12)


def test_dam_matches_slow_reference_with_decoder_shaped_inputs():
    g = torch.Generator().manual_seed(0)
    n, layers, queries, heads, levels, points = 2, 2, 3, 2, 2, 3  # (N, D, Q, M, L, P) as the decoder returns
    locations = torch.rand(n, layers, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, layers, queries, heads, levels, points, generator=g, dtype=torch.float64)
    dam = decoder_attention_map(SHAPES, STARTS, locations, weights)
    torch.testing.assert_close(dam, dam_reference(SHAPES, STARTS, locations, weights), rtol=0, atol=1e-12)


def test_dam_keeps_the_mass_of_points_well_inside():
    g = torch.Generator().manual_seed(1)
    # x * W and y * H within [0, W - 1] x [0, H - 1] on level 0 (3 x 4): all four corners are inside
    locations = torch.rand(1, 5, 1, 2, 2, generator=g, dtype=torch.float64) * torch.tensor([3 / 4, 2 / 3])
    locations = torch.cat([locations, torch.full_like(locations, 0.25)], 2)  # level 1: pixel (0.5, 0.25), 2 inside
    weights = torch.rand(1, 5, 2, 2, generator=g, dtype=torch.float64)
    dam = decoder_attention_map(SHAPES, STARTS, locations, weights)
    torch.testing.assert_close(dam[0, :12].sum(), weights[..., 0, :].sum(), rtol=0, atol=1e-12)
    torch.testing.assert_close(dam[0, 12:].sum(), weights[..., 1, :].sum() * 0.75, rtol=0, atol=1e-12)


def test_dam_target_takes_top_n_per_image_and_never_padding():
    dam = torch.tensor([[0.1, 0.5, 0.3, 0.0, 0.2, 0.4],
                        [0.9, 0.1, 0.3, 0.2, 5.0, 7.0]], dtype=torch.float64)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    target = dam_target(dam, padding, torch.tensor([3, 2]))
    expected = torch.tensor([[0, 1, 1, 0, 0, 1],  # tokens 1, 5, 2
                             [1, 0, 1, 0, 0, 0]], dtype=torch.float64)  # 0 and 2; padded 4 and 5 rank last
    assert target.dtype == dam.dtype
    torch.testing.assert_close(target, expected, rtol=0, atol=0)


def test_dam_target_ranks_padded_tokens_last_when_n_exceeds_the_valid_tokens():
    dam = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0, 0.5],
                        [0.0, 0.0, 0.1, 0.0, 9.0, 8.0]], dtype=torch.float64)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    target = dam_target(dam, padding, torch.tensor([1, 5]))  # image 1: n_1 = 4 valid tokens + 1
    assert target[0].tolist() == [0, 0, 0, 0, 0, 1]
    assert target[1, :4].tolist() == [1, 1, 1, 1]  # every valid token, zeros included, before any padded one
    assert target[1, 4:].sum() == 1


# ---- matcher and set losses ----------------------------------------------------------------------


def focal(logit: float, target: float, alpha=0.25, gamma=2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def criterion(**kwargs):
    return SetCriterion(HungarianMatcher(), **kwargs).double()


def one_object_target():
    return [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]


def test_set_losses_hand_computed():
    # query 0 is far from the object, query 1 has its centre and width: the matcher must pick query 1
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4]]], dtype=torch.float64)
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)  # p = 1/2 everywhere: the class cost does not decide
    out = TransformerOutput(pred_logits=[logits, logits], pred_boxes=[boxes, boxes])
    losses = criterion()(out, one_object_target())
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    # 3 negatives and 1 positive at p = 1/2: (3 * 0.75 + 0.25) * 0.25 * log 2, one box, weight 2
    ce = 2 * (3 * 0.75 + 0.25) * 0.25 * math.log(2)
    bbox = 5 * 0.2  # |0.4 - 0.2| on h only
    giou = 2 * (1 - 0.5)  # boxes 0.2 x 0.2 inside 0.2 x 0.4: IoU = 1/2, enclosing box = union
    for suffix in ("", "_0"):
        assert losses["loss_ce" + suffix].item() == pytest.approx(ce, abs=1e-12)
        assert losses["loss_bbox" + suffix].item() == pytest.approx(bbox, abs=1e-12)
        assert losses["loss_giou" + suffix].item() == pytest.approx(giou, abs=1e-12)


@pytest.mark.parametrize("class_agnostic", [True, False])
def test_two_stage_loss_is_class_agnostic_unless_specific_head(class_agnostic):
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    enc_logits = torch.tensor([[[2.0, -2.0], [-1.0, -3.0]]], dtype=torch.float64)
    out = TransformerOutput(pred_logits=[torch.zeros(1, 2, 2, dtype=torch.float64)], pred_boxes=[boxes],
                            enc_logits=enc_logits, enc_boxes=boxes)
    losses = criterion(class_agnostic_two_stage=class_agnostic)(out, one_object_target())
    label = 0 if class_agnostic else 1  # class-agnostic: every object is class 0
    ce = sum(focal(enc_logits[0, q, c].item(), q == 0 and c == label) for q in range(2) for c in range(2))
    assert losses["loss_ce_enc"].item() == pytest.approx(2 * ce, abs=1e-12)
    assert losses["loss_bbox_enc"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["loss_giou_enc"].item() == pytest.approx(0.0, abs=1e-12)


def giou(a, b):
    """Generalised IoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_matcher_finds_the_cheapest_assignment_of_the_spec_cost():
    # a draw where dropping any of the three terms, or flipping the class cost, changes the assignment
    g = torch.Generator().manual_seed(26)
    logits = torch.randn(1, 4, 3, generator=g, dtype=torch.float64) * 2
    boxes = torch.rand(1, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2
    gt_boxes = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2
    target = {"labels": torch.tensor([2, 0, 2]), "boxes": gt_boxes}

    def cost(q, t):
        p = torch.sigmoid(logits[0, q, target["labels"][t]]).item()
        pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
        neg = 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
        pred, gt = boxes[0, q].tolist(), target["boxes"][t].tolist()
        return 2 * (pos - neg) + 5 * sum(abs(x - y) for x, y in zip(pred, gt)) - 2 * giou(pred, gt)

    best = min(itertools.permutations(range(4), 3), key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    (rows, cols), = HungarianMatcher()(logits, boxes, [target])
    assert sorted(zip(cols.tolist(), rows.tolist())) == list(enumerate(best))


def test_matcher_returns_empty_indices_for_an_image_without_objects():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    boxes = torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25
    targets = [one_object_target()[0],
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}]
    indices = HungarianMatcher()(logits, boxes, targets)
    assert len(indices) == 2
    assert len(indices[0][0]) == len(indices[0][1]) == 1
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0
    assert indices[1][0].dtype == indices[1][1].dtype == torch.int64


def test_losses_and_gradients_finite_with_an_empty_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = (torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()
    targets = [one_object_target()[0],
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}]
    losses = criterion()(TransformerOutput(pred_logits=[logits], pred_boxes=[boxes]), targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    # the empty image contributes only negatives to the classification loss, and nothing to the box losses
    assert logits.grad[1].abs().sum() > 0 and boxes.grad[1].abs().sum() == 0


def test_whole_batch_empty_divides_by_one_box():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = (torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}
    metrics = {}
    losses = criterion()(TransformerOutput(pred_logits=[logits], pred_boxes=[boxes]), [empty, empty], metrics)
    expected_ce = 2 * sum(focal(v, False) for v in logits.detach().flatten().tolist())  # num_boxes = 1
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-12)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


def test_mask_prediction_loss_uses_the_dam_target_of_the_decoder_attention():
    # one level 2 x 2; the decoder attends only to token 3 of image 0 and tokens 0, 1 of image 1
    locations = torch.zeros(2, 1, 1, 1, 1, 2, 2, dtype=torch.float64)  # (N, D, Q, M, L, P, 2)
    weights = torch.zeros(2, 1, 1, 1, 1, 2, dtype=torch.float64)
    locations[0, ..., 0, :], weights[0, ..., 0] = torch.tensor([0.5, 0.5]), 1.0  # pixel (1, 1): token 3
    locations[1, ..., 0, :], weights[1, ..., 0] = torch.tensor([0.25, 0.0]), 1.0  # pixel (0.5, 0): tokens 0, 1
    scores = torch.tensor([[0.3, -1.0, 0.2, 2.0], [1.0, 0.5, -0.5, -0.5]], dtype=torch.float64)
    boxes = torch.full((2, 1, 4), 0.5, dtype=torch.float64)
    out = TransformerOutput(pred_logits=[torch.zeros(2, 1, 2, dtype=torch.float64)], pred_boxes=[boxes],
                            token_scores=scores, kept_tokens=torch.tensor([[3, 0], [0, 1]]),
                            sparse_token_nums=torch.tensor([1, 2]), dec_sampling_locations=locations,
                            dec_attention_weights=weights, spatial_shapes=torch.tensor([[2, 2]]),
                            level_start_index=torch.tensor([0]), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    metrics = {}
    losses = criterion(weight_mask_prediction=0.5)(out, one_object_target() * 2, metrics)
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.float64)
    expected = 0.5 * F.multilabel_soft_margin_loss(scores, target)
    assert losses["loss_mask_prediction"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["dam_recall"] == pytest.approx(1.0)  # all DAM mass lies on the written-back tokens
