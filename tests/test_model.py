"""The model family through the Detectron2 interface, and the sparse encoder against references.

Tiny models (hidden 32, 2 layers, 10 queries, 5 classes) come from the project's config files
(see conftest.py); images of 20x30 and so on are padded in one batch, so every test sees padding.
"""
import math
import re

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torchvision.ops import box_convert

from conftest import CONFIG_DIR
from sparse_detr.transformer import SparseDeformableTransformer, TransformerOutput

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = {  # config -> (TWO_STAGE, WITH_BOX_REFINE, EFF_QUERY_INIT, EFF_SPECIFIC_HEAD, RHO, USE_ENC_AUX_LOSS)
    "deformable_detr_r50.yaml": (False, False, False, False, 0.0, False),
    "deformable_detr_r50_bbr_two_stage.yaml": (True, True, False, False, 0.0, False),
    "efficient_detr_r50.yaml": (True, True, True, True, 0.0, False),
    "sparse_detr_r50_rho0.5.yaml": (True, True, True, True, 0.5, True),
}
NUM_CLASSES, NUM_QUERIES = 5, 10

# Images 20x30 and 24x18 pad to 24x30. ResNet-50 maps and the extra level: (3, 4), (2, 2), (1, 1), (1, 1).
# Level masks are the image mask resized by nearest interpolation: on the 3x4 level the 24x18 image keeps
# rows 0, 8, 16 and columns 0, 7, 15 of 0, 7, 15, 22 (9 tokens), all 4 tokens of the 2x2 level (columns 0
# and 15), and the single tokens of the last two levels: 15 valid tokens against the other image's 18.
SMALL_BATCH = [{"height": 20, "width": 30, "out_size": (40, 60)}, {"height": 24, "width": 18}]
SMALL_SHAPES = [[3, 4], [2, 2], [1, 1], [1, 1]]
SMALL_VALID_TOKENS = [18, 15]


def expected_loss_keys(config_name, dec_layers, enc_layers):
    two_stage, _, _, _, rho, enc_aux = VARIANTS[config_name]
    suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)]
    suffixes += ["_enc"] if two_stage else []
    suffixes += [f"_enc_{i}" for i in range(enc_layers - 1)] if enc_aux else []
    keys = {f"loss_{name}{suffix}" for name in ("ce", "bbox", "giou") for suffix in suffixes}
    return keys | ({"loss_mask_prediction"} if rho > 0 else set())


def flags(transformer):
    return (transformer.two_stage, transformer.with_box_refine, transformer.eff_query_init,
            transformer.eff_specific_head, transformer.rho, transformer.use_enc_aux_loss)


# ---- outputs of every variant --------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(VARIANTS))
def test_raw_output_shapes(config_name, tiny_model, make_batch):
    model = tiny_model(config_name, dtype=torch.float32)
    assert flags(model.transformer) == VARIANTS[config_name]
    two_stage, _, _, _, rho, enc_aux = VARIANTS[config_name]
    with torch.no_grad():
        out = model.predict(make_batch(*SMALL_BATCH))
    n, q, k, s, d, m, levels, points = 2, NUM_QUERIES, NUM_CLASSES, 18, 2, 2, 4, 4

    assert out.spatial_shapes.tolist() == SMALL_SHAPES
    assert out.level_start_index.tolist() == [0, 12, 16, 17]
    assert (~out.padding_mask).sum(1).tolist() == SMALL_VALID_TOKENS
    assert len(out.pred_logits) == len(out.pred_boxes) == d
    for logits, boxes in zip(out.pred_logits, out.pred_boxes):
        assert logits.shape == (n, q, k) and boxes.shape == (n, q, 4)
        assert logits.dtype == boxes.dtype == torch.float32
        assert ((boxes >= 0) & (boxes <= 1)).all()
    assert out.dec_sampling_locations.shape == (n, d, q, m, levels, points, 2)
    assert out.dec_attention_weights.shape == (n, d, q, m, levels, points)
    torch.testing.assert_close(out.dec_attention_weights.sum((-2, -1)), torch.ones(n, d, q, m))

    if two_stage:
        assert out.enc_logits.shape == (n, s, k) and out.enc_boxes.shape == (n, s, 4)
    else:
        assert out.enc_logits is None and out.enc_boxes is None
    if rho == 0:
        assert out.token_scores is None and out.kept_tokens is None and out.sparse_token_nums is None
        assert out.enc_aux_logits == [] and out.enc_aux_boxes == []
        return
    # n_i = floor(rho * valid_i) + 1: floor(0.5 * 18) + 1 = 10 and floor(0.5 * 15) + 1 = 8; k = max n_i
    assert out.sparse_token_nums.tolist() == [10, 8]
    assert out.kept_tokens.shape == (n, 10) and out.token_scores.shape == (n, s)
    assert len(out.enc_aux_logits) == len(out.enc_aux_boxes) == (1 if enc_aux else 0)
    for logits, boxes in zip(out.enc_aux_logits, out.enc_aux_boxes):
        assert logits.shape == (n, 10, k) and boxes.shape == (n, 10, 4)
    scores = out.token_scores
    assert (scores[out.padding_mask] == scores.min()).all()  # padded tokens get the batch minimum
    kept_scores = scores.gather(1, out.kept_tokens)
    assert (kept_scores[:, 1:] <= kept_scores[:, :-1]).all()  # best first
    for i in range(n):
        assert len(set(out.kept_tokens[i].tolist())) == 10
        others = torch.ones(s, dtype=torch.bool).index_fill(0, out.kept_tokens[i], False)
        assert kept_scores[i].min() >= scores[i][others].max()  # the top k
        n_i = out.sparse_token_nums[i]
        assert not out.padding_mask[i, out.kept_tokens[i, :n_i]].any()


@pytest.mark.parametrize("config_name", list(VARIANTS))
def test_inference_instances_rescaled_to_requested_size(config_name, tiny_model, make_batch):
    model = tiny_model(config_name, dtype=torch.float32)
    batch = make_batch(*SMALL_BATCH)
    with torch.no_grad():
        results = model(batch)
        out = model.predict(batch)
    assert len(results) == 2
    for i, (result, (out_h, out_w)) in enumerate(zip(results, [(40, 60), (24, 18)])):
        inst = result["instances"]
        assert inst.image_size == (out_h, out_w)
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        # reference: top min(100, Q * K) of sigmoid over queries x classes, boxes scaled to the requested
        # size, clipped to it, empty boxes dropped (Detectron2's detector_postprocess)
        probs = out.pred_logits[-1][i].sigmoid().flatten()
        scores, index = probs.topk(min(100, probs.numel()))
        query, label = index // NUM_CLASSES, index % NUM_CLASSES
        boxes = Boxes(box_convert(out.pred_boxes[-1][i][query], "cxcywh", "xyxy")
                      * torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32))
        boxes.clip((out_h, out_w))
        keep = boxes.nonempty()
        assert len(inst) == int(keep.sum()) > 0
        torch.testing.assert_close(inst.scores, scores[keep], rtol=0, atol=1e-7)
        assert inst.pred_classes.tolist() == label[keep].tolist()
        torch.testing.assert_close(inst.pred_boxes.tensor, boxes.tensor[keep], rtol=0, atol=1e-4)


@pytest.mark.parametrize("config_name", list(VARIANTS))
def test_training_returns_exactly_the_weighted_losses(config_name, tiny_model, make_batch):
    model = tiny_model(config_name, dtype=torch.float32, ENC_LAYERS=3, DEC_LAYERS=3).train()
    model.backbone.requires_grad_(False)  # Detectron2's ResNet: its backward would only cost time here
    batch = make_batch({"height": 20, "width": 30, "boxes": [[2, 3, 14, 15], [10, 4, 28, 19]], "classes": [1, 4]},
                   {"height": 24, "width": 18, "boxes": [[1, 1, 17, 12]], "classes": [0]})
    with EventStorage() as storage:
        losses = model(batch)
    assert set(losses) == expected_loss_keys(config_name, 3, 3)
    for key, value in losses.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value), key
    logged = storage.latest()
    metrics = {"class_error", "cardinality_error"} | ({"dam_recall"} if VARIANTS[config_name][4] > 0 else set())
    assert metrics <= set(logged)
    if "dam_recall" in metrics:
        assert 0.0 <= logged["dam_recall"][0] <= 1.0

    sum(losses.values()).backward()
    # every trainable parameter takes part in the loss (input projections and the heads of every output set)
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if VARIANTS[config_name][4] > 0:  # the DAM loss trains the scoring network
        assert model.transformer.enc_mask_predictor.layer2[-1].weight.grad.abs().sum() > 0


def test_training_without_event_storage_still_returns_losses(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.5.yaml", dtype=torch.float32).train()
    # two images: with hidden 32, GroupNorm(32) on a 1x1 level of a single image has one value per group
    losses = model(make_batch({"height": 20, "width": 30, "boxes": [[2, 3, 14, 15]], "classes": [1]},
                          {"height": 24, "width": 18, "boxes": [[1, 1, 17, 12]], "classes": [0]}))
    assert set(losses) == expected_loss_keys("sparse_detr_r50_rho0.5.yaml", 2, 2)


def test_training_with_an_image_without_objects(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.5.yaml", dtype=torch.float32).train()
    model.backbone.requires_grad_(False)
    batch = make_batch({"height": 20, "width": 30, "boxes": [[2, 3, 14, 15]], "classes": [1]},
                   {"height": 24, "width": 18, "boxes": [], "classes": []})
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.transformer.enc_mask_predictor.layer2[-1].weight.grad.abs().sum() > 0


def test_a_few_adamw_steps_lower_the_loss(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.5.yaml", dtype=torch.float32).train()
    model.backbone.requires_grad_(False)
    batch = make_batch({"height": 32, "width": 48, "boxes": [[4, 4, 20, 16], [24, 10, 44, 30]], "classes": [1, 3]},
                   {"height": 24, "width": 40, "boxes": [[2, 2, 30, 20]], "classes": [0]})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    history = []
    with EventStorage():
        for _ in range(40):
            total = sum(model(batch).values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append(total.item())
    assert sum(history[-3:]) / 3 < 0.7 * history[0], history


# ---- query initialisation and decoder, against the spec ----------------------------------------------


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_box_reference(boxes, num_feats):
    """(N, Q, 4) boxes in [0, 1] -> (N, Q, 4 * num_feats): x, y, w, h blocks of interleaved sin / cos.

    The frequencies are float32 numbers, as in the authors' code, whatever the model's precision.
    """
    out = torch.zeros(*boxes.shape[:2], 4 * num_feats, dtype=torch.float64)
    for c in range(4):
        for k in range(num_feats):
            frequency = torch.tensor(10000 ** (2 * (k // 2) / num_feats), dtype=torch.float32).item()
            angle = boxes[..., c] * (2 * math.pi) / frequency
            out[..., c * num_feats + k] = angle.sin() if k % 2 == 0 else angle.cos()
    return out


def proposal_reference(flat):
    """Two-stage proposals by hand: cell centres over the valid size, w = h = 0.05 * 2^l; (N, S, 4), (N, S)."""
    n = flat.padding_mask.shape[0]
    boxes, valid = [], []
    for level, (h, w) in enumerate(flat.spatial_shapes.tolist()):
        start = int(flat.level_start_index[level])
        mask = flat.padding_mask[:, start:start + h * w].view(n, h, w)
        level_boxes = torch.zeros(n, h, w, 4, dtype=torch.float64)
        for b in range(n):
            valid_w, valid_h = int((~mask[b, 0]).sum()), int((~mask[b, :, 0]).sum())
            for i in range(h):
                for j in range(w):
                    level_boxes[b, i, j] = torch.tensor([(j + 0.5) / valid_w, (i + 0.5) / valid_h,
                                                         0.05 * 2 ** level, 0.05 * 2 ** level])
        boxes.append(level_boxes.flatten(1, 2))
        valid.append(~mask.flatten(1) & ((level_boxes > 0.01) & (level_boxes < 0.99)).all(-1).flatten(1))
    return torch.cat(boxes, 1), torch.cat(valid, 1)


@pytest.mark.parametrize("config_name", list(VARIANTS))
def test_queries_references_and_predictions_follow_the_spec(config_name, tiny_model, make_batch):
    model = tiny_model(config_name)
    transformer, d = model.transformer, 32
    two_stage, box_refine, eff_query_init, eff_specific_head, _, _ = VARIANTS[config_name]
    batch = make_batch(*SMALL_BATCH)
    calls = []
    hooks = [layer.register_forward_hook(lambda module, args, output: calls.append((args, output)))
             for layer in transformer.decoder.layers]
    with torch.no_grad():
        out = model.predict(batch)
        flat = model.flatten_features(model.preprocess_image(batch))
    for hook in hooks:
        hook.remove()
    (tgt, query_pos, reference_arg, memory, *_), _ = calls[0]
    n = memory.shape[0]

    with torch.no_grad():
        if two_stage:
            boxes, valid = proposal_reference(flat)
            head = transformer.bbox_embed[2]  # after the 2 decoder layers' heads
            projected = transformer.enc_output_norm(transformer.enc_output(memory * valid[..., None]))
            torch.testing.assert_close(out.enc_logits, transformer.class_embed[2](projected), rtol=0, atol=1e-12)
            enc_boxes = (inverse_sigmoid(boxes).masked_fill(~valid[..., None], math.inf) + head(projected)).sigmoid()
            # proposals are float32, as in the authors' code, even in a float64 model
            torch.testing.assert_close(out.enc_boxes, enc_boxes, rtol=0, atol=1e-7)
            objectness = out.enc_logits.max(-1).values if eff_specific_head else out.enc_logits[..., 0]
            top = objectness.topk(NUM_QUERIES, dim=1).indices
            reference = out.enc_boxes.gather(1, top[..., None].expand(-1, -1, 4))
            pos = transformer.pos_trans_norm(transformer.pos_trans(sine_box_reference(reference, d // 2)))
            if eff_query_init:  # content: the selected encoder tokens; position: the d-dim projection
                expected_tgt, expected_pos = memory.gather(1, top[..., None].expand(-1, -1, d)), pos
            else:  # the 2d projection split into position, then content
                expected_pos, expected_tgt = pos[..., :d], pos[..., d:]
        else:
            expected_pos, expected_tgt = transformer.query_embed.weight.expand(n, -1, -1).split(d, dim=-1)
            reference = transformer.reference_points(expected_pos).sigmoid()
        torch.testing.assert_close(tgt, expected_tgt, rtol=0, atol=1e-12)
        torch.testing.assert_close(query_pos, expected_pos, rtol=0, atol=1e-12)

        for lid, ((_, _, reference_arg, layer_memory, *_), (layer_out, _)) in enumerate(calls):
            assert layer_memory is memory
            ratios = flat.valid_ratios if reference.shape[-1] == 2 else flat.valid_ratios.repeat(1, 1, 2)
            torch.testing.assert_close(reference_arg, reference[:, :, None] * ratios[:, None], rtol=0, atol=1e-12)
            head = lid if transformer.separate_heads else 0
            delta = transformer.bbox_embed[head](layer_out)
            if reference.shape[-1] == 4:
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:  # a 2-d point only moves the centre
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            torch.testing.assert_close(out.pred_boxes[lid], boxes, rtol=0, atol=1e-12)
            torch.testing.assert_close(out.pred_logits[lid], transformer.class_embed[head](layer_out), rtol=0,
                                       atol=1e-12)
            if box_refine:
                reference = boxes


# ---- input flattening -----------------------------------------------------------------------------


def sine_reference(mask, num_feats):
    """Slow sine embedding of a (N, H, W) padding mask: (N, 2 * num_feats, H, W), y block then x block."""
    n, h, w = mask.shape
    out = torch.zeros(n, 2 * num_feats, h, w, dtype=torch.float64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = (int((~mask[b, : i + 1, j]).sum()) - 0.5) / (int((~mask[b, :, j]).sum()) + 1e-6) * 2 * math.pi
                x = (int((~mask[b, i, : j + 1]).sum()) - 0.5) / (int((~mask[b, i, :]).sum()) + 1e-6) * 2 * math.pi
                for k in range(num_feats):
                    t = 10000 ** (2 * (k // 2) / num_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j], out[b, num_feats + k, i, j] = trig(y / t), trig(x / t)
    return out


def test_level_masks_are_the_nearest_resized_image_mask(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.5.yaml", dtype=torch.float32)
    # 17x25 padded to 32x48; levels (4, 6), (2, 3), (1, 2), (1, 1). Nearest resizing samples image rows
    # 0, 8, 16, 24 and columns 0, 8, ..., 40 on the first level: 3 x 4 valid; (0, 16) x (0, 16, 32): 2 x 2;
    # columns 0 and 24 on the third level: both valid, where dividing the size by the stride (ceil(25 / 32)
    # = 1) would keep one.
    with torch.no_grad():
        flat = model.flatten_features(model.preprocess_image(make_batch({"height": 32, "width": 48},
                                                                    {"height": 17, "width": 25})))
    assert flat.spatial_shapes.tolist() == [[4, 6], [2, 3], [1, 2], [1, 1]]
    expected = [torch.ones(4, 6, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool),
                torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)]  # True = padded
    expected[0][:3, :4] = False
    expected[1][:, :2] = False
    for level, (mask, want) in enumerate(zip(flat.padding_mask[1].split([24, 6, 2, 1]), expected)):
        assert mask.tolist() == want.flatten().tolist(), level
    assert not flat.padding_mask[0].any()
    assert flat.valid_token_counts == [33, 12 + 4 + 2 + 1]
    ratios = torch.tensor([[4 / 6, 3 / 4], [2 / 3, 1.0], [1.0, 1.0], [1.0, 1.0]])  # (w, h) per level
    torch.testing.assert_close(flat.valid_ratios[1], ratios)
    torch.testing.assert_close(flat.valid_ratios[0], torch.ones(4, 2))
    # position embedding of every level at unpadded tokens (padded ones divide by ~1e-6 and are never
    # used): the sine embedding of the level's mask plus the level embedding
    for level, (h, w) in enumerate(flat.spatial_shapes.tolist()):
        start = int(flat.level_start_index[level])
        level_mask = flat.padding_mask[:, start:start + h * w]
        want = sine_reference(level_mask.view(2, h, w), 16).flatten(2).transpose(1, 2).float()
        want = want + model.transformer.level_embed[level]
        got = flat.pos[:, start:start + h * w]
        torch.testing.assert_close(got[~level_mask], want[~level_mask], rtol=0, atol=1e-5)


def test_encoder_reference_points_are_cell_centres_over_the_valid_size(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.5.yaml")
    with torch.no_grad():
        flat = model.flatten_features(model.preprocess_image(make_batch({"height": 32, "width": 48},
                                                                        {"height": 17, "width": 25})))
    points = SparseDeformableTransformer.encoder_reference_points(flat)
    assert points.shape == (2, 33, 4, 2)
    ratios = flat.valid_ratios.double()
    for b in range(2):
        token = 0
        for level, (h, w) in enumerate(flat.spatial_shapes.tolist()):
            for i in range(h):
                for j in range(w):
                    x = (j + 0.5) / (ratios[b, level, 0] * w)
                    y = (i + 0.5) / (ratios[b, level, 1] * h)
                    want = torch.stack([x * ratios[b, :, 0], y * ratios[b, :, 1]], -1)  # seen on every level
                    torch.testing.assert_close(points[b, token].double(), want, rtol=1e-6, atol=1e-6)
                    token += 1


# ---- initialisation (training from scratch) ------------------------------------------------------


@pytest.mark.parametrize("config_name", list(VARIANTS))
def test_head_initialisation(config_name, tiny_model):
    transformer = tiny_model(config_name, dtype=torch.float32).transformer
    two_stage, box_refine, _, _, _, enc_aux = VARIANTS[config_name]
    expected_heads = (2 + int(two_stage) + int(enc_aux)) if box_refine or enc_aux else 1  # D = 2, E = 2
    assert len(transformer.class_embed) == len(transformer.bbox_embed) == expected_heads
    for head in transformer.class_embed:  # prior probability 0.01
        torch.testing.assert_close(head.bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
    for i, head in enumerate(transformer.bbox_embed):
        last = head.layers[-1]
        assert len(head.layers) == 3 and not last.weight.any() and not last.bias[:2].any()
        expected = 0.0 if two_stage else -2.0  # the one shared head without two-stage; every head with it
        assert last.bias[2:].tolist() == [expected, expected], i


def test_box_refinement_without_two_stage_biases_only_the_first_box_head(tiny_model):
    transformer = tiny_model("deformable_detr_r50.yaml", dtype=torch.float32, WITH_BOX_REFINE=True).transformer
    assert [head.layers[-1].bias[2:].tolist() for head in transformer.bbox_embed] == [[-2.0, -2.0], [0.0, 0.0]]


def test_initial_reference_points_spread_over_the_image():
    """Single-stage Deformable DETR: 300 learned queries whose reference points start spread over the image.

    In the authors' code the query embedding is an ``nn.Embedding`` of the detector, outside the transformer
    whose matrices are Xavier-initialised, so it keeps PyTorch's N(0, 1); sigmoid(Linear(position)) then
    spreads the reference points over the image. Xavier on a 300 x 512 table (std 0.05) would put all
    of them within a few hundredths of the image centre.
    """
    torch.manual_seed(0)
    transformer = SparseDeformableTransformer(num_classes=80, num_encoder_layers=1, num_decoder_layers=1)
    embedding = transformer.query_embed.weight
    assert embedding.shape == (300, 512)
    with torch.no_grad():
        reference = transformer.reference_points(embedding[:, :256]).sigmoid()  # the position half
    assert (reference.std(0) > 0.15).all(), f"initial reference points: std {reference.std(0).tolist()}"
    assert abs(embedding.std().item() - 1.0) < 0.05 and abs(embedding.mean().item()) < 0.05


# ---- the sparse encoder --------------------------------------------------------------------------

# Images 32x48 and 16x24 pad to 32x48: levels (4, 6), (2, 3), (1, 2), (1, 1), 33 tokens. The small image's
# nearest-resized masks keep 2 x 3, 1 x 2, 1 x 1 and 1 x 1 of them: 10 valid tokens.
UNEVEN_BATCH = [{"height": 32, "width": 48}, {"height": 16, "width": 24}]


def flat_features(model, batch):
    with torch.no_grad():
        return model.flatten_features(model.preprocess_image(batch))


def encoder_memory(transformer, flat):
    """The encoder's final memory (N, S, C) and the output it filled (kept tokens, n_i)."""
    out = TransformerOutput(pred_logits=[], pred_boxes=[])
    proposals, proposal_valid = transformer.proposals(flat)
    with torch.no_grad():
        memory, values = transformer._encode(flat, proposals, proposal_valid, out)
    assert values is memory  # no autocast
    return memory, out


def reference_sparse_encoder(transformer, flat, kept, sparse_token_nums):
    """The authors' semantics with a loop over images: memory[i].scatter(0, kept[i][:n_i], query[i][:n_i]).

    Returns the final memory and the selected tokens (queries) after every layer.
    """
    reference = transformer.encoder_reference_points(flat)
    memory = flat.tokens
    query = torch.stack([memory[i, kept[i]] for i in range(len(kept))])
    query_pos = torch.stack([flat.pos[i, kept[i]] for i in range(len(kept))])
    query_ref = torch.stack([reference[i, kept[i]] for i in range(len(kept))])
    queries = []
    for layer in transformer.encoder.layers:
        query, _ = layer(query, query_pos, query_ref, memory, flat.spatial_shapes, flat.level_start_index,
                         flat.padding_mask)
        queries.append(query)
        updated = []
        for i, n_i in enumerate(sparse_token_nums.tolist()):
            index = kept[i, :n_i, None].expand(-1, memory.shape[-1])
            updated.append(memory[i].scatter(0, index, query[i, :n_i]))
        memory = torch.stack(updated)
    return memory, queries


def test_vectorised_write_back_matches_per_image_reference(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", ENC_LAYERS=3)
    transformer = model.transformer
    flat = flat_features(model, make_batch(*UNEVEN_BATCH))
    memory, out = encoder_memory(transformer, flat)
    kept, nums = out.kept_tokens, out.sparse_token_nums
    # floor(0.3 * 33) + 1 = 10 and floor(0.3 * 10) + 1 = 4: image 1 has 6 selected tokens it does not write back
    assert nums.tolist() == [10, 4] and kept.shape == (2, 10)
    with torch.no_grad():
        expected, queries = reference_sparse_encoder(transformer, flat, kept, nums)
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-12)
    # tokens outside the first n_i keep their backbone features, those written back do not
    for i, n_i in enumerate(nums.tolist()):
        untouched = torch.ones(memory.shape[1], dtype=torch.bool).index_fill(0, kept[i, :n_i], False)
        torch.testing.assert_close(memory[i, untouched], flat.tokens[i, untouched], rtol=0, atol=0)
        assert (memory[i, kept[i, :n_i]] - flat.tokens[i, kept[i, :n_i]]).abs().amin(-1).gt(0).all()
    # the encoder auxiliary heads see every selected token, those beyond n_i updated layer after layer too;
    # their heads follow the 2 decoder layers and the two-stage head
    proposals = torch.stack([transformer.proposals(flat)[0][i, kept[i]] for i in range(2)])
    assert len(out.enc_aux_logits) == 2
    with torch.no_grad():
        for lid, query in enumerate(queries[:-1]):
            head = 2 + 1 + lid
            torch.testing.assert_close(out.enc_aux_logits[lid], transformer.class_embed[head](query),
                                       rtol=0, atol=1e-12)
            torch.testing.assert_close(out.enc_aux_boxes[lid],
                                       (transformer.bbox_embed[head](query) + proposals).sigmoid(),
                                       rtol=0, atol=1e-12)


def test_rho_one_sparse_encoder_equals_dense_encoder(tiny_model, make_batch):
    # Padded tokens score the batch minimum: a valid token of the padded image holding that minimum would tie
    # with them and could miss the n_i = valid_i + 1 written back. These weights avoid the tie (checked below).
    sparse = tiny_model("sparse_detr_r50_rho0.2.yaml", seed=1, RHO=1.0)
    dense = tiny_model("efficient_detr_r50.yaml", seed=2)
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert missing == []
    # the scoring network and the encoder auxiliary heads (indices after 2 decoder layers + two-stage head)
    assert unexpected and all(re.match(r"transformer\.(enc_mask_predictor\.|(class|bbox)_embed\.3\.)", k)
                              for k in unexpected), unexpected
    flat = flat_features(sparse, make_batch(*UNEVEN_BATCH))  # the dense model's backbone and projections are the same
    sparse_memory, out = encoder_memory(sparse.transformer, flat)
    dense_memory, _ = encoder_memory(dense.transformer, flat)
    valid = ~flat.padding_mask
    for i, n_i in enumerate(out.sparse_token_nums.tolist()):  # every unpadded token is updated
        written = torch.zeros_like(valid[i]).index_fill(0, out.kept_tokens[i, :n_i], True)
        assert (written | ~valid[i]).all()
    assert valid.sum().item() == 33 + 10
    torch.testing.assert_close(sparse_memory[valid], dense_memory[valid], rtol=0, atol=1e-10)


# ---- every config file builds ----------------------------------------------------------------------

ALL_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))
ROW_PATTERN = re.compile(r"^(deformable_detr|efficient_detr|sparse_detr)_(r50|swint)(_.*)?\.yaml$")
CONFIGS = [name for name in ALL_CONFIGS if ROW_PATTERN.match(name)]  # one per row of the results tables
OTHER_CONFIGS = [name for name in ALL_CONFIGS if not ROW_PATTERN.match(name)]


def expected_flags(config_name):
    """The switches of the row the file is named after (SPEC's table of the model family)."""
    if config_name.startswith("sparse_detr"):
        return (True, True, True, True, float(re.search(r"rho([0-9.]+)\.yaml$", config_name).group(1)), True)
    if config_name.startswith("efficient_detr"):
        return (True, True, True, True, 0.0, False)
    two_stage = "bbr_two_stage" in config_name
    return (two_stage, two_stage, False, False, 0.0, False)


def test_every_row_has_a_config():
    assert len(CONFIGS) == 21
    for backbone in ("r50", "swint"):
        for name in (["deformable_detr_{}.yaml", "deformable_detr_{}_bbr_two_stage.yaml", "efficient_detr_{}.yaml"]
                     + [f"sparse_detr_{{}}_rho0.{i}.yaml" for i in range(1, 6)]):
            assert name.format(backbone) in CONFIGS
    assert all(f"sparse_detr_r50_scrl_rho0.{i}.yaml" in CONFIGS for i in range(1, 6))


@pytest.mark.parametrize("config_name", CONFIGS)
def test_config_merges_and_builds(config_name, project_cfg, tiny_model, make_batch):
    cfg = project_cfg(config_name, tiny=False)
    sd = cfg.MODEL.SPARSE_DETR
    assert cfg.MODEL.META_ARCHITECTURE == "SparseDETR" and cfg.INPUT.FORMAT == "RGB"
    assert (sd.TWO_STAGE, sd.WITH_BOX_REFINE, sd.EFF_QUERY_INIT, sd.EFF_SPECIFIC_HEAD, sd.RHO,
            sd.USE_ENC_AUX_LOSS) == expected_flags(config_name)
    assert (sd.HIDDEN_DIM, sd.NHEADS, sd.ENC_LAYERS, sd.DEC_LAYERS, sd.DIM_FEEDFORWARD) == (256, 8, 6, 6, 1024)
    assert (sd.NUM_FEATURE_LEVELS, sd.ENC_N_POINTS, sd.DEC_N_POINTS, sd.NUM_QUERIES, sd.DROPOUT) == (4, 4, 4, 300, 0.1)
    swin = "_swint" in config_name
    if swin:
        assert cfg.MODEL.BACKBONE.NAME == "build_swin_backbone"
        assert (cfg.MODEL.SWIN.EMBED_DIM, list(cfg.MODEL.SWIN.DEPTHS), list(cfg.MODEL.SWIN.NUM_HEADS),
                cfg.MODEL.SWIN.WINDOW_SIZE, cfg.MODEL.SWIN.DROP_PATH_RATE) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 0.2)
    else:
        r = cfg.MODEL.RESNETS
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
        assert (r.DEPTH, r.STRIDE_IN_1X1, r.NORM, list(r.OUT_FEATURES)) == (50, False, "FrozenBN",
                                                                            ["res3", "res4", "res5"])
    if "_scrl_" in config_name:
        assert "scrl" in cfg.MODEL.WEIGHTS.lower()
        plain = project_cfg(config_name.replace("_scrl", ""), tiny=False)
        plain.MODEL.WEIGHTS = cfg.MODEL.WEIGHTS
        assert plain.dump() == cfg.dump()  # SCRL rows differ from their rho row only in the initialisation

    model = tiny_model(config_name, dtype=torch.float32)
    assert flags(model.transformer) == expected_flags(config_name)
    assert isinstance(model.backbone, SwinTransformer if swin else ResNet)
    trainable = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("layers.") else "")
                 for name, p in model.backbone.named_parameters() if p.requires_grad}
    if swin:  # patch embedding and the first stage frozen
        assert trainable == {"layers.1", "layers.2", "layers.3", "norm1", "norm2", "norm3"}
    else:  # stem and res2 frozen, frozen batch norm everywhere
        assert trainable == {"res3", "res4", "res5"}
        norms = {type(m).__name__ for m in model.backbone.modules() if "Norm" in type(m).__name__}
        assert norms == {"FrozenBatchNorm2d"}
    with torch.no_grad():  # two images: GroupNorm(32) of hidden 32 on a 1x1 level needs more than one value
        results = model(make_batch(*SMALL_BATCH))
    assert [r["instances"].image_size for r in results] == [(40, 60), (24, 18)]
    assert all(len(r["instances"]) > 0 for r in results)


@pytest.mark.parametrize("config_name", OTHER_CONFIGS)
def test_other_config_merges_and_builds_as_written(config_name, project_cfg, make_batch):
    cfg = project_cfg(config_name, tiny=False)
    sd = cfg.MODEL.SPARSE_DETR
    model = build_model(cfg).eval()
    assert flags(model.transformer) == (sd.TWO_STAGE, sd.WITH_BOX_REFINE, sd.EFF_QUERY_INIT, sd.EFF_SPECIFIC_HEAD,
                                        sd.RHO, sd.USE_ENC_AUX_LOSS)
    assert model.transformer.d_model == sd.HIDDEN_DIM and len(model.transformer.encoder.layers) == sd.ENC_LAYERS
    with torch.no_grad():
        (result,) = model(make_batch({"height": 40, "width": 60}))
    assert len(result["instances"]) > 0


def test_a_cuda_config_on_a_machine_without_a_gpu_is_one_clear_error(project_cfg, monkeypatch):
    """The configs' MODEL.DEVICE is "cuda": without a GPU, building the model says which key to set (instead of a
    stack trace from PyTorch's CUDA initialisation naming a missing NVIDIA driver)."""
    cfg = project_cfg("sparse_detr_r50_rho0.3.yaml")
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"MODEL.DEVICE is 'cuda' but PyTorch finds no CUDA GPU here: set MODEL.DEVICE "
                                         r"cpu \(demo.py: --opts MODEL.DEVICE cpu"):
        build_model(cfg)
