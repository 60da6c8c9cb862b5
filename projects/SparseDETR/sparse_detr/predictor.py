"""Detectron2's ``DefaultPredictor`` for Sparse DETR, running the model as evaluation does (the fast inference path)."""
from typing import Dict

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .checkpoint import SparseDETRCheckpointer
from .dataset_mapper import side_rounding
from .inference import build_inference_model

__all__ = ["SparseDETRPredictor"]

INPUT_FORMATS = ("RGB", "BGR")


class SparseDETRPredictor:
    """A drop-in for Detectron2's ``DefaultPredictor``: the same constructor, call, attributes and input handling.

    ``predictor = SparseDETRPredictor(cfg)`` builds the model, loads ``MODEL.WEIGHTS`` and keeps the config's
    test resize; ``predictor(image)`` takes one (H, W, 3) uint8 image in BGR order (as ``cv2.imread`` reads it),
    converts it to ``INPUT.FORMAT``, resizes it by ``INPUT.{MIN,MAX}_SIZE_TEST`` (then to sides in multiples of
    ``INPUT.SIDE_MULTIPLE`` when set, as evaluation's mapper does) and returns the model's output
    for it, ``{"instances": Instances}`` in the image's own H x W (and the DAM recall's masses of a sparse model,
    as in evaluation). Attributes: ``cfg``, ``model``, ``aug``, ``input_format``, and ``metadata`` when the config
    names a test dataset.

    What differs from ``DefaultPredictor``:

    * ``model`` is the model evaluation and ``demo.py`` run, :func:`~sparse_detr.inference.build_inference_model`
      (``TEST.FAST_INFERENCE``, ``TEST.PRECISION``), not the plain model;
    * ``MODEL.WEIGHTS`` is loaded with :class:`~sparse_detr.checkpoint.SparseDETRCheckpointer`, so the authors'
      checkpoints load as they are, with their class-count check;
    * an image too thin to keep a pixel once resized is a ValueError naming its size.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()  # as DefaultPredictor: building the model may modify the config
        if self.cfg.INPUT.FORMAT not in INPUT_FORMATS:
            raise ValueError(f"INPUT.FORMAT must be one of {INPUT_FORMATS}, got {self.cfg.INPUT.FORMAT!r}")
        model = build_model(self.cfg).eval()
        SparseDETRCheckpointer(model).load(self.cfg.MODEL.WEIGHTS)
        self.model = build_inference_model(self.cfg, model)
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.rounding = side_rounding(self.cfg)
        self.input_format = self.cfg.INPUT.FORMAT

    def preprocess(self, original_image: np.ndarray, name: str = "the image") -> Dict:
        """The model's input dict of one BGR image: ``{"image": (3, h, w) float32 in INPUT.FORMAT, "height": H,
        "width": W}``; ``name`` appears in the error for an image too thin to resize."""
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        height, width = image.shape[:2]
        resize = self.aug.get_transform(image)
        if min(resize.new_h, resize.new_w) < 1:
            raise ValueError(f"{name}: the {height}x{width} image has a zero side once resized to the test size "
                             f"(INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST): {resize.new_h}x{resize.new_w}; it is too thin")
        resized = resize.apply_image(image)
        for augmentation in self.rounding:
            resized = augmentation.get_transform(resized).apply_image(resized)
        return {"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), "height": height,
                "width": width}

    def resized_rgb(self, model_input: Dict) -> np.ndarray:
        """The resized image of a :meth:`preprocess` input as the model sees it, (h, w, 3) uint8 in RGB order."""
        image = model_input["image"].permute(1, 2, 0).to(torch.uint8).numpy()
        return image if self.input_format == "RGB" else image[:, :, ::-1]

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray) -> Dict:
        return self.model([self.preprocess(original_image)])[0]
