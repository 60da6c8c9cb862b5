"""add_sparse_detr_config: every key it adds can be set from a YAML file; unknown keys are refused."""
import pytest
import yaml
from detectron2.config import CfgNode, get_cfg

from sparse_detr.config import add_sparse_detr_config

# SPEC §1: the five switches of the model family and the architecture's defaults (paper values).
SPEC_DEFAULTS = {
    "TWO_STAGE": False, "WITH_BOX_REFINE": False, "EFF_QUERY_INIT": False, "EFF_SPECIFIC_HEAD": False,
    "RHO": 0.0, "USE_ENC_AUX_LOSS": False,
    "HIDDEN_DIM": 256, "NHEADS": 8, "ENC_LAYERS": 6, "DEC_LAYERS": 6, "DIM_FEEDFORWARD": 1024, "DROPOUT": 0.1,
    "NUM_FEATURE_LEVELS": 4, "ENC_N_POINTS": 4, "DEC_N_POINTS": 4, "NUM_QUERIES": 300,
}
SOLVER_KEYS = ["BACKBONE_MULTIPLIER", "LINEAR_PROJ_MULTIPLIER", "OPTIMIZER", "SQRT_LR_SCALING"]


def sparse_detr_cfg():
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    return cfg


def leaves(node, prefix=()):
    """{(KEY, SUBKEY, ...): value} of every leaf of a config."""
    found = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            found.update(leaves(value, prefix + (key,)))
        else:
            found[prefix + (key,)] = value
    return found


def added_keys():
    """Every leaf that add_sparse_detr_config adds to Detectron2's defaults, with its default."""
    base = leaves(get_cfg())
    return {path: value for path, value in leaves(sparse_detr_cfg()).items() if path not in base}


def changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_CHANGED"
    if isinstance(value, (list, tuple)):
        return [changed(item) for item in value] + ([] if value else [1])
    raise TypeError(f"no changed value for {value!r}")


def test_spec_defaults():
    cfg = sparse_detr_cfg()
    for key, value in SPEC_DEFAULTS.items():
        assert cfg.MODEL.SPARSE_DETR[key] == value, key


def test_function_adds_model_and_solver_keys():
    paths = added_keys()
    assert {("MODEL", "SPARSE_DETR", key) for key in SPEC_DEFAULTS} <= set(paths)
    assert {("SOLVER", key) for key in SOLVER_KEYS} <= set(paths)


def test_merge_yaml_sets_every_added_key(tmp_path):
    defaults = added_keys()
    expected = {path: changed(value) for path, value in defaults.items()}
    document = {}
    for path, value in expected.items():
        node = document
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    config_file = tmp_path / "sparse_detr.yaml"
    config_file.write_text(yaml.safe_dump(document))

    cfg = sparse_detr_cfg()
    cfg.merge_from_file(str(config_file))
    merged = leaves(cfg)
    for path, value in expected.items():
        got = merged[path]
        if isinstance(got, (list, tuple)):
            assert list(got) == value, ".".join(path)
        else:
            assert got == value and type(got) is type(defaults[path]), ".".join(path)


def test_merge_list_sets_keys():
    cfg = sparse_detr_cfg()
    cfg.merge_from_list(["MODEL.SPARSE_DETR.RHO", "0.3", "MODEL.SPARSE_DETR.TWO_STAGE", "True",
                         "SOLVER.OPTIMIZER", "SGD"])
    assert cfg.MODEL.SPARSE_DETR.RHO == 0.3 and cfg.MODEL.SPARSE_DETR.TWO_STAGE is True
    assert cfg.SOLVER.OPTIMIZER == "SGD"


def test_unknown_key_raises(tmp_path):
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("MODEL:\n  SPARSE_DETR:\n    KEEP_RATIO: 0.1\n")
    cfg = sparse_detr_cfg()
    with pytest.raises(KeyError, match="MODEL.SPARSE_DETR.KEEP_RATIO"):
        cfg.merge_from_file(str(config_file))


def test_get_cfg_alone_has_no_sparse_detr_keys():
    cfg = get_cfg()
    assert "SPARSE_DETR" not in cfg.MODEL and "BACKBONE_MULTIPLIER" not in cfg.SOLVER
