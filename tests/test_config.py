"""add_sparse_detr_config: every key it adds can be set from a YAML file; unknown keys are refused."""
import pytest
from detectron2.config import get_cfg

from sparse_detr.config import add_sparse_detr_config

# A value different from the default for every key the function adds.
SPARSE_DETR_KEYS = {
    "NUM_CLASSES": 91,
    "NUM_QUERIES": 100,
    "HIDDEN_DIM": 128,
    "NHEADS": 4,
    "ENC_LAYERS": 3,
    "DEC_LAYERS": 2,
    "DIM_FEEDFORWARD": 2048,
    "DROPOUT": 0.0,
    "NUM_FEATURE_LEVELS": 3,
    "ENC_N_POINTS": 2,
    "DEC_N_POINTS": 8,
    "TWO_STAGE": True,
    "WITH_BOX_REFINE": True,
    "EFF_QUERY_INIT": True,
    "EFF_SPECIFIC_HEAD": True,
    "RHO": 0.1,
    "USE_ENC_AUX_LOSS": True,
    "CLS_LOSS_COEF": 1.5,
    "BBOX_LOSS_COEF": 4.0,
    "GIOU_LOSS_COEF": 3.0,
    "MASK_PREDICTION_COEF": 0.5,
    "SET_COST_CLASS": 1.0,
    "SET_COST_BBOX": 4.0,
    "SET_COST_GIOU": 1.0,
    "FOCAL_ALPHA": 0.5,
    "FOCAL_GAMMA": 1.0,
    "NUM_DETECTIONS": 50,
}
SOLVER_KEYS = {
    "BACKBONE_MULTIPLIER": 0.2,
    "LINEAR_PROJ_MULTIPLIER": 0.5,
    "OPTIMIZER": "SGD",
    "SQRT_LR_SCALING": False,
}


def sparse_detr_cfg():
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    return cfg


def yaml_scalar(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_keys_are_known_and_defaults_differ():
    cfg = sparse_detr_cfg()
    assert set(cfg.MODEL.SPARSE_DETR.keys()) == set(SPARSE_DETR_KEYS)
    for key, value in SPARSE_DETR_KEYS.items():
        assert cfg.MODEL.SPARSE_DETR[key] != value, key
    for key, value in SOLVER_KEYS.items():
        assert cfg.SOLVER[key] != value, key


def test_paper_defaults():
    sd = sparse_detr_cfg().MODEL.SPARSE_DETR
    assert (sd.HIDDEN_DIM, sd.NHEADS, sd.ENC_LAYERS, sd.DEC_LAYERS, sd.DIM_FEEDFORWARD) == (256, 8, 6, 6, 1024)
    assert (sd.NUM_FEATURE_LEVELS, sd.ENC_N_POINTS, sd.DEC_N_POINTS, sd.NUM_QUERIES) == (4, 4, 4, 300)
    assert sd.DROPOUT == 0.1 and sd.RHO == 0.0


def test_merge_yaml_sets_every_key(tmp_path):
    model = "\n".join(f"    {key}: {yaml_scalar(value)}" for key, value in SPARSE_DETR_KEYS.items())
    solver = "\n".join(f"  {key}: {yaml_scalar(value)}" for key, value in SOLVER_KEYS.items())
    path = tmp_path / "sparse_detr.yaml"
    path.write_text(f"MODEL:\n  SPARSE_DETR:\n{model}\nSOLVER:\n{solver}\n")
    cfg = sparse_detr_cfg()
    cfg.merge_from_file(str(path))
    for key, value in SPARSE_DETR_KEYS.items():
        assert cfg.MODEL.SPARSE_DETR[key] == value, key
        assert type(cfg.MODEL.SPARSE_DETR[key]) is type(value), key
    for key, value in SOLVER_KEYS.items():
        assert cfg.SOLVER[key] == value, key


def test_merge_list_sets_keys():
    cfg = sparse_detr_cfg()
    cfg.merge_from_list(["MODEL.SPARSE_DETR.RHO", "0.3", "SOLVER.OPTIMIZER", "SGD"])
    assert cfg.MODEL.SPARSE_DETR.RHO == 0.3 and cfg.SOLVER.OPTIMIZER == "SGD"


def test_unknown_key_raises(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("MODEL:\n  SPARSE_DETR:\n    KEEP_RATIO: 0.1\n")
    cfg = sparse_detr_cfg()
    with pytest.raises(KeyError, match="MODEL.SPARSE_DETR.KEEP_RATIO"):
        cfg.merge_from_file(str(path))


def test_get_cfg_alone_has_no_sparse_detr_keys():
    cfg = get_cfg()
    assert "SPARSE_DETR" not in cfg.MODEL and "BACKBONE_MULTIPLIER" not in cfg.SOLVER
