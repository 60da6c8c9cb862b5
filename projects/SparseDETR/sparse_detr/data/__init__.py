"""Datasets of the project. Importing this package registers ``sparse_detr_shapes_{train,val}``."""
from .synthetic import CLASS_NAMES, generate_split, load_shapes_split, register_shapes_datasets

register_shapes_datasets()

__all__ = ["CLASS_NAMES", "generate_split", "load_shapes_split", "register_shapes_datasets"]
