"""The fast inference path of evaluation, ``demo.py`` and ``benchmark.py`` (``TEST.FAST_INFERENCE``).

:func:`build_inference_model` turns a trained :class:`SparseDETR` into an inference-only copy that gives the
same detections faster; the model itself (its modules, state dict and checkpoints) is left as it is:

* batch norms (frozen, or in eval mode) are folded into the convolutions before them;
* the convolutional backbone runs channels-last; on the CPU a folded ResNet's convolutions apply their ReLU
  and residual addition as oneDNN post-ops (:mod:`sparse_detr.fusion`) instead of separate passes, and in
  float32 its blocks' 3x3 convolutions of 64 channels or more run by Winograd's F(4x4, 3x3)
  (``SPARSE_DETR_WINOGRAD_TILE=2``: F(2x2, 3x3) from 128 channels, :func:`~sparse_detr.fusion.winograd_tile`);
* the input projections' convolutions and the transformer's linear layers (in float32 on Intel's CPUs only over
  8,192 rows or more, a large image's tokens; on other x86 CPUs, where MKL is slow, at any size:
  :func:`~sparse_detr.fusion.float32_matmul_library`) keep their weights in oneDNN's layout and add their bias in
  the same call (:func:`~sparse_detr.fusion.pack_convolutions`, :func:`~sparse_detr.fusion.pack_linears`);
* the transformer skips what neither the detections nor the DAM use (``detections_only``): the encoder
  auxiliary heads, the two-stage box head on tokens that do not become queries, the predictions of the
  decoder layers before the last; the sparse encoder takes its queries in token order (cache-friendly
  sampling);
* every deformable attention with point references computes its sampling locations in the sampling-offset
  layer's matrix multiplication, and with box references by one ``addcmul`` (``MSDeformAttn.fold_point_locations``);
* in float32 on the CPU (and in bfloat16 on CPUs without AMX), the decoder's cross-attentions sample the memory's
  unprojected tokens and project the samples (``UnprojectedValues``), where that costs fewer multiply-adds than
  projecting every token (at 800x1199: 300 queries against 20k tokens);
* in bfloat16 (``TEST.PRECISION``), convolutions and linear layers run in bf16 under ``torch.autocast``
  with their weights stored in bf16 once, while the precision-sensitive layers stay in float32: the
  sampling-offset and attention-weight layers of every deformable attention (sampling locations and their
  softmax), the reference-point layer, every box head, every class head and the scoring network's last
  layer (the scores that top-k ranks). ``"auto"`` picks bf16 on CPUs with native bf16 instructions
  (AMX or AVX512-BF16), float32 elsewhere. Under autocast the memory the value projections read is cast to bf16
  once for all of them (``SparseDeformableTransformer._shared_values``);
* on the CPU each image is normalised straight into the layout the backbone reads, channels-last in its dtype (the
  int8 ResNet's uint8 codes included), in one pass (``SparseDETR.backbone_input``, :func:`_backbone_input`); and the
  two-stage projection projects every token and writes a zero token's row over the invalid ones', rather than
  zeroing them first (``SparseDeformableTransformer.project_invalid_tokens_after``); the same values either way;
* the ResNet stem's max pool runs by ``torch.ops.sparse_detr_C.max_pool3x3s2``
  (:func:`~sparse_detr.fusion.stem_max_pool`), which does not write PyTorch's index of every maximum;
* in int8 (``TEST.PRECISION int8``, opt-in, never "auto"), the ResNet backbone's convolutions and most of the
  transformer's linear layers run on 8-bit integers (:mod:`sparse_detr.quantization`), their activation ranges
  calibrated on images of ``DATASETS.TRAIN`` (:func:`calibration_inputs`), and the rest as "auto" runs it; not the
  float32 detections (the README gives the AP it cost).
"""
import copy
import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers import Conv2d as D2Conv2d

from .fusion import WinogradConv, cpu_vendor, fuse_resnet, pack_convolutions, pack_linears
from .layers import MSDeformAttn
from .layers.ms_deform_attn import compiled_cpu_ops_available
from .meta_arch import SparseDETR
from .quantization import (Int8Conv, Int8ResNet, quantize_linears, quantize_projections, quantize_resnet,
                           quantized_convolutions)
from .transformer import TransformerOutput

__all__ = ["FastInferenceModel", "build_inference_model", "calibration_inputs", "cpu_description",
           "fold_batch_norms", "has_amx", "has_native_bf16", "inference_precision"]

logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel's Sapphire Rapids and later): bf16 products at 8x AVX512-BF16's rate."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AMX tiles or AVX512-BF16), where bf16 pays off."""
    return has_amx() or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def cpu_description() -> Dict:
    """Model name, vendor, family, clock and the vector/matrix units of this machine's CPU (Linux /proc/cpuinfo)."""
    info = {"model": "unknown CPU", "vendor": cpu_vendor(), "family": None, "mhz": None, "flags": set()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    info["model"] = value
                elif key == "cpu family" and value.isdigit():
                    info["family"] = int(value)
                elif key == "cpu MHz" and info["mhz"] is None:
                    info["mhz"] = float(value)
                elif key == "flags":
                    info["flags"] = set(value.split())
                if key == "" and info["flags"]:
                    break
    except OSError:
        pass
    flags = info.pop("flags")
    info.update(native_bf16=has_native_bf16(), amx_bf16="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags,
                amx_int8="amx_int8" in flags, avx512_vnni="avx512_vnni" in flags, avx512f="avx512f" in flags,
                avx2_fma="avx2" in flags and "fma" in flags)
    return info


def inference_precision(precision: str, device: torch.device) -> torch.dtype:
    """``TEST.PRECISION`` on ``device``: "auto" is bfloat16 on a CPU with native bf16, float32 elsewhere; "int8"
    (:class:`FastInferenceModel`'s int8 path, never chosen by "auto") is ``torch.int8``, on the CPU only."""
    if precision not in PRECISIONS:
        raise ValueError(f"TEST.PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"TEST.PRECISION int8 runs on the CPU (oneDNN's int8 convolutions), not on {device.type}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and has_native_bf16() else torch.float32
    return getattr(torch, precision)


def _folded_norm(norm: nn.Module):
    """(scale, shift) of a batch norm in inference: y = x * scale + shift; None for other norms."""
    if isinstance(norm, FrozenBatchNorm2d) or (isinstance(norm, nn.modules.batchnorm._BatchNorm)
                                               and not norm.training and norm.track_running_stats):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    return None


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm of Detectron2's ``Conv2d(..., norm=...)`` into the convolution, in place.

    Returns how many were folded. Only for inference copies: the folded module has other parameters.
    """
    folded = 0
    for conv in module.modules():
        if not isinstance(conv, D2Conv2d) or conv.norm is None:
            continue
        affine = _folded_norm(conv.norm)
        if affine is None:
            continue
        scale, shift = affine
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias, requires_grad=False)
        conv.norm = None
        folded += 1
    return folded


class ChannelsLast(nn.Module):
    """Runs a module on channels-last input (its 4-d parameters converted once)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.module(x.contiguous(memory_format=torch.channels_last))


class CenteredGroupNorm(nn.GroupNorm):
    """A GroupNorm that first subtracts each group's mean, which leaves its output unchanged (a GroupNorm is invariant
    to a constant added to a group) but not its rounding: for the input projections after a channels-last backbone.
    PyTorch's channels-last GroupNorm on the CPU sums x and x^2 in one float32 pass, which loses digits to
    cancellation when a group's mean is large against its spread (measured, 256 channels in 32 groups, mean 10:
    5e-4 from float64; 3e-6 centred, 2e-6 on an NCHW copy). That moved the tiny Efficient DETR's float32 scores
    by 7e-6 from the model's (3e-7 centred). Centring (a mean over the positions, a subtraction) cost 3 ms at
    800x1199's largest level; the NCHW copy cost 19 ms."""

    @classmethod
    def of(cls, norm: nn.GroupNorm) -> "CenteredGroupNorm":
        parameters = dict(device=norm.weight.device, dtype=norm.weight.dtype) if norm.affine else {}
        copy_ = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, **parameters)
        copy_.load_state_dict(norm.state_dict())
        return copy_

    def forward(self, x):
        # in float32 at least (a bf16 input is what an autocast's GroupNorm would convert anyway): a difference of
        # bf16 values close to their mean, rounded to bf16, would keep only a few of their digits
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        n, c = x.shape[:2]
        groups = self.num_groups
        mean = x.mean((2, 3)).view(n, groups, c // groups).mean(2, keepdim=True)
        return super().forward(x - mean.expand(n, groups, c // groups).reshape(n, c, 1, 1))


class Float32(nn.Module):
    """Runs a module in float32 inside a reduced-precision autocast region."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def _precision_sensitive(model: SparseDETR) -> List[tuple]:
    """(parent, attribute name) of the layers that stay in float32 under bf16."""
    transformer = model.transformer
    places = []
    for module in transformer.modules():
        if isinstance(module, MSDeformAttn):
            places += [(module, "sampling_offsets"), (module, "attention_weights")]
    for heads in (transformer.class_embed, transformer.bbox_embed):
        places += [(heads, str(i)) for i in range(len(heads))]
    if hasattr(transformer, "reference_points"):
        places.append((transformer, "reference_points"))
    if hasattr(transformer, "enc_mask_predictor"):
        scorer = transformer.enc_mask_predictor.layer2
        places.append((scorer, str(len(scorer) - 1)))
    return places


def _backbone_input(model: SparseDETR, dtype: torch.dtype):
    """``SparseDETR.backbone_input`` for the fast path's backbone: on the CPU, channels-last images in ``dtype``, or
    in the int8 ResNet's uint8 codes; None (the images as the model trains takes them) elsewhere, on a GPU, for an
    int8 GroupNorm ResNet (which quantizes its convolutions' inputs itself) or without the compiled op."""
    if model.device.type != "cpu" or not compiled_cpu_ops_available("normalize_image"):
        return None
    if isinstance(model.backbone, Int8ResNet):
        return torch.uint8, model.backbone.image_qparams
    if any(isinstance(m, Int8Conv) for m in model.backbone.modules()):
        return None
    return dtype, None


@torch.no_grad()
def _to_bfloat16(model: SparseDETR) -> None:
    """Keep the precision-sensitive layers in float32, store every other conv/linear weight in bf16."""
    for parent, name in _precision_sensitive(model):
        setattr(parent, name, Float32(getattr(parent, name)))
    keep = {id(p) for m in model.modules() if isinstance(m, Float32) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)):
            for param in module.parameters(recurse=False):
                if id(param) not in keep:
                    param.data = param.data.to(torch.bfloat16)


class FastInferenceModel(nn.Module):
    """An inference-only copy of a :class:`SparseDETR` with the fast path of this module's docstring.

    ``forward``, ``predict`` and ``postprocess`` behave as the model's in evaluation (Detectron2 results,
    the DAM recall's masses when the model reports them); ``predict`` returns the detections-only
    :class:`TransformerOutput`.
    """

    def __init__(self, model: SparseDETR, dtype: torch.dtype = torch.float32, fuse: bool = True,
                 calibration: Optional[List[Dict]] = None):
        """``dtype``: float32, bfloat16, or int8 (:mod:`sparse_detr.quantization`: the ResNet backbone and most of
        the transformer's linear layers in int8, their activation ranges calibrated on ``calibration``, model inputs
        as ``forward`` takes them; the rest in bfloat16 on a CPU with native bf16, float32 elsewhere)."""
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"the fast inference path runs in float32, bfloat16 or int8, got {dtype}")
        model = getattr(model, "module", model)  # DistributedDataParallel
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.int8 = dtype == torch.int8
        if self.int8:
            if not calibration:
                raise ValueError("the int8 path calibrates its activation ranges on images: give calibration inputs "
                                 "(TEST.INT8_CALIBRATION_IMAGES of DATASETS.TRAIN in evaluation)")
            dtype = inference_precision("auto", self.model.device)  # the rest's
        self.dtype = dtype
        convolutional = any(isinstance(m, nn.Conv2d) for m in self.model.backbone.modules())
        folded = fold_batch_norms(self.model.backbone)
        if self.int8:
            with torch.no_grad():
                images = [self.model.preprocess_image([item]).tensor for item in calibration]
            self.model.backbone = quantize_resnet(self.model.backbone, images)
            fused = 0
            if isinstance(self.model.backbone, Int8ResNet):
                quantize_projections(self.model.backbone, self.model.in_features, self.model.input_proj)
        else:
            fused = fuse_resnet(self.model.backbone, winograd=dtype == torch.float32) if fuse else 0
        if fuse:
            fused += pack_convolutions(self.model.input_proj)
        for module in self.model.modules():
            if isinstance(module, MSDeformAttn):
                module.fold_point_locations = True
        self.model.position_embedding_by_rows_and_columns = True
        self.model.transformer.project_invalid_tokens_after = self.model.device.type == "cpu"
        # on the CPU in float32: the decoder took 120-150 ms instead of 180-210 at 800x1199; in bf16 with AMX the
        # projection costs less than sampling 8x the channels (1.5 against 7 ms a decoder layer, the Xeon), without
        # it (AVX512-BF16) sampling first is faster (the AMD EPYC: the model 647 against 671 ms, 9 interleaved
        # turns); a GPU's rule is unmeasured
        self.model.transformer.project_values_after_sampling = self.model.device.type == "cpu" and (
            dtype == torch.float32 or not has_amx())
        if convolutional:
            if not self.int8:  # (the int8 backbone takes its input in its own layout)
                self.model.backbone = ChannelsLast(self.model.backbone)
            for sequence in self.model.input_proj:
                for index, module in enumerate(sequence):
                    if type(module) is nn.GroupNorm:
                        sequence[index] = CenteredGroupNorm.of(module)
        if dtype == torch.bfloat16:
            _to_bfloat16(self.model)
        linears = []
        if self.int8:  # the transformer's linear layers, calibrated on the model's own activations
            linears = quantize_linears(self.model.transformer)
            for item in calibration:
                self.predict([item])
            for linear in linears:
                linear.freeze()
        if fuse:  # in float32 with MKL only the layers over many tokens take oneDNN (fusion.PACKED_FLOAT32_MIN_ROWS)
            fused += pack_linears(self.model.transformer)
        super().train(False)
        self.model.backbone_input = _backbone_input(self.model, dtype) if convolutional else None
        if self.int8:
            logger.info("fast inference: the backbone in int8 (%d convolutions, calibrated on %d images; %d input "
                        "projections reading its uint8 maps) and %d linear layers of the transformer, the rest in "
                        "%s; %d batch norms folded, %d convolutions and linear layers packed",
                        quantized_convolutions(self.model.backbone), len(calibration),
                        quantized_convolutions(self.model.input_proj), len(linears), dtype, folded, fused)
            return
        winograd = [m for m in self.model.modules() if isinstance(m, WinogradConv)]
        how = f" F({winograd[0].tile}x{winograd[0].tile}, 3x3) with {winograd[0].products} products" if winograd else ""
        logger.info("fast inference: %d batch norms folded, %d convolutions fused (the backbone's with their ReLU and "
                    "residual; %d of them by Winograd%s, the others by oneDNN with packed weights), %s",
                    folded, fused, len(winograd), how, dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("FastInferenceModel is for inference only: train the SparseDETR model it was made from")
        return super().train(False)

    @torch.no_grad()
    def predict(self, batched_inputs: List[Dict]) -> TransformerOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            return self.model.predict(batched_inputs, detections_only=True)

    def postprocess(self, out: TransformerOutput, batched_inputs: List[Dict]) -> List[Dict]:
        return self.model.postprocess(out, batched_inputs)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return self.model.evaluation_outputs(self.predict(batched_inputs), batched_inputs)


def calibration_inputs(cfg) -> List[Dict]:
    """``TEST.INT8_CALIBRATION_IMAGES`` images of the first of ``DATASETS.TRAIN``, spread evenly over it, as
    evaluation's mapper gives them: what the int8 path calibrates its activation ranges on."""
    from detectron2.data import DatasetCatalog

    from .dataset_mapper import DetrDatasetMapper
    from .datasets import check_dataset_files

    count = cfg.TEST.INT8_CALIBRATION_IMAGES
    if count < 1:
        raise ValueError(f"TEST.INT8_CALIBRATION_IMAGES must be at least 1 for TEST.PRECISION int8, got {count}")
    if not cfg.DATASETS.TRAIN:
        raise ValueError("TEST.PRECISION int8 calibrates on images of DATASETS.TRAIN, which is empty")
    name = cfg.DATASETS.TRAIN[0]
    try:
        check_dataset_files(name)
    except (KeyError, FileNotFoundError) as error:
        raise ValueError(f"TEST.PRECISION int8 calibrates on images of DATASETS.TRAIN: {error.args[0]}") from None
    records = DatasetCatalog.get(name)
    if not records:
        raise ValueError(f"TEST.PRECISION int8 calibrates on images of {name!r}, which has none")
    mapper = DetrDatasetMapper(cfg, is_train=False)
    step = len(records) / min(count, len(records))
    return [mapper(dict(records[int(i * step)])) for i in range(min(count, len(records)))]


def build_inference_model(cfg, model: SparseDETR) -> nn.Module:
    """The model evaluation and the tools run: ``model`` itself when ``TEST.FAST_INFERENCE`` is off, else
    a :class:`FastInferenceModel` in ``TEST.PRECISION`` (int8: calibrated on :func:`calibration_inputs`)."""
    if not cfg.TEST.FAST_INFERENCE:
        return model
    dtype = inference_precision(cfg.TEST.PRECISION, torch.device(cfg.MODEL.DEVICE))
    return FastInferenceModel(model, dtype, calibration=calibration_inputs(cfg) if dtype == torch.int8 else None)
