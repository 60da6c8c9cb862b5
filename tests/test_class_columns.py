"""Class heads with a column per category id (the authors' 91-column COCO models), reported in contiguous classes.

A toy COCO-like dataset has the category ids 1, 3, 4 and 9: a model in the "dataset_ids" layout has 10 columns
(ids 0 .. 9, six of them unused), the contiguous model 4.
"""
import json
import os
import re

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import build_config
from sparse_detr.checkpoint import SparseDETRCheckpointer
from sparse_detr.data.synthetic import generate_split
from sparse_detr.meta_arch import class_head_layout

pytestmark = pytest.mark.usefixtures("single_thread")

TOY = "toy_coco_like_ids"
TOY_IDS = [1, 3, 4, 9]
UNUSED = [0, 2, 5, 6, 7, 8]
DEMO_TINY = {"HIDDEN_DIM": 32, "NHEADS": 2, "ENC_LAYERS": 1, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 32,
             "NUM_QUERIES": 30, "DROPOUT": 0.0}


@pytest.fixture(scope="module", autouse=True)
def toy_metadata():
    if TOY not in DatasetCatalog.list():
        DatasetCatalog.register(TOY, lambda: [])
        MetadataCatalog.get(TOY).set(thing_classes=["a", "b", "c", "d"],
                                     thing_dataset_id_to_contiguous_id={i: k for k, i in enumerate(TOY_IDS)})


def toy_cfg(layout: str, dataset: str = TOY, num_classes: int = 4, **overrides):
    cfg = build_config("demo.yaml", tiny=False, **{**DEMO_TINY, "NUM_CLASSES": num_classes, "CLASS_COLUMNS": layout,
                                                   **overrides})
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), (dataset,)
    return cfg


def build(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype).eval()


def class_heads(model):
    return list(model.transformer.class_embed)


def batch(make_batch, with_targets=False):
    specs = [dict(height=64, width=80, out_size=(64, 80)), dict(height=72, width=56, out_size=(72, 56))]
    if with_targets:
        specs[0].update(boxes=[[4, 6, 40, 50], [30, 10, 70, 60]], classes=[0, 3])
        specs[1].update(boxes=[[10, 12, 50, 66]], classes=[2])
    return make_batch(*specs, seed=3)


def test_layout_follows_the_dataset_metadata():
    assert class_head_layout(toy_cfg("dataset_ids")) == (TOY_IDS, TOY_IDS)
    assert class_head_layout(toy_cfg("contiguous")) == (None, TOY_IDS)
    model = build(toy_cfg("dataset_ids"))
    assert [h.out_features for h in class_heads(model)] == [10] * len(class_heads(model))
    assert model.class_columns.tolist() == TOY_IDS
    assert {h.out_features for h in class_heads(build(toy_cfg("contiguous")))} == {4}
    # a class count the metadata does not have: contiguous heads (what the conformance check builds)
    assert class_head_layout(toy_cfg("dataset_ids", num_classes=7)) == (None, None)
    with pytest.raises(ValueError, match="CLASS_COLUMNS must be one of"):
        class_head_layout(toy_cfg("by_name"))


def test_paper_configs_have_the_authors_91_columns_on_coco():
    cfg = build_config("sparse_detr_r50_rho0.1.yaml", tiny=True, NUM_CLASSES=80)
    columns, ids = class_head_layout(cfg)
    assert len(columns) == 80 and max(columns) == 90 and columns[:3] == [1, 2, 3] and 12 not in columns
    assert columns == ids


def test_detections_are_the_top_pairs_over_the_used_columns(make_batch):
    model = build(toy_cfg("dataset_ids"))
    last = class_heads(model)[len(model.transformer.decoder.layers) - 1]
    with torch.no_grad():  # unused columns that would win every top-k if they took part
        last.bias[UNUSED] = 20.0
    inputs = batch(make_batch)
    with torch.no_grad():
        out = model.predict(inputs)
        results = model.postprocess(out, inputs)
    logits = out.pred_logits[-1]
    assert logits.shape[-1] == 10 and logits[..., UNUSED].min() > 10
    scores, index = logits[..., TOY_IDS].sigmoid().flatten(1).topk(100, dim=1)  # by hand
    for i, r in enumerate(results):
        instances = r["instances"]
        torch.testing.assert_close(instances.scores, scores[i], rtol=0, atol=0)
        assert instances.pred_classes.tolist() == (index[i] % 4).tolist()
        query = index[i] // 4
        h, w = out.image_sizes[i]
        cx, cy, bw, bh = out.pred_boxes[-1][i, query].unbind(-1)
        expected = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor(
            [w, h, w, h], dtype=torch.float64)
        limits = torch.tensor([w, h, w, h], dtype=torch.float64)
        torch.testing.assert_close(instances.pred_boxes.tensor.double(), expected.clamp(min=0).minimum(limits),
                                   rtol=0, atol=1e-4)


def test_two_stage_selection_ranks_tokens_over_every_column(make_batch):
    model = build(toy_cfg("dataset_ids"))
    two_stage = class_heads(model)[len(model.transformer.decoder.layers)]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # an unused column with a ranking of its own, far above the used ones
        two_stage.weight[UNUSED[2]] = 5 * torch.randn(two_stage.in_features, generator=generator, dtype=torch.float64)
        two_stage.bias[UNUSED[2]] = 5.0
    with torch.no_grad():
        out = model.predict(batch(make_batch))
    num_queries = out.query_tokens.shape[1]
    over_all = out.enc_logits.max(-1).values.topk(num_queries, dim=1).indices
    over_used = out.enc_logits[..., TOY_IDS].max(-1).values.topk(num_queries, dim=1).indices
    assert torch.equal(out.query_tokens, over_all)
    assert not torch.equal(out.query_tokens.sort(1).values, over_used.sort(1).values)


def test_losses_take_the_labels_as_category_id_columns(make_batch):
    model = build(toy_cfg("dataset_ids")).train()
    inputs = batch(make_batch, with_targets=True)
    with EventStorage():
        losses = model(inputs)
        out = model.predict(inputs)
    targets = model.prepare_targets(inputs, out.image_sizes, torch.float64)
    assert [t["labels"].tolist() for t in targets] == [[TOY_IDS[0], TOY_IDS[3]], [TOY_IDS[2]]]
    by_hand = model.criterion(out, targets)
    assert losses.keys() == by_hand.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], by_hand[key], rtol=1e-12, atol=0, msg=key)
    # the focal loss runs over every column: raising an unused column's logits raises the loss
    last = class_heads(model)[len(model.transformer.decoder.layers) - 1]
    with torch.no_grad(), EventStorage():
        last.bias[UNUSED[0]] += 3.0
        assert model(inputs)["loss_ce"] > losses["loss_ce"]


def test_category_id_checkpoint_into_contiguous_heads_and_back(tmp_path, caplog):
    by_ids, contiguous = build(toy_cfg("dataset_ids"), seed=1), build(toy_cfg("contiguous"), seed=2)
    torch.save({"model": by_ids.state_dict()}, tmp_path / "ids.pth")
    torch.save({"model": contiguous.state_dict()}, tmp_path / "contiguous.pth")
    SparseDETRCheckpointer(contiguous).load(str(tmp_path / "ids.pth"))
    for ours, theirs in zip(class_heads(contiguous), class_heads(by_ids)):
        assert torch.equal(ours.weight, theirs.weight[TOY_IDS]) and torch.equal(ours.bias, theirs.bias[TOY_IDS])
    mine, loaded = contiguous.state_dict(), by_ids.state_dict()
    assert all(torch.equal(mine[k], loaded[k]) for k in mine if not k.startswith("transformer.class_embed."))

    with pytest.raises(ValueError) as info:
        SparseDETRCheckpointer(build(toy_cfg("dataset_ids"), seed=3)).load(str(tmp_path / "contiguous.pth"))
    message = str(info.value)
    assert "4 rows, one per contiguous class" in message and "10 columns, one per category id" in message, message
    assert "CLASS_COLUMNS contiguous" in message, message


def test_other_class_counts_name_both_layouts(tmp_path):
    seven = build(toy_cfg("contiguous", dataset="__none__", num_classes=7))
    torch.save({"model": seven.state_dict()}, tmp_path / "seven.pth")
    with pytest.raises(ValueError) as info:
        SparseDETRCheckpointer(build(toy_cfg("dataset_ids"))).load(str(tmp_path / "seven.pth"))
    message = str(info.value)
    assert re.search(r"have 7 rows \(", message) and "10 columns, one per category id" in message, message
    assert "REINIT_CLASS_HEADS" in message


@pytest.fixture(scope="module")
def shapes_with_sparse_ids(tmp_path_factory):
    """The generated val split (8 images) registered from a json whose category ids are 2, 5, 6, 11, 13."""
    root = str(tmp_path_factory.mktemp("shapes"))
    source = generate_split(root, "val", 8)
    with open(source) as f:
        coco = json.load(f)
    new_ids = {1: 2, 2: 5, 3: 6, 4: 11, 5: 13}
    for category in coco["categories"]:
        category["id"] = new_ids[category["id"]]
    for annotation in coco["annotations"]:
        annotation["category_id"] = new_ids[annotation["category_id"]]
    path = os.path.join(root, "sparse_ids.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    name = "sparse_detr_shapes_val_sparse_ids"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, path, os.path.join(root, "val"))
    return name, sorted(new_ids.values())


def evaluate(model, cfg, dataset, output_dir):
    from detectron2.data import DatasetMapper, build_detection_test_loader

    loader = build_detection_test_loader(cfg, dataset, mapper=DatasetMapper(cfg, is_train=False), batch_size=2)
    evaluator = COCOEvaluator(dataset, output_dir=output_dir, use_fast_impl=False)
    return inference_on_dataset(model, loader, evaluator)["bbox"]


def test_evaluation_with_category_id_heads_equals_contiguous_heads(shapes_with_sparse_ids, tmp_path):
    dataset, ids = shapes_with_sparse_ids
    overrides = dict(NUM_CLASSES=5, NUM_DETECTIONS=100)
    contiguous = build(toy_cfg("contiguous", dataset, **overrides), seed=4, dtype=torch.float32)
    cfg = toy_cfg("dataset_ids", dataset, **overrides)
    cfg.INPUT.MIN_SIZE_TEST = 192  # the test size at which these random weights match a few shapes (AP50 > 0 below)
    by_ids = build(cfg, seed=5, dtype=torch.float32)
    assert by_ids.class_columns.tolist() == ids and class_heads(by_ids)[0].out_features == 14
    state = contiguous.state_dict()
    with torch.no_grad():  # the same weights, the contiguous rows at the id columns, unused columns never chosen
        for key, value in by_ids.state_dict().items():
            if key.startswith("transformer.class_embed."):
                value.fill_(0.0 if key.endswith("weight") else -50.0)
                value[ids] = state[key]
            else:
                value.copy_(state[key])
    ap_contiguous = evaluate(contiguous, cfg, dataset, str(tmp_path / "contiguous"))
    ap_ids = evaluate(by_ids, cfg, dataset, str(tmp_path / "ids"))
    assert ap_ids.keys() == ap_contiguous.keys()
    for key, value in ap_contiguous.items():  # APl is NaN in both: the images hold no large object
        assert ap_ids[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key
    assert ap_contiguous["AP50"] > 0  # a random model on big shapes matches a few: the comparison means something
    with open(tmp_path / "ids" / "coco_instances_results.json") as f:
        assert {d["category_id"] for d in json.load(f)} <= set(ids)
