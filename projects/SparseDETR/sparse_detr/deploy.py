"""The detector as one tensor-in, tensors-out module of a fixed input size, for ONNX and ``torch.export``.

:class:`ExportableDetector` wraps a built :class:`~sparse_detr.SparseDETR`:

* input ``images``: (B, 3, H, W) float32, RGB on the 0-255 scale; the graph normalises them. Every image
  fills the whole H x W: there is no padding mask, every token is valid;
* outputs ``scores`` (B, D) float32, ``labels`` (B, D) int64 contiguous class ids (Detectron2's
  ``pred_classes``), ``boxes`` (B, D, 4) float32 xyxy in input pixels, not clipped: the top
  D = min(NUM_DETECTIONS, queries x classes) (100 for every paper config) that the Detectron2 model
  returns for the same input, before its rescale to the original image size.

For a fixed H x W, every level shape, token count and the sparse encoder's k (``floor(rho * S) + 1`` of the
S tokens) are Python ints, so ``torch.export.export`` meets no data-dependent shape, and the deformable
attention samples with standard operators (see ``layers/ms_deform_attn_export.py``).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from detectron2.structures import ImageList

from .layers.ms_deform_attn_export import SAMPLERS, standard_op_attention
from .meta_arch import SparseDETR

__all__ = ["ExportableDetector", "INPUT_NAME", "OUTPUT_NAMES", "check_input_size", "export_onnx", "export_program",
           "level_shapes"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "labels", "boxes")
# LayerNormalization is an ONNX operator from opset 17 on (GridSample from 16)
MIN_OPSET = 17
DEFAULT_OPSET = 18


class ExportableDetector(nn.Module):
    """``images`` (B, 3, H, W) -> ``(scores, labels, boxes)`` of a :class:`SparseDETR`, see the module docstring.

    Args:
        model: the detector, in eval mode (its weights are shared, not copied).
        sampler: the deformable attention's standard-operator sampling, a key of ``SAMPLERS``
            ("grid_sample" or "gather").
    """

    def __init__(self, model: SparseDETR, sampler: str = "grid_sample"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown deformable-attention sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        self.model = model
        self.sampler = sampler

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        model = self.model
        n, _, height, width = images.shape
        normalised = (images - model.pixel_mean) / model.pixel_std
        flat = model.flatten_features(ImageList(normalised, [(height, width)] * n))
        with standard_op_attention(flat.level_shapes, self.sampler):
            out = model.transformer(flat)
        scores, labels, boxes = model.top_detections(model.class_logits(out.pred_logits[-1]), out.pred_boxes[-1])
        return scores, labels, boxes * boxes.new_tensor([width, height, width, height])


def level_shapes(model: SparseDETR, height: int, width: int, batch: int = 1) -> List[Tuple[int, int]]:
    """(H_l, W_l) of each feature level for an unpadded H x W input, from shapes alone (fake tensors, no compute)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.empty(batch, 3, height, width, device=model.device)
        return model.flatten_features(ImageList(images, [(height, width)] * batch)).level_shapes


def check_input_size(model: SparseDETR, height: int, width: int) -> List[Tuple[int, int]]:
    """The level shapes of an H x W input; a ValueError naming the limit when the model cannot take it."""
    if height < 1 or width < 1:
        raise ValueError(f"the input size must be positive, got {height}x{width}")
    shapes = level_shapes(model, height, width)
    tokens = sum(h * w for h, w in shapes)
    transformer = model.transformer
    if transformer.two_stage and tokens < transformer.num_queries:
        raise ValueError(f"a {height}x{width} input has {tokens} tokens (levels {shapes}), fewer than the "
                         f"{transformer.num_queries} proposals the two-stage head selects (NUM_QUERIES): "
                         "export a larger size")
    return shapes


def export_program(detector: ExportableDetector, images: Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the detector (eval mode) for the fixed shape of ``images``, static shapes.

    The program holds standard ATen operators only (no ``sparse_detr`` op): ``torch.export.load`` needs no
    import of this package.
    """
    detector.eval()
    with torch.no_grad():
        return torch.export.export(detector, (images,), strict=False)


def export_onnx(detector: ExportableDetector, images: Tensor, path: str, opset: int = DEFAULT_OPSET,
                metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the detector as an ONNX model of the fixed shape of ``images`` to ``path`` (one file below 2 GB).

    ``metadata``: string pairs stored in the model's ``metadata_props`` (``demo.py --onnx`` reads them).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: the graph needs opset {MIN_OPSET} or later (LayerNormalization)")
    program = export_program(detector, images)
    onnx_program = torch.onnx.export(program, (images,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                     output_names=list(OUTPUT_NAMES), verbose=False)
    onnx_program.model.metadata_props.update(metadata or {})
    onnx_program.save(path)
