"""The fast inference path (sparse_detr/inference.py): same detections, model untouched, the switch.

Tiny models of every config family (conftest's TINY transformer on the config's backbone) with their
frozen batch norms given random statistics, so that folding them changes every convolution.
"""
import copy
from pathlib import Path

import pytest
import torch
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock
from detectron2.utils.events import EventStorage

from conftest import build_config
from sparse_detr import inference
from sparse_detr.backbone import sine_position_embedding
from sparse_detr.inference import (CenteredGroupNorm, FastInferenceModel, build_inference_model, fold_batch_norms,
                                   has_native_bf16, inference_precision)
from sparse_detr.fusion import (FLOAT32_MATMUL_ENV, PACKED_FLOAT32_MIN_ROWS, FusedConv, PackedLinear, WinogradConv,
                                fuse_resnet, pack_linears)
from sparse_detr.layers import MSDeformAttn, UnprojectedValues
from sparse_detr.transformer import SparseDeformableTransformer

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["deformable_detr_r50.yaml", "deformable_detr_r50_bbr_two_stage.yaml", "efficient_detr_r50.yaml",
            "sparse_detr_r50_rho0.3.yaml", "sparse_detr_swint_rho0.2.yaml"]
# one image alone (no padding) and a padded pair
BATCHES = [[dict(height=64, width=96)], [dict(height=64, width=80, out_size=(128, 160)), dict(height=48, width=96)]]


@torch.no_grad()
def randomise_norms(model, seed=0):
    """Frozen and eval-mode batch norms with statistics of their own, so that folding is not an identity."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            channels = m.weight.shape[0]
            m.weight.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
            m.bias.copy_(0.1 * torch.randn(channels, generator=generator))
            m.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            m.running_var.copy_(1 + 0.3 * torch.rand(channels, generator=generator))
    return model


def assert_same_detections(expected, actual, box_atol=1e-3, score_atol=1e-5):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert e.image_size == a.image_size
        torch.testing.assert_close(a.scores, e.scores, rtol=0, atol=score_atol)
        assert torch.equal(a.pred_classes, e.pred_classes)
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=0, atol=box_atol)


@pytest.mark.parametrize("config_name", FAMILIES)
@pytest.mark.parametrize("batch", BATCHES, ids=["one image", "padded pair"])
def test_float32_fast_path_gives_the_plain_detections(config_name, batch, tiny_model, make_batch):
    model = randomise_norms(tiny_model(config_name, dtype=torch.float32))
    fast = FastInferenceModel(model, torch.float32)
    inputs = make_batch(*batch, seed=1)
    with torch.no_grad():
        expected = model(inputs)
    actual = fast(inputs)
    assert_same_detections(expected, actual)
    if model.transformer.rho > 0:  # the DAM recall's masses too
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a["dam_recall"]["kept_mass"], e["dam_recall"]["kept_mass"])
            torch.testing.assert_close(a["dam_recall"]["total_mass"], e["dam_recall"]["total_mass"])


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_float32_fast_path_gives_the_plain_detections_with_either_matmul_library(library, tiny_model, make_batch,
                                                                                 monkeypatch):
    """Whichever library runs the float32 products (MKL on Intel's CPUs, oneDNN on other x86 ones; both on any
    machine here), the fast ResNet-50 model gives the plain detections: its Winograd convolutions and linear layers
    take that library."""
    monkeypatch.setenv(FLOAT32_MATMUL_ENV, library)
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    fast = FastInferenceModel(model, torch.float32)
    assert {m.products for m in fast.modules() if isinstance(m, WinogradConv)} == {library}
    assert {m.float32_min_rows for m in fast.modules() if isinstance(m, PackedLinear)} == {
        0 if library == "onednn" else PACKED_FLOAT32_MIN_ROWS}
    inputs = make_batch(*BATCHES[1], seed=1)
    with torch.no_grad():
        expected = model(inputs)
    assert_same_detections(expected, fast(inputs))


def test_fast_path_skips_what_detections_do_not_use(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    inputs = make_batch(dict(height=64, width=96), seed=2)
    full, fast = model.predict(inputs), FastInferenceModel(model).predict(inputs)
    assert len(full.enc_aux_logits) == 1 and full.enc_boxes is not None and len(full.pred_logits) == 2
    assert fast.enc_aux_logits == [] and fast.enc_boxes is None and len(fast.pred_logits) == 1
    # float32 rounding differs (folded norms, channels-last convolutions through a ResNet-50)
    torch.testing.assert_close(fast.pred_logits[0], full.pred_logits[-1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fast.pred_boxes[0], full.pred_boxes[-1], rtol=1e-4, atol=1e-5)
    assert torch.equal(fast.kept_tokens, full.kept_tokens) and torch.equal(fast.query_tokens, full.query_tokens)


def test_folding_leaves_the_model_and_its_checkpoints_untouched(tiny_model, make_batch, tmp_path):
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastInferenceModel(model, torch.bfloat16)
    fast(make_batch(dict(height=64, width=96), seed=3))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53  # ResNet-50's, still there
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    # the model still trains, and what it saves loads into a fresh model
    model.train()
    inputs = make_batch(dict(height=64, width=96, boxes=[[4, 4, 40, 50]], classes=[1]), seed=4)
    with EventStorage():
        sum(model(inputs).values()).backward()
    assert model.transformer.class_embed[0].weight.grad is not None
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    fresh = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32, seed=9)
    fresh.load_state_dict(torch.load(tmp_path / "model.pth")["model"], strict=True)
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_fold_batch_norms_equals_the_unfolded_backbone(tiny_model):
    model = randomise_norms(tiny_model("deformable_detr_r50.yaml", dtype=torch.float64))
    image = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = model.backbone(image)
        assert fold_batch_norms(model.backbone) == 53
        actual = model.backbone(image)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-10)


def test_sparse_encoder_updates_in_place_only_without_autograd(tiny_model, make_batch):
    """Without autograd the sparse encoder writes its updated tokens into one copy of the memory in place; with
    autograd it scatters out of place. Both give the same detections."""
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float64)
    inputs = make_batch(dict(height=64, width=96), dict(height=48, width=80), seed=2)
    with torch.no_grad():
        in_place = model(inputs)
    out_of_place = model(inputs)
    assert_same_detections(out_of_place, in_place, box_atol=1e-10, score_atol=1e-12)


@pytest.mark.parametrize("config_name", ["sparse_detr_r50_rho0.3.yaml", "deformable_detr_r50_bbr_two_stage.yaml"])
def test_bfloat16_inference_casts_the_memory_once(config_name, tiny_model, make_batch, monkeypatch):
    """Under autocast without autograd, every value projection (encoder, two-stage head, decoder) reads one bf16
    copy of the memory, which the sparse encoder keeps up to date: the same detections, bit for bit, as casting the
    memory again in each layer. With autograd (training) the layers keep their own casts."""
    model = tiny_model(config_name, dtype=torch.float32)
    fast = FastInferenceModel(model, torch.bfloat16)
    fast.model.transformer.project_values_after_sampling = False  # (without AMX its decoder may sample first)
    inputs = make_batch(dict(height=64, width=96), dict(height=48, width=80), seed=4)
    seen = {}
    def recorder(name):
        def record(module, args):
            seen.setdefault(name, args[0].dtype)
        return record

    hooks = [m.value_proj.register_forward_pre_hook(recorder(name))
             for name, m in fast.named_modules() if isinstance(m, MSDeformAttn)]
    shared = fast.predict(inputs)
    for hook in hooks:
        hook.remove()
    # a dense encoder's layers each read a new memory: they cast it as before
    readers = [name for name in seen if ".decoder." in name or fast.model.transformer.rho > 0]
    assert len(readers) >= 2 and all(seen[name] == torch.bfloat16 for name in readers)
    monkeypatch.setattr(SparseDeformableTransformer, "_shared_values", staticmethod(lambda memory: memory))
    per_layer = fast.predict(inputs)
    assert torch.equal(shared.pred_logits[-1], per_layer.pred_logits[-1])
    assert torch.equal(shared.pred_boxes[-1], per_layer.pred_boxes[-1])
    assert torch.equal(shared.dec_sampling_locations, per_layer.dec_sampling_locations)
    monkeypatch.undo()

    memory = torch.randn(1, 5, 8)
    assert SparseDeformableTransformer._shared_values(memory) is memory  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SparseDeformableTransformer._shared_values(memory) is memory  # autograd on
        with torch.no_grad():
            copy_ = SparseDeformableTransformer._shared_values(memory)
    assert copy_.dtype == torch.bfloat16 and torch.equal(copy_, memory.bfloat16())


@pytest.mark.parametrize("references", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("levels", [1, 4])
def test_folded_point_locations_equal_reference_plus_scaled_offsets(levels, references):
    """The fast path's sampling locations (points: one matrix multiplication of [query, reference]; boxes: one
    addcmul) are the layer's reference + offsets / (W_l, H_l) or centre + offsets / P * size / 2, in float32 within
    rounding, also inside a bf16 autocast (where the points' sampling-offset layer stays in float32); with autograd
    on, the layer computes them as before."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=levels, n_heads=4, n_points=3)
    with torch.no_grad():  # offsets of the size a trained layer predicts, not the initial pattern alone
        attn.sampling_offsets.weight.normal_(0, 0.5)
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5], [2, 3]][:levels])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    query, value = torch.randn(2, 11, 64), torch.randn(2, int(shapes.prod(1).sum()), 64)
    reference = torch.rand(2, 11, levels, references)
    expected = attn(query, reference, value, shapes, starts)
    attn.fold_point_locations = True
    assert torch.equal(attn(query, reference, value, shapes, starts).sampling_locations,
                       expected.sampling_locations)  # autograd on: the layer's own computation
    with torch.no_grad():
        folded = attn(query, reference, value, shapes, starts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded_bf16 = attn(query, reference, value, shapes, starts)
    torch.testing.assert_close(folded.sampling_locations, expected.sampling_locations, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded.output, expected.output, rtol=1e-5, atol=1e-5)
    assert folded_bf16.sampling_locations.dtype == torch.float32
    if references == 2:
        torch.testing.assert_close(folded_bf16.sampling_locations, expected.sampling_locations, rtol=1e-6, atol=1e-6)
    else:  # the bare layer's offsets come in bf16 under autocast (the fast path keeps the layer in float32)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            offsets = attn.sampling_offsets(query).float().view(2, 11, 4, levels, 3, 2)
        boxes = reference[:, :, None, :, None]
        torch.testing.assert_close(folded_bf16.sampling_locations, boxes[..., :2] + offsets / 3 * boxes[..., 2:] * 0.5,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("references", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("levels", [None, 0, 1, 2, 3])
def test_sampling_unprojected_values_equals_projecting_first(references, levels):
    """MSDeformAttn given UnprojectedValues samples the tokens of its first ``levels`` levels (all: None) and
    projects the samples, projecting the other levels' tokens first: the same output as projecting every token and
    zeroing the padded ones (float64, 1e-10), with padded tokens and sampling points beyond the maps' edges (whose
    taps outside read zeros: the bias enters with the in-map taps' weight only)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 2.0)  # far from the reference: many points leave the map
        attn.attention_weights.weight.normal_(0, 1.0)
        attn.value_proj.bias.normal_(0, 1.0)
    shapes = torch.tensor([[9, 11], [5, 6], [3, 3]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(shapes.prod(1).sum())
    query, value = torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, tokens, 32, dtype=torch.float64)
    reference = torch.rand(2, 7, 3, references, dtype=torch.float64) * 1.2 - 0.1
    padding = torch.rand(2, tokens) < 0.3
    with torch.no_grad():
        for mask in (None, padding):
            expected = attn(query, reference, value, shapes, starts, mask)
            actual = attn(query, reference, UnprojectedValues.of(value, mask, levels), shapes, starts, mask)
            assert actual.sampling_locations.abs().max() > 1  # some points outside the maps
            torch.testing.assert_close(actual.output, expected.output, rtol=1e-10, atol=1e-10)
            assert torch.equal(actual.sampling_locations, expected.sampling_locations)


def test_decoder_samples_first_where_that_costs_less(tiny_model, make_batch, monkeypatch):
    """The fast path's float32 decoder samples the memory first when the rule says it costs less (at 800x1199:
    300 queries sample all 4 levels first, the sparse encoder's 2,000 the first 2; 300 queries on a small image
    and every token as a query (Deformable DETR's encoder) project first), and still gives the plain detections
    (scores within 1e-5) on a padded pair; the bf16 path projects first where the CPU has AMX, samples first where
    it does not."""
    paper = SparseDeformableTransformer(num_classes=91, rho=0.1, two_stage=True)  # the paper's dimensions
    levels = [(100, 150), (50, 75), (25, 38), (13, 19)]  # 800x1199
    decoder, encoder = paper.decoder.layers[0].cross_attn, paper.encoder.layers[0].self_attn
    assert paper._levels_sampled_first(decoder, 300, levels) == 4  # the decoder
    assert paper._levels_sampled_first(encoder, 1995, levels) == 2  # the sparse encoder's kept tokens (rho 0.1)
    assert paper._levels_sampled_first(encoder, 19947, levels) == 0  # every token
    assert paper._levels_sampled_first(decoder, 300, [(25, 38), (13, 19), (7, 10), (4, 5)]) == 0  # a small image
    # the taps are the given attention's: an encoder of 4x the points samples fewer levels first
    dense = SparseDeformableTransformer(num_classes=91, rho=0.1, two_stage=True, enc_n_points=16)
    assert paper._levels_sampled_first(dense.encoder.layers[0].self_attn, 1995, levels) < 2
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    transformer = model.transformer
    fast = FastInferenceModel(model, torch.float32)
    assert fast.model.transformer.project_values_after_sampling and not transformer.project_values_after_sampling
    for amx in (True, False):
        monkeypatch.setattr(inference, "has_amx", lambda amx=amx: amx)
        assert FastInferenceModel(model, torch.bfloat16).model.transformer.project_values_after_sampling is not amx
    calls = []
    sample_then_project = MSDeformAttn._sample_then_project
    monkeypatch.setattr(MSDeformAttn, "_sample_then_project",
                        lambda self, *args: calls.append(1) or sample_then_project(self, *args))
    monkeypatch.setattr(type(transformer), "TAP_COST", 0)  # the tiny images' few tokens: sample first anyway
    inputs = make_batch(*BATCHES[1], seed=3)
    with torch.no_grad():
        expected = model(inputs)
    assert calls == []  # the plain model projects first
    actual = fast(inputs)
    assert len(calls) == len(transformer.decoder.layers)
    assert_same_detections(expected, actual)


@pytest.mark.parametrize("levels", [1, 2])
def test_float32_sparse_encoder_samples_its_largest_levels_first(tiny_model, make_batch, monkeypatch, levels):
    """On an unpadded image the float32 fast path's sparse encoder samples the first levels the rule names before
    projecting (its memory itself, updated in place by each layer: no copy goes stale) and projects the others'
    tokens: the plain detections (scores within 1e-5); padded batches and bf16 project first."""
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    transformer = model.transformer
    monkeypatch.setattr(type(transformer), "_levels_sampled_first", lambda self, attn, queries, shapes: levels)
    seen = []
    sample_levels_first = MSDeformAttn._sample_levels_first
    monkeypatch.setattr(MSDeformAttn, "_sample_levels_first",
                        lambda self, value, *args: seen.append(value.levels) or sample_levels_first(self, value, *args))
    encoder, decoder = len(transformer.encoder.layers), len(transformer.decoder.layers)
    for batch, split in ((BATCHES[0], True), (BATCHES[1], False)):
        inputs = make_batch(*batch, seed=4)
        with torch.no_grad():
            expected = model(inputs)
        seen.clear()
        assert_same_detections(expected, FastInferenceModel(model, torch.float32)(inputs))
        assert seen == [levels] * (encoder * split + decoder)
    seen.clear()
    monkeypatch.setattr(inference, "has_amx", lambda: False)  # bf16 samples first in the decoder only
    FastInferenceModel(model, torch.bfloat16)(make_batch(*BATCHES[0], seed=4))
    assert seen == [levels] * decoder


def test_fast_sparse_encoder_reports_kept_tokens_best_first(tiny_model, make_batch):
    """The fast path's encoder takes its queries in token order (cache-friendly), and reports the kept tokens
    best first as the model does; a padded batch writes back only n_i tokens of each image either way."""
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float64)
    inputs = make_batch(dict(height=64, width=96), dict(height=40, width=56), seed=6)
    full = model.predict(inputs)
    fast = model.predict(inputs, detections_only=True)
    assert torch.equal(fast.kept_tokens, full.kept_tokens)
    assert not torch.equal(fast.kept_tokens, fast.kept_tokens.sort(1).values)  # best first is not token order
    assert torch.equal(fast.query_tokens, full.query_tokens)
    torch.testing.assert_close(fast.pred_logits[0], full.pred_logits[-1].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.pred_boxes[0], full.pred_boxes[-1].detach(), rtol=1e-10, atol=1e-10)


def test_input_projections_are_packed(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    assert all(isinstance(proj[0], FusedConv) for proj in fast.model.input_proj)
    assert all(type(proj[0]) is torch.nn.Conv2d for proj in model.input_proj)  # the model keeps its own
    assert isinstance(fast.model.transformer.encoder.layers[0].linear1, PackedLinear)
    assert isinstance(FastInferenceModel(model, torch.bfloat16).model.transformer.encoder.layers[0].linear1,
                      PackedLinear)
    assert type(model.transformer.encoder.layers[0].linear1) is torch.nn.Linear
    assert all(m.fold_point_locations for m in fast.modules() if isinstance(m, MSDeformAttn))
    assert not any(m.fold_point_locations for m in model.modules() if isinstance(m, MSDeformAttn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpadded_position_embedding_is_the_same_by_rows_and_columns(tiny_model, dtype):
    """Without padding, the fast path embeds positions once a row and once a column and writes them into the
    flattened layout once: the per-level path's values bit for bit (the same float32 operations on the same
    inputs, then the same cast and addition of the level embedding), for every level shape and a batch of two."""
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    torch.nn.init.normal_(model.transformer.level_embed)
    shapes = [(13, 19), (7, 3), (1, 1), (2, 5)]
    maps = [torch.randn(2, 32, h, w).to(dtype) for h, w in shapes]
    expected = []
    for level, feature in enumerate(maps):
        level_pos = sine_position_embedding(torch.zeros(2, *feature.shape[-2:], dtype=torch.bool), 16).to(dtype)
        level_embed = model.transformer.level_embed[level].to(dtype)
        expected.append(level_pos.flatten(2).transpose(1, 2) + level_embed.view(1, 1, -1))
    with torch.no_grad():
        actual = model._unpadded_positions(maps)
    assert actual.dtype == dtype and torch.equal(actual, torch.cat(expected, 1))
    fast = FastInferenceModel(model, torch.float32)
    assert fast.model.position_embedding_by_rows_and_columns
    assert not model.position_embedding_by_rows_and_columns  # the plain path computes them as the authors do
    calls = []
    unpadded_positions = type(model)._unpadded_positions
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "_unpadded_positions", lambda self, m: calls.append(1) or unpadded_positions(self, m))
        fast.predict([{"image": torch.rand(3, 64, 96) * 255}])  # unpadded
        fast.predict([{"image": torch.rand(3, 64, 96) * 255}, {"image": torch.rand(3, 48, 80) * 255}])  # padded
    assert calls == [1]


def test_a_float32_packed_linear_takes_onednn_only_for_many_rows():
    """Below PACKED_FLOAT32_MIN_ROWS rows a float32 PackedLinear is the plain layer (MKL's addmm, bit for bit) and
    packs nothing; from there on it runs oneDNN with the packed weight, within float32 rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 91)
    packed = PackedLinear(linear)
    few = torch.randn(2, 300, 256)
    assert torch.equal(packed(few), linear(few))
    assert "_packed_weights" not in packed.__dict__
    many = torch.randn(1, PACKED_FLOAT32_MIN_ROWS, 256)
    torch.testing.assert_close(packed(many), linear(many), rtol=1e-5, atol=1e-5)
    assert "weight" in packed._packed_weights and packed(many).dtype == torch.float32


def test_input_projections_centre_their_group_norms(tiny_model):
    """After the channels-last backbone, the input projections' GroupNorm subtracts each group's mean first: within
    float32 rounding of float64 also for features whose mean is large against their spread (where PyTorch's
    channels-last GroupNorm on the CPU loses digits), and in channels-last memory still."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 256)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(1, 256, 13, 19) + 10).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double())
    actual = CenteredGroupNorm.of(norm)(x)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-5)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    assert all(type(proj[1]) is CenteredGroupNorm for proj in fast.model.input_proj)
    assert all(type(proj[1]) is torch.nn.GroupNorm for proj in model.input_proj)  # the model keeps its own


def test_a_fused_convolution_packs_its_weight_again_for_a_new_input_shape():
    """oneDNN's kernel, and the layout it reads the weight in, depend on the input's shape: in float32 the packed
    weight follows the shape (one packing at a time) and the weight; the outputs stay the convolution's. In bf16
    the first packing serves every shape."""
    torch.manual_seed(0)
    conv = D2Conv2d(32, 64, kernel_size=1, stride=2, bias=True)
    fused = FusedConv(conv, relu=True)
    with torch.no_grad():
        for shape in ((1, 32, 20, 30), (2, 32, 7, 9), (1, 32, 20, 30)):
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fused(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2).relu(),
                                       rtol=1e-5, atol=1e-5)
            assert fused._packed_weights["weight"][0][-1] == shape
            packed = fused._packed_weights["weight"][1]
            fused(x)
            assert fused._packed_weights["weight"][1] is packed  # the same shape: no packing again
        conv.to(torch.bfloat16)
        for shape in ((1, 32, 20, 30), (2, 32, 7, 9)):
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            expected = torch.nn.functional.conv2d(x.bfloat16(), conv.weight, conv.bias, stride=2).relu()
            torch.testing.assert_close(fused(x).float(), expected.float(), rtol=0.02, atol=0.02)
            assert fused._packed_weights["weight"][0][-1] is None


def test_fused_resnet_equals_the_folded_one(tiny_model):
    """After folding, the stem and every block run their convolutions with the ReLU and the residual addition as
    oneDNN post-ops: the same features in float32; in bf16 as close as bf16 rounding allows."""
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    backbone = model.backbone
    image = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert fuse_resnet(backbone) == 0  # batch norms not folded yet: nothing to fuse
        fold_batch_norms(backbone)
        folded = copy.deepcopy(backbone)
        expected = folded(image)
        assert fuse_resnet(backbone) == 53
        assert isinstance(backbone.stem.conv1, FusedConv) and not any(
            isinstance(m, (BottleneckBlock, BasicStem)) for m in backbone.modules())
        # every block sums into its shortcut in place: a projection's output, or the previous block's in a stage
        assert all(block.sum_into_shortcut for stage in backbone.stages for block in stage)
        actual = backbone(image)
        other_size = torch.randn(2, 3, 48, 80).contiguous(memory_format=torch.channels_last)  # weights packed once
        for name, feature in folded(other_size).items():
            scale = feature.abs().max().item()
            torch.testing.assert_close(backbone(other_size)[name], feature, rtol=0, atol=1e-5 * scale)
        copied = copy.deepcopy(backbone)  # the packed weights are a cache: a copy packs its own
        torch.testing.assert_close(copied(other_size)["res5"], backbone(other_size)["res5"], rtol=0, atol=0)
        for name in expected:  # float32 rounding at the features' magnitude (oneDNN may sum in another order)
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5 * scale)
        folded.to(torch.bfloat16), backbone.to(torch.bfloat16)
        expected, actual = folded(image.bfloat16()), backbone(image)
        for name in expected:
            assert actual[name].dtype == torch.bfloat16
            scale = expected[name].float().abs().max()
            assert (actual[name].float() - expected[name].float()).abs().max() <= 0.05 * scale


def test_packed_linears_equal_the_layers_they_replace():
    """pack_linears swaps every nn.Linear (not a multi-head attention's) for one oneDNN call with the weight packed
    once and the bias fused: the same outputs in float32 within rounding, in bf16 within bf16 rounding; the packed
    weight follows the layer's weight and is not copied with the module."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    reference = copy.deepcopy(module)
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        assert pack_linears(module) == 2 and pack_linears(attention) == 0
        assert isinstance(module[0], PackedLinear) and type(attention.out_proj) is not PackedLinear
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-6)
        module[2].linear.weight.mul_(2)  # an in-place change repacks
        reference[2].weight.mul_(2)
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-6)
        copied = copy.deepcopy(module)
        assert "_packed_weights" not in copied[0].__dict__ and torch.equal(copied(x), module(x))
        module.to(torch.bfloat16)
        out = module(x)  # float32 input taken in the weights' dtype, as a bf16 autocast would
        assert out.dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(x)
        assert (out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()


def test_fusion_leaves_other_backbones_as_they_are(tiny_model):
    """GroupNorm (the demo's backbone) cannot be folded, Swin has no ResNet blocks: both stay unfused."""
    for config_name in ("demo.yaml", "sparse_detr_swint_rho0.2.yaml"):
        model = tiny_model(config_name, dtype=torch.float32, tiny=config_name != "demo.yaml")
        fold_batch_norms(model.backbone)
        before = [type(m) for m in model.backbone.modules()]
        assert fuse_resnet(model.backbone) == 0
        assert [type(m) for m in model.backbone.modules()] == before


def test_bfloat16_keeps_the_precision_sensitive_layers_in_float32(tiny_model, make_batch):
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.bfloat16)
    transformer = fast.model.transformer
    fp32 = [m.sampling_offsets for m in transformer.modules() if isinstance(m, MSDeformAttn)]
    fp32 += [m.attention_weights for m in transformer.modules() if isinstance(m, MSDeformAttn)]
    fp32 += list(transformer.class_embed) + list(transformer.bbox_embed) + [transformer.enc_mask_predictor.layer2[-1]]
    assert all(p.dtype == torch.float32 for m in fp32 for p in m.parameters())
    assert transformer.encoder.layers[0].linear1.weight.dtype == torch.bfloat16
    assert fast.model.backbone.module.res4[0].inner[1].conv.weight.dtype == torch.bfloat16  # conv2, fused
    out = fast.predict(make_batch(dict(height=64, width=96), seed=5))
    assert out.pred_logits[-1].dtype == out.pred_boxes[-1].dtype == torch.float32
    assert out.dec_sampling_locations.dtype == out.dec_attention_weights.dtype == torch.float32
    assert out.token_scores.dtype == torch.float32


def test_the_switch_and_the_precision(project_cfg, tiny_model):
    cfg = project_cfg("sparse_detr_r50_rho0.3.yaml")
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    assert cfg.TEST.FAST_INFERENCE and cfg.TEST.PRECISION == "auto"
    cfg.TEST.FAST_INFERENCE = False
    assert build_inference_model(cfg, model) is model
    cfg.TEST.FAST_INFERENCE, cfg.TEST.PRECISION = True, "float32"
    assert build_inference_model(cfg, model).dtype == torch.float32
    cfg.TEST.PRECISION = "bfloat16"
    assert build_inference_model(cfg, model).dtype == torch.bfloat16
    auto = torch.bfloat16 if has_native_bf16() else torch.float32
    assert inference_precision("auto", torch.device("cpu")) == auto
    assert inference_precision("auto", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="TEST.PRECISION must be one of"):
        inference_precision("half", torch.device("cpu"))


def test_eval_mode_batch_norm_folds_too():
    cfg = build_config("demo.yaml", tiny=True)
    cfg.MODEL.RESNETS.NORM = "BN"
    model = randomise_norms(build_model(cfg).eval())
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model.backbone(image)
        assert fold_batch_norms(model.backbone) == 12  # stem, 4 stages x 2 convs, 3 shortcuts (res3-res5)
        actual = model.backbone(image)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


def test_masked_group_norm_is_group_norm_of_the_unpadded_image():
    from sparse_detr.meta_arch import masked_group_norm

    norm = torch.nn.GroupNorm(4, 8).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    valid = torch.ones(2, 5, 7, dtype=torch.bool)
    valid[1, 3:], valid[1, :, 5:] = False, False  # the second image is 3 x 5
    y = masked_group_norm(x, norm, valid)
    torch.testing.assert_close(y[0], norm(x[:1])[0])
    torch.testing.assert_close(y[1, :, :3, :5], norm(x[1:, :, :3, :5])[0])
    assert y[1, :, 3:].abs().max() == 0 and y[1, :, :, 5:].abs().max() == 0


def test_padding_invariant_features_zero_the_padded_tokens(make_batch):
    cfg = build_config("demo.yaml", tiny=True, PADDING_INVARIANT=True)
    model = build_model(cfg).eval()
    images = model.preprocess_image(make_batch(dict(height=64, width=96), dict(height=96, width=64), seed=6))
    with torch.no_grad():
        flat = model.flatten_features(images)
    padded = flat.padding_mask
    assert padded.any() and flat.tokens[padded].abs().max() == 0 and flat.tokens[~padded].abs().sum() > 0


@pytest.mark.parametrize("config_name", ["demo.yaml", "deformable_detr_r50_bbr_two_stage.yaml"])
def test_padding_invariant_detections_do_not_depend_on_the_batch(config_name, make_batch):
    """With PADDING_INVARIANT an image gives the same detections alone and beside a larger image (any order)."""
    torch.manual_seed(0)
    model = build_model(build_config(config_name, tiny=config_name != "demo.yaml", PADDING_INVARIANT=True))
    model = model.double().eval()
    small, large = make_batch(dict(height=165, width=213), dict(height=225, width=298), seed=7)
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        first, second = model([small, large])[0]["instances"], model([large, small])[1]["instances"]
    for batched in (first, second):
        torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-6)
        assert torch.equal(batched.pred_classes, alone.pred_classes)
        torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-3)


# ---- bfloat16 on the trained demo model ----------------------------------------------------------------

DEMO_WEIGHTS = Path(__file__).resolve().parent / "data" / "demo_model" / "model_final_fp16.pth"
BF16_SCORE_ATOL = 0.03  # a detection's score, bf16 against float32
BF16_MIN_IOU = 0.9  # its box
BF16_MARGIN = 0.05  # detections this close to the threshold may fall on either side of it


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from detectron2.structures import Boxes, pairwise_iou

    return pairwise_iou(Boxes(a), Boxes(b))


def demo_val_images(count: int):
    """``count`` images as the demo's val split draws them (the generator's own seeds), as model inputs."""
    from sparse_detr.data.synthetic import DEFAULT_SEED, _image_rng, render_sample

    items = []
    for index in range(count):
        image = render_sample(_image_rng(DEFAULT_SEED, "val", index)).image  # RGB (INPUT.FORMAT), H x W x 3
        items.append({"image": torch.from_numpy(image).permute(2, 0, 1).contiguous()})
    return items


def trained_demo_model(cfg):
    """The demo model `make demo` trained (tests/data/demo_model, weights in float16), in float32, in eval mode."""
    model = build_model(cfg)
    state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def assert_shown_alike(expected, actual, threshold, score_atol, min_iou, margin, what):
    """Every detection either side shows (score >= threshold + margin) has a counterpart on the other side (score
    >= threshold - margin) of the same class, a score within ``score_atol`` and a box of IoU >= ``min_iou``: nothing
    lost, nothing added. Returns how many detections were checked."""
    shown = 0
    for e, a in ((e["instances"], a["instances"]) for e, a in zip(expected, actual)):
        for sure, other in ((e, a), (a, e)):
            keep = sure[sure.scores >= threshold + margin]
            candidates = other[other.scores >= threshold - margin]
            shown += len(keep)
            for i in range(len(keep)):
                same = (candidates.pred_classes == keep.pred_classes[i]) & (
                    (candidates.scores - keep.scores[i]).abs() <= score_atol)
                assert same.any(), f"detection {i} (score {keep.scores[i]:.3f}) has no {what} counterpart"
                iou = box_iou(keep.pred_boxes.tensor[i:i + 1], candidates.pred_boxes.tensor[same]).max()
                assert iou >= min_iou
    return shown


@pytest.mark.parametrize("sample_first", [False, True])  # the bf16 decoder with AMX, and without
def test_bfloat16_on_the_trained_demo_model_keeps_its_detections(project_cfg, sample_first, monkeypatch):
    """The demo model trained by `make demo` (weights in float16, tests/data/demo_model): every detection the
    float32 fast path shows (score above the demo's threshold) is shown by the bf16 path with the same class,
    a score within 0.03 and a box of IoU >= 0.9, and the bf16 path shows nothing else; whether its decoder projects
    the memory first (CPUs with AMX) or samples it first (without)."""
    cfg = project_cfg("demo.yaml", tiny=False)
    model = trained_demo_model(cfg)
    inputs = demo_val_images(12)
    with torch.no_grad():
        fp32 = FastInferenceModel(model, torch.float32)(inputs)
        bf16 = FastInferenceModel(model, torch.bfloat16)
        bf16.model.transformer.project_values_after_sampling = sample_first
        monkeypatch.setattr(type(bf16.model.transformer), "TAP_COST", 0)  # 628 tokens: sample first anyway
        calls = []
        sample_then_project = MSDeformAttn._sample_then_project
        monkeypatch.setattr(MSDeformAttn, "_sample_then_project",
                            lambda self, *args: calls.append(1) or sample_then_project(self, *args))
        bf16 = bf16(inputs)
    assert bool(calls) is sample_first
    shown = assert_shown_alike(fp32, bf16, cfg.TEST.CONFIDENCE_THRESHOLD, BF16_SCORE_ATOL, BF16_MIN_IOU, BF16_MARGIN,
                               "bf16")
    assert shown >= 12  # the images do show objects


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_fast_path_normalises_images_into_the_backbone_layout(dtype, tiny_model, make_batch):
    """On the CPU the fast path's images come normalised straight into the layout its backbone reads
    (SparseDETR.backbone_input, one pass of normalize_image each): channels-last in its dtype, or the int8 ResNet's
    uint8 codes; the predictions are those of normalising as the model trains, bit for bit, for one image and a padded
    pair, of uint8 and float32 images (channels first, or (H, W, C) arrays as the predictor's), Swin's too."""
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    calibration = make_batch(dict(height=64, width=96), seed=4) if dtype == torch.int8 else None
    fast = FastInferenceModel(model, dtype, calibration=calibration)
    layout = fast.model.backbone_input
    assert layout[0] == (torch.uint8 if dtype == torch.int8 else dtype)
    assert (layout[1] == fast.model.backbone.image_qparams) if dtype == torch.int8 else layout[1] is None
    for batch in BATCHES:
        uint8_images = make_batch(*batch, seed=2)
        float_images = [dict(item, image=item["image"].float()) for item in uint8_images]
        hwc_images = [dict(item, image=item["image"].permute(1, 2, 0).contiguous().permute(2, 0, 1))
                      for item in float_images]  # (H, W, C) arrays, as the predictor's
        for inputs in (uint8_images, float_images, hwc_images):
            with torch.no_grad():
                images = fast.model.preprocess_image(inputs)
                assert images.tensor.dtype == layout[0]
                assert images.tensor.is_contiguous(memory_format=torch.channels_last)
                actual = fast.predict(inputs)
                fast.model.backbone_input = None
                expected = fast.predict(inputs)
                fast.model.backbone_input = layout
            assert images.image_sizes == [tuple(item["image"].shape[1:]) for item in inputs]
            assert torch.equal(actual.pred_logits[-1], expected.pred_logits[-1])
            assert torch.equal(actual.pred_boxes[-1], expected.pred_boxes[-1])
    swin = FastInferenceModel(tiny_model("sparse_detr_swint_rho0.2.yaml", dtype=torch.float32))  # channels-last too
    inputs = make_batch(*BATCHES[1], seed=2)
    with torch.no_grad():
        actual = swin.predict(inputs)
        swin.model.backbone_input = None
        assert torch.equal(actual.pred_logits[-1], swin.predict(inputs).pred_logits[-1])


def test_fast_path_writes_a_zero_tokens_projection_over_the_invalid_tokens(tiny_model, make_batch):
    """The two-stage projection of the tokens with invalid ones (padding, cells at the border) zeroed first: the fast
    path (project_invalid_tokens_after, on the CPU) projects every token and writes a zero token's row over the
    invalid ones' instead, the same values bit for bit (float32, bf16, int8 layers); with autograd, as the model
    trains."""
    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    calibration = make_batch(dict(height=64, width=96), seed=4)
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        fast = FastInferenceModel(model, dtype, calibration=calibration if dtype == torch.int8 else None)
        transformer = fast.model.transformer
        assert transformer.project_invalid_tokens_after
        tokens = torch.randn(2, 150, transformer.d_model, generator=generator)
        valid = torch.rand(2, 150, generator=generator) > 0.2
        results = {}
        for after in (False, True):
            transformer.project_invalid_tokens_after = after
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast.dtype == torch.bfloat16):
                results[after] = transformer._project_memory(tokens, valid)
        assert torch.equal(results[True], results[False]), dtype
        assert not torch.equal(results[True][~valid][0], results[True][valid][0])
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast.dtype == torch.bfloat16):
            zeroed = transformer._project_memory(tokens, valid)  # as the model trains: zeroed first
        assert torch.equal(zeroed, results[False])
