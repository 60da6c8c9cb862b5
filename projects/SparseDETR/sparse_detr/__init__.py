"""Sparse DETR (ICLR'22) as a Detectron2 plugin. Importing this package registers the meta-architecture."""
from . import known_warnings  # noqa: F401  (first: silences known-harmless warnings of the imports below)
from . import data  # registers the generated demo datasets
from .backbone import build_swin_backbone
from .config import add_sparse_detr_config
from .config_files import get_config_file
from .criterion import HungarianMatcher, SetCriterion
from .meta_arch import SparseDETR
from .predictor import SparseDETRPredictor
from .transformer import SparseDeformableTransformer, TransformerOutput

__all__ = ["add_sparse_detr_config", "build_swin_backbone", "get_config_file", "HungarianMatcher", "SetCriterion",
           "SparseDETR", "SparseDETRPredictor", "SparseDeformableTransformer", "TransformerOutput"]
