"""The converter for every kind of input file, and SparseDETRCheckpointer's class-count check.

The authors' detector layout comes from the conformance fixture (its key list, shapes and aliases, with
weights drawn by tests/official_weights.py); the backbone files are built here from torchvision's
ResNet-50 and Detectron2's Swin-T under the names their official releases use.
"""
import errno
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

import official_weights
from conftest import CONFORMANCE_FIXTURE, REPO_ROOT, FullDisk, build_config, load_script
from sparse_detr.checkpoint import (SparseDETRCheckpointer, convert_checkpoint, convert_state_dict,
                                    save_checkpoint_atomically)

pytestmark = pytest.mark.usefixtures("single_thread")

CONVERTER = REPO_ROOT / "projects" / "SparseDETR" / "convert_official_weights.py"
UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids 1..90 that COCO never uses
COCO_IDS = [i for i in range(1, 91) if i not in UNUSED_COCO_IDS]  # in Detectron2's contiguous order


@pytest.fixture(scope="module")
def recipe():
    return torch.load(CONFORMANCE_FIXTURE, map_location="cpu", weights_only=False), official_weights


@pytest.fixture(scope="module")
def official(recipe):
    """The fixture's official-format state dict (float32, like the released files: half the bytes to write)."""
    fixture, module = recipe
    return {k: v.float() if v.is_floating_point() else v for k, v in module.official_state_dict(fixture).items()}


@pytest.fixture(scope="module")
def fixture_model(recipe):
    """The full-size model of the fixture's config (its weights get overwritten by every test that uses it)."""
    torch.manual_seed(0)
    return build_model(build_config("sparse_detr_r50_rho0.2.yaml", tiny=False, NUM_CLASSES=recipe[0]["num_classes"]))


@pytest.fixture(scope="module")
def converter_main():
    return load_script(CONVERTER, "convert_official_weights").main


def convert_file(tmp_path, checkpoint):
    """Save ``checkpoint``, convert the file, and check the written file holds what convert_checkpoint returned."""
    src, dst = tmp_path / "src.pth", tmp_path / "dst.pth"
    torch.save(checkpoint, src)
    converted = convert_checkpoint(str(src), str(dst))
    written = torch.load(dst, map_location="cpu", weights_only=False)
    assert set(written["model"]) == set(converted)
    assert all(torch.equal(written["model"][k], v) for k, v in converted.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    return converted


# ---- authors' detector checkpoints ----------------------------------------------------------------


def test_official_detector_checkpoint_loads_strictly(official, fixture_model, tmp_path, converter_main):
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    profiler_leftovers = {"total_ops": torch.zeros(1), "total_params": torch.zeros(1)}
    torch.save({"model": {**official, **profiler_leftovers}, "epoch": 49}, src)
    assert converter_main([str(src), str(dst)]) == 0
    converted = torch.load(dst, map_location="cpu", weights_only=False)["model"]

    fixture_model.load_state_dict(converted, strict=True)
    pairs = {  # Detectron2 name <- the authors' name
        "backbone.stem.conv1.weight": "backbone.0.body.conv1.weight",
        "backbone.stem.conv1.norm.running_var": "backbone.0.body.bn1.running_var",
        "backbone.res2.0.conv2.norm.weight": "backbone.0.body.layer1.0.bn2.weight",
        "backbone.res3.0.shortcut.weight": "backbone.0.body.layer2.0.downsample.0.weight",
        "backbone.res5.2.conv3.norm.running_mean": "backbone.0.body.layer4.2.bn3.running_mean",
        "transformer.class_embed.0.bias": "class_embed.0.bias",
        "transformer.class_embed.7.weight": "transformer.encoder.class_embed.0.weight",
        "transformer.bbox_embed.11.layers.2.bias": "transformer.encoder.bbox_embed.4.layers.2.bias",
        "transformer.enc_mask_predictor.layer2.4.weight": "transformer.enc_mask_predictor.layer2.4.weight",
        "input_proj.3.0.weight": "input_proj.3.0.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], official[theirs]), ours


def test_checkpointer_converts_the_authors_layout_on_the_fly(official, fixture_model, tmp_path):
    torch.save({"model": official}, tmp_path / "official.pth")
    SparseDETRCheckpointer(fixture_model).load(str(tmp_path / "official.pth"))
    expected = convert_state_dict({"model": official})
    state = fixture_model.state_dict()
    assert set(expected) == set(state)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def coco_91_rows(official):
    """The fixture's official weights with 91-row class heads, each row holding its COCO id."""
    coco = {}
    for key, value in official.items():
        if "class_embed" in key:
            ids = torch.arange(91, dtype=value.dtype)
            coco[key] = ids.view(-1, 1).expand(91, value.shape[1]).clone() if value.dim() == 2 else ids
    return {**official, **coco}


def test_91_class_columns_are_kept_for_the_paper_configs(official, tmp_path, converter_main):
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"model": coco_91_rows(official)}, src)
    assert converter_main([str(src), str(dst)]) == 0
    converted = torch.load(dst, map_location="cpu", weights_only=False)["model"]
    heads = [k for k in converted if k.startswith("transformer.class_embed.")]
    assert len(heads) == 2 * 12  # 6 decoder layers, the two-stage head, 5 encoder auxiliary heads
    for key in heads:
        rows = converted[key] if key.endswith("bias") else converted[key][:, 0]
        assert rows.tolist() == list(range(91)), key
    # the paper config on COCO has the authors' 91 columns: it takes the file strictly
    torch.manual_seed(0)
    model = build_model(build_config("sparse_detr_r50_rho0.2.yaml", tiny=False, NUM_CLASSES=80))
    model.load_state_dict(converted, strict=True)
    assert model.class_columns.tolist() == COCO_IDS


def test_91_classes_to_contiguous_heads_pick_the_coco_ids(official, fixture_model, tmp_path, converter_main):
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"model": coco_91_rows(official)}, src)
    assert converter_main([str(src), str(dst), "--contiguous-classes"]) == 0
    converted = torch.load(dst, map_location="cpu", weights_only=False)["model"]
    for key in [k for k in converted if k.startswith("transformer.class_embed.")]:
        rows = converted[key] if key.endswith("bias") else converted[key][:, 0]
        assert rows.tolist() == COCO_IDS, key
        assert rows[0] == 1 and rows[79] == 90  # person, toothbrush
    torch.manual_seed(0)
    contiguous = build_model(build_config("sparse_detr_r50_rho0.2.yaml", tiny=False, NUM_CLASSES=80,
                                          CLASS_COLUMNS="contiguous"))
    contiguous.load_state_dict(converted, strict=True)
    # the checkpointer does the same from the 91-row file, on the fly
    SparseDETRCheckpointer(contiguous).load(str(src))
    state = contiguous.state_dict()
    assert all(torch.equal(state[k], v) for k, v in converted.items())


def test_official_swin_detector_checkpoint_loads_strictly(official, tmp_path):
    """The authors' Swin-T detectors: the fixture's transformer and heads on ``backbone.0.body.<swin names>``."""
    torch.manual_seed(0)
    model = build_model(build_config("sparse_detr_swint_rho0.2.yaml", tiny=False,
                                     NUM_CLASSES=official["class_embed.0.bias"].shape[0]))
    swin = {f"backbone.0.body.{k}": v + 1 if v.is_floating_point() else v  # +1: differ from the model's values
            for k, v in model.backbone.state_dict().items()}
    detector = {k: v for k, v in official.items() if not k.startswith(("backbone.", "input_proj."))}
    projections = {k: v for k, v in model.state_dict().items() if k.startswith("input_proj.")}
    assert projections["input_proj.0.0.weight"].shape == (256, 192, 1, 1)  # stage 2 of Swin-T
    converted = convert_file(tmp_path, {"model": {**detector, **swin, **projections}})
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.backbone.layers[2].blocks[5].mlp.fc2.bias,
                               swin["backbone.0.body.layers.2.blocks.5.mlp.fc2.bias"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.norm3.weight, swin["backbone.0.body.norm3.weight"], rtol=0, atol=0)


# ---- backbone initialisations ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_resnet50():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    for module in resnet.modules():  # non-trivial statistics, so that a misplaced norm tensor shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.normal_(1, 0.1)
            module.bias.data.normal_(0, 0.1)
    return resnet.eval()


def check_resnet_backbone(model, converted, resnet):
    """Every backbone key covered, nothing unexpected, and res3..res5 compute torchvision's layer2..layer4."""
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert unexpected == []
    assert [k for k in missing if k.startswith("backbone.")] == []
    assert all(k.startswith("backbone.") for k in converted)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.backbone(x)
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        y = resnet.layer1(y)
        for name, layer in (("res3", resnet.layer2), ("res4", resnet.layer3), ("res5", resnet.layer4)):
            y = layer(y)
            torch.testing.assert_close(ours[name], y, rtol=1e-4, atol=1e-4)


def test_torchvision_resnet50_state_dict(torchvision_resnet50, tmp_path, tiny_model):
    converted = convert_file(tmp_path, torchvision_resnet50.state_dict())
    assert not any(k.endswith("num_batches_tracked") or ".fc." in k for k in converted)
    model = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32)
    check_resnet_backbone(model, converted, torchvision_resnet50)


def test_scrl_checkpoint(torchvision_resnet50, tmp_path, tiny_model):
    torchvision_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    online = {}
    for key, value in torchvision_resnet50.state_dict().items():
        head, rest = key.split(".", 1)
        if head in torchvision_names:
            online[f"encoder.{torchvision_names[head]}.{rest}"] = value
    online["projector.net.0.weight"] = torch.randn(4096, 2048)  # SCRL's heads: not part of the backbone
    online["projector.net.1.running_mean"] = torch.randn(4096)
    checkpoint = {"online_network_state_dict": online, "target_network_state_dict": dict(online), "epoch": 1000}
    converted = convert_file(tmp_path, checkpoint)
    assert converted.keys() == convert_state_dict(torchvision_resnet50.state_dict()).keys()
    model = tiny_model("sparse_detr_r50_scrl_rho0.2.yaml", dtype=torch.float32)
    check_resnet_backbone(model, converted, torchvision_resnet50)


def test_swin_t_imagenet_checkpoint(tmp_path, tiny_model):
    model = tiny_model("sparse_detr_swint_rho0.2.yaml", dtype=torch.float32)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    # the ImageNet release has no per-stage output norms (the detector's own), but a final norm, the
    # classifier, and the shifted-window attention masks as buffers
    output_norms = {k for k in backbone if re.match(r"norm\d\.", k)}
    assert len(output_norms) == 6
    release = {k: v + 1 for k, v in backbone.items() if k not in output_norms}  # +1: values differ from the model's
    release.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                    "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
                    "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)})
    converted = convert_file(tmp_path, {"model": release})
    assert set(converted) == {f"backbone.{k}" for k in backbone if k not in output_norms}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert unexpected == []
    assert {k for k in missing if k.startswith("backbone.")} == {f"backbone.{k}" for k in output_norms}
    state = model.backbone.state_dict()
    for key in release.keys() & state.keys():
        assert torch.equal(state[key], release[key].to(state[key].dtype)), key


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [{"model": {"foo.weight": torch.zeros(2)}}, [torch.zeros(2)],
                                     {"online_network_state_dict": {"projector.0.weight": torch.zeros(2)}}],
                         ids=["unknown-keys", "not-a-dict", "scrl-without-encoder"])
def test_unrecognised_file_exits_2_naming_the_accepted_inputs(content, tmp_path, converter_main, capsys):
    src, dst = tmp_path / "mystery.pth", tmp_path / "out.pth"
    torch.save(content, src)
    assert converter_main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:")
    if not isinstance(content, dict) or "model" in content:
        for accepted in ("Sparse DETR", "torchvision ResNet-50", "Swin-T", "SCRL"):
            assert accepted in err
    else:
        assert "encoder.0" in err
    assert not dst.exists()


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b""], ids=["text", "empty"])
def test_file_that_is_not_a_pytorch_checkpoint_exits_2(content, tmp_path, converter_main, capsys):
    src, dst = tmp_path / "notes.pth", tmp_path / "out.pth"
    src.write_bytes(content)
    assert converter_main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:")
    for accepted in ("Sparse DETR", "torchvision ResNet-50", "Swin-T", "SCRL"):
        assert accepted in err
    assert not dst.exists()


def test_missing_file_exits_2_with_a_clear_error(tmp_path, converter_main, capsys):
    missing = tmp_path / "nowhere.pth"
    assert converter_main([str(missing), str(tmp_path / "out.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoint at {missing}"


def test_command_line_exit_status(tmp_path):
    src = tmp_path / "mystery.pth"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, src)
    run = subprocess.run([sys.executable, str(CONVERTER), str(src), str(tmp_path / "out.pth")], cwd=REPO_ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: unrecognised checkpoint")


# ---- SparseDETRCheckpointer -----------------------------------------------------------------------


def class_head_keys(state):
    return [k for k in state if k.startswith("transformer.class_embed.")]


def test_class_count_mismatch_names_both_counts(tmp_path, tiny_model):
    seven = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=1, NUM_CLASSES=7)
    torch.save({"model": seven.state_dict()}, tmp_path / "seven.pth")
    five = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=2)
    with pytest.raises(ValueError) as info:
        SparseDETRCheckpointer(five).load(str(tmp_path / "seven.pth"))
    message = str(info.value)
    assert re.search(r"\b7\b", message) and re.search(r"\b5\b", message), message


def test_reinit_class_heads_keeps_the_models_own_heads(tmp_path, tiny_model):
    seven = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=1, NUM_CLASSES=7)
    torch.save({"model": seven.state_dict()}, tmp_path / "seven.pth")
    five = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=2)
    before = {k: v.clone() for k, v in five.state_dict().items()}
    SparseDETRCheckpointer(five, reinit_class_heads=True).load(str(tmp_path / "seven.pth"))
    after, loaded = five.state_dict(), seven.state_dict()
    heads = class_head_keys(after)
    assert len(heads) == 2 * 4  # 2 decoder layers, the two-stage head, 1 encoder auxiliary head
    for key in heads:
        assert torch.equal(after[key], before[key]), key
    changed = [k for k in after if k not in heads and not torch.equal(after[k], before[k])]
    assert changed  # the rest did load
    for key in after.keys() - set(heads):
        assert torch.equal(after[key], loaded[key]), key


def test_checkpointer_save_round_trip(tmp_path, tiny_model):
    model = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=1)
    checkpointer = SparseDETRCheckpointer(model, str(tmp_path))
    checkpointer.save("model_final", iteration=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]
    other = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32, seed=2)
    extra = SparseDETRCheckpointer(other, str(tmp_path)).resume_or_load(str(tmp_path / "model_final.pth"))
    assert extra["iteration"] == 7
    mine, theirs = model.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---- files already in this project's layout, and writing checkpoints ------------------------------


def test_a_checkpoint_of_this_project_is_refused_not_mangled(tmp_path, tiny_model, converter_main, capsys):
    """Converting would drop the backbone (the authors' is under backbone.0.body): say that it needs none."""
    model = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32)
    src, dst = tmp_path / "model_final.pth", tmp_path / "out.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, src)
    assert converter_main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already in this project's layout" in err and "MODEL.WEIGHTS" in err
    assert not dst.exists()


def test_backbone_tensors_outside_the_authors_layout_are_not_dropped(official):
    extra = {**official, "backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ValueError, match=r"1 backbone tensors are outside .*'backbone.stem.conv1.weight'"):
        convert_state_dict({"model": extra})


def test_save_removes_stale_temporaries_and_writes_files_with_the_usual_mode(tmp_path, tiny_model):
    model = tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32)
    killed = tmp_path / ".tmp-5f3a9c-model_0000999.pth"  # what a kill during a save leaves
    killed.write_bytes(b"half a checkpoint")
    umask = os.umask(0o022)
    try:
        SparseDETRCheckpointer(model, str(tmp_path)).save("model_final")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    for name in ("model_final.pth", "last_checkpoint"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_last_checkpoint_is_replaced_atomically(tmp_path, tiny_model, monkeypatch):
    checkpointer = SparseDETRCheckpointer(tiny_model("sparse_detr_r50_rho0.2.yaml", dtype=torch.float32), str(tmp_path))
    checkpointer.tag_last_checkpoint("model_0000004.pth")

    def killed(*args):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.tag_last_checkpoint("model_0000009.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint"]


def test_a_full_disk_is_an_oserror_naming_the_checkpoint_and_leaves_nothing_behind(tmp_path, monkeypatch):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FullDisk(f, 1000)))
    path = tmp_path / "model_0000009.pth"
    with pytest.raises(OSError) as info:  # torch.save itself raises RuntimeError "unexpected pos"
        save_checkpoint_atomically({"model": {"w": torch.zeros(5000)}}, str(path))
    assert (info.value.errno, info.value.strerror, info.value.filename) == (
        errno.ENOSPC, "No space left on device", str(path))
    assert list(tmp_path.iterdir()) == []
