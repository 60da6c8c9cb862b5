"""DAM recall: the share of the decoder attention map's mass on the tokens the sparse encoder updated.

Hand-computed toy maps for the per-level masses, the training metrics and the dataset evaluator's pooling;
tiny models for the evaluation outputs (recall 1 when every token is kept) and for train_net's evaluator.
"""
import math
import os
import sys

import pytest
import torch

from sparse_detr.criterion import HungarianMatcher, SetCriterion
from sparse_detr.dam import dam_recall_masses, decoder_attention_map
from sparse_detr.evaluation import DAMRecallEvaluator
from sparse_detr.transformer import TransformerOutput
from sparse_detr.visualization import kept_token_masks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "projects", "SparseDETR"))  # train_net

pytestmark = pytest.mark.usefixtures("single_thread")

# two levels: 2 x 2 (tokens 0-3) and 1 x 2 (tokens 4-5)
SHAPES, STARTS = torch.tensor([[2, 2], [1, 2]]), torch.tensor([0, 4])
SPARSE = "sparse_detr_r50_rho0.5.yaml"
BATCH = ({"height": 20, "width": 30, "out_size": (40, 60)}, {"height": 24, "width": 18})


def test_masses_per_level_hand_computed_with_padding():
    dam = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.5],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    kept = torch.zeros(2, 6, dtype=torch.bool)
    kept[0, [1, 3, 4]] = True
    kept[1, [0, 2, 5]] = True  # tokens 2 and 5 of image 1 are padding: their mass counts nowhere
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, [2, 5]] = True
    kept_mass, total_mass = dam_recall_masses(dam, kept, padding, SHAPES)
    torch.testing.assert_close(kept_mass, torch.tensor([[0.6, 0.5], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(total_mass, torch.tensor([[1.0, 1.0], [3.0, 1.0]], dtype=torch.float64))


def toy_output(kept_tokens, sparse_token_nums):
    """One image, one query, one head, two points per level at exact token positions (no bilinear spread).

    Level 0: weight 0.3 on token 3 and 0.2 on token 0. Level 1: 0.4 on token 5 and 0.1 on token 4.
    """
    locations = torch.tensor([[[0.5, 0.5], [0.0, 0.0]], [[0.5, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    weights = torch.tensor([[0.3, 0.2], [0.4, 0.1]], dtype=torch.float64)
    return TransformerOutput(
        pred_logits=[torch.zeros(1, 1, 2, dtype=torch.float64)], pred_boxes=[torch.full((1, 1, 4), 0.5).double()],
        token_scores=torch.zeros(1, 6, dtype=torch.float64), kept_tokens=torch.tensor([kept_tokens]),
        sparse_token_nums=torch.tensor([sparse_token_nums]),
        dec_sampling_locations=locations.view(1, 1, 1, 1, 2, 2, 2),
        dec_attention_weights=weights.view(1, 1, 1, 1, 2, 2),
        spatial_shapes=SHAPES, level_start_index=STARTS, padding_mask=torch.zeros(1, 6, dtype=torch.bool))


def test_toy_map_lands_on_the_hand_placed_tokens():
    out = toy_output([3, 4, 0], 2)
    dam = decoder_attention_map(SHAPES, STARTS, out.dec_sampling_locations, out.dec_attention_weights)
    torch.testing.assert_close(dam, torch.tensor([[0.2, 0, 0, 0.3, 0.1, 0.4]], dtype=torch.float64))


@pytest.mark.parametrize("kept_tokens, n, expected", [
    ([3, 4, 0], 2, {"dam_recall": 0.4, "dam_recall_level0": 0.6, "dam_recall_level1": 0.2}),  # token 0 not updated
    ([3, 4, 0], 3, {"dam_recall": 0.6, "dam_recall_level0": 1.0, "dam_recall_level1": 0.2}),
    ([1, 2, 5], 3, {"dam_recall": 0.4, "dam_recall_level0": 0.0, "dam_recall_level1": 0.8}),
])
def test_training_metrics_overall_and_per_level(kept_tokens, n, expected):
    criterion = SetCriterion(HungarianMatcher())
    metrics = {}
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    criterion(toy_output(kept_tokens, n), target, metrics)
    assert {k: v for k, v in metrics.items() if k.startswith("dam_recall")} == pytest.approx(expected, abs=1e-12)


def test_evaluator_pools_masses_over_images_and_skips_outputs_without_them():
    evaluator = DAMRecallEvaluator()
    evaluator.reset()
    assert evaluator.evaluate() == {}  # nothing seen: a dense model adds no masses
    masses = lambda kept, total: {"kept_mass": torch.tensor(kept), "total_mass": torch.tensor(total)}  # noqa: E731
    evaluator.process([{}, {}], [{"instances": None, "dam_recall": masses([0.6, 0.5, 0.0], [1.0, 1.0, 0.0])},
                                 {"instances": None}])
    evaluator.process([{}], [{"instances": None, "dam_recall": masses([1.0, 0.0, 0.0], [3.0, 1.0, 0.0])}])
    result = evaluator.evaluate()["dam_recall"]
    assert result["dam_recall"] == pytest.approx(2.1 / 6)  # pooled mass; the mean of per-image recalls is 0.4
    assert result["dam_recall_level0"] == pytest.approx(0.4)
    assert result["dam_recall_level1"] == pytest.approx(0.25)
    assert math.isnan(result["dam_recall_level2"])  # a level without mass has no recall
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_evaluator_pools_the_workers_masses_on_the_main_process(monkeypatch):
    from sparse_detr import evaluation

    evaluator = DAMRecallEvaluator()
    masses = {"kept_mass": torch.tensor([1.0, 2.0]), "total_mass": torch.tensor([2.0, 2.0])}
    evaluator.process([{}], [{"dam_recall": masses}])
    other_workers = [(None, None), (torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 2.0]).double())]
    monkeypatch.setattr(evaluation.comm, "gather", lambda data, dst: [data, *other_workers])
    assert evaluator.evaluate()["dam_recall"] == pytest.approx(
        {"dam_recall": 4 / 8, "dam_recall_level0": 1 / 4, "dam_recall_level1": 3 / 4})
    monkeypatch.setattr(evaluation.comm, "is_main_process", lambda: False)
    assert evaluator.evaluate() == {}  # only the main process reports


def test_keeping_every_token_gives_recall_one(tiny_model, make_batch):
    model = tiny_model(SPARSE, RHO=1.0)
    evaluator = DAMRecallEvaluator()
    batch = make_batch(*BATCH)
    with torch.no_grad():
        outputs = model(batch)
    evaluator.process(batch, outputs)
    result = evaluator.evaluate()["dam_recall"]
    assert len(result) == 1 + 4  # overall and each of the 4 levels
    assert result == pytest.approx({k: 1.0 for k in result}, abs=1e-12)


def test_evaluation_outputs_match_the_dam_of_the_raw_predictions(tiny_model, make_batch):
    model = tiny_model(SPARSE)
    batch = make_batch(*BATCH)
    with torch.no_grad():
        outputs = model(batch)
        out = model.predict(batch)
    dam = decoder_attention_map(out.spatial_shapes, out.level_start_index, out.dec_sampling_locations,
                                out.dec_attention_weights)
    for i, output in enumerate(outputs):
        assert len(output["instances"]) > 0
        # independent path: the kept-token pictures' masks, padding dropped by hand
        kept = torch.cat([torch.from_numpy(m).flatten() for m in kept_token_masks(out, i)])
        valid = ~out.padding_mask[i]
        starts = out.level_start_index.tolist() + [dam.shape[1]]
        for level in range(len(starts) - 1):
            span = slice(starts[level], starts[level + 1])
            mass = dam[i, span] * valid[span]
            assert output["dam_recall"]["kept_mass"][level].item() == pytest.approx((mass * kept[span]).sum().item())
            assert output["dam_recall"]["total_mass"][level].item() == pytest.approx(mass.sum().item())
    recall = sum(o["dam_recall"]["kept_mass"].sum() for o in outputs) / sum(o["dam_recall"]["total_mass"].sum()
                                                                            for o in outputs)
    assert 0.0 < recall.item() < 1.0  # half the tokens kept


def test_no_masses_from_a_dense_model_or_with_the_report_off(tiny_model, make_batch):
    batch = make_batch(*BATCH)
    sparse, dense = tiny_model(SPARSE), tiny_model("deformable_detr_r50_bbr_two_stage.yaml")
    sparse.report_dam_recall = False
    with torch.no_grad():
        for model in (sparse, dense):
            assert all(set(o) == {"instances"} for o in model(batch))


def test_train_net_adds_the_dam_recall_evaluator_for_sparse_models_only(project_cfg, monkeypatch):
    from detectron2.evaluation import DatasetEvaluators
    import train_net

    coco = object()  # the real COCOEvaluator would convert the dataset to COCO json on construction
    monkeypatch.setattr(train_net, "COCOEvaluator", lambda *args, **kwargs: coco)
    sparse = train_net.Trainer.build_evaluator(project_cfg("demo.yaml"), "sparse_detr_shapes_val")
    assert isinstance(sparse, DatasetEvaluators)
    assert sparse._evaluators[0] is coco and isinstance(sparse._evaluators[1], DAMRecallEvaluator)
    dense = project_cfg("demo.yaml", RHO=0.0, USE_ENC_AUX_LOSS=False)
    assert train_net.Trainer.build_evaluator(dense, "sparse_detr_shapes_val") is coco
    off = project_cfg("demo.yaml")
    off.defrost()
    off.TEST.DAM_RECALL = False
    assert train_net.Trainer.build_evaluator(off, "sparse_detr_shapes_val") is coco
