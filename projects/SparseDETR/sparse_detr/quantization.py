"""An int8 ResNet backbone and int8 linear layers for inference on the CPU (``TEST.PRECISION int8``, opt-in).

The backbone's convolutions run on 8-bit integers by oneDNN (``torch.ops.onednn.qconv2d_pointwise``, the op
PyTorch's compiler emits for its own x86 int8 quantization): weights quantized per output channel (symmetric
int8), activations per tensor (uint8), their ranges calibrated once, on images given when the model is built
(:func:`quantize_resnet`), by PyTorch's observers (``HistogramObserver``: the range that minimises the quantization
error of the values seen, rather than their extremes). On CPUs without VNNI the weights take 7 bits
(:func:`int8_weight_bound`). With AVX512-VNNI (or AMX-INT8) an int8 multiply-add costs
half a bf16 one: on the 2-core AMD EPYC, ResNet-50's convolutions ran at 400-470 G multiply-adds a second against
165-230 in bf16 and 90-115 in float32.

The transformer's linear layers but those that place the samples or make the boxes (:func:`quantize_linears`)
become :class:`Int8Linear` (``torch.ops.onednn.qlinear_pointwise``), calibrated on the model's own activations; the
value projection of 20k tokens took 3.3 against 6.3 ms in bf16 (800x1199, the EPYC). The rest of the transformer
keeps the precision it would have anyway (bf16 where the CPU has native bf16, float32 elsewhere).

Two forms, by what the backbone's batch norms allow:

* a folded ResNet (its batch norms folded into the convolutions: ResNet-50's rows) runs as a chain of uint8 maps:
  each convolution writes its output quantized, its ReLU and the block's residual addition applied by oneDNN on the
  way (the "sum" post-op); only the image is quantized, and the features it returns are either dequantized or,
  in the fast model, read as codes by the input projections (:func:`quantize_projections`);
* a ResNet with GroupNorm (the demo's), whose convolutions cannot be folded: each convolution quantizes its input,
  convolves in int8 and returns float32, its norm and activation then applied as before.

The detections are not the float32 path's: 8-bit activations put ResNet-50's features a few per cent from float32's
(3-4 %, random weights), and a linear layer's output about 1 % from its float layer's; the README gives the AP it
cost on the demo model.
"""
import functools
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

from .fusion import _PackedWeight, _block_fusable, _fusable, stem_max_pool
from .layers.ms_deform_attn import compiled_cpu_ops_available

__all__ = ["Int8Conv", "Int8Linear", "Int8ResNet", "int8_available", "quantize", "quantize_available",
           "quantize_linears", "quantize_projections", "quantize_resnet", "quantized_convolutions"]


def int8_available() -> bool:
    """Whether this PyTorch has oneDNN's int8 convolution (x86 builds with oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


@functools.lru_cache(maxsize=None)
def int8_weight_bound() -> int:
    """The largest weight code: 127 where oneDNN's products of uint8 activations by int8 weights are exact (VNNI's
    and AMX's int32 dot products), 63 where they are not. Without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before
    Zen 4) oneDNN sums each pair of products in int16 first, which saturates above 32,767 (255 x 127 x 2 = 64,770),
    and ResNet-50's codes came out wrong by up to 17; weights of 7 bits keep a pair within 255 x 63 x 2 = 32,130.
    Measured once per process by a convolution whose sum is known (``ONEDNN_MAX_CPU_ISA`` may limit oneDNN below
    what the CPU has), with 1x1 and 3x3 kernels."""
    exact = True
    for kernel in (1, 3):
        x = torch.full((1, 64, 4, 4), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        weight = torch.full((16, 64, kernel, kernel), 127, dtype=torch.int8).contiguous(
            memory_format=torch.channels_last)
        scales, zero_points = torch.ones(16), torch.zeros(16, dtype=torch.long)
        geometry = ([1, 1], [0, 0], [1, 1], 1)
        packed = torch.ops.onednn.qconv_prepack(weight, scales, 1.0, 0, *geometry, list(x.shape))
        y = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, scales, zero_points, None, *geometry, 1.0, 0,
                                               torch.float32, "none", [], "")
        exact = exact and bool((y == 64 * kernel * kernel * 255 * 127).all())
    return 127 if exact else 63


class _Range:
    """The calibrated range of one activation tensor, as uint8: ``(scale, zero_point)``."""

    def __init__(self):
        self.observer = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        self.seen = False

    def observe(self, x: Tensor) -> Tensor:
        values = x.detach().float()
        # its elements in memory order, a view where they are dense: the histogram needs no order, and the
        # observer's aminmax and histc copied a channels-last map whole (3.6 s of 10 calibrating ResNet-50 on two
        # 800x1199 images, the AMD EPYC)
        if values.dim() == 4 and values.is_contiguous(memory_format=torch.channels_last):
            values = values.permute(0, 2, 3, 1)
        self.observer(values.reshape(-1))
        self.seen = True
        return x

    def qparams(self) -> Tuple[float, int]:
        if not self.seen:
            raise RuntimeError("an int8 activation range was never calibrated: give calibration images")
        scale, zero_point = self.observer.calculate_qparams()
        return float(scale), int(zero_point)


class _Known(_Range):
    """A range known already: a uint8 map's (scale, zero point)."""

    def __init__(self, qparams: Tuple[float, int]):
        self.known = qparams

    def observe(self, x: Tensor) -> Tensor:
        return x

    def qparams(self) -> Tuple[float, int]:
        return self.known


def quantize(x: Tensor, qparams: Tuple[float, int]) -> Tensor:
    """The uint8 codes of ``x`` (float32 or bf16) in ``qparams`` (scale, zero point): round(x / scale) + zero point,
    clamped to [0, 255]. On the CPU by ``torch.ops.sparse_detr_C.quantize_uint8`` (``csrc/quantize_cpu.cpp``: one
    pass, where torch's ops take four; at 800x1199, 20k tokens x 256: 0.35-0.42 against 3.2-3.5 ms), the same
    codes."""
    scale, zero_point = qparams
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and quantize_available():
        return torch.ops.sparse_detr_C.quantize_uint8(x, scale, zero_point)
    return torch.clamp(torch.round(x.float() * (1.0 / scale)) + zero_point, 0, 255).to(torch.uint8)


def quantize_available() -> bool:
    """Whether ``sparse_detr._C`` is loaded with its quantization kernel (a build older than it has none)."""
    return compiled_cpu_ops_available("quantize_uint8")


def _quantized_weight(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(int8 codes, float32 scales) of ``weight`` (out, in, ...), per output channel, symmetric, at most
    :func:`int8_weight_bound`."""
    weight = weight.detach().float()
    bound = int8_weight_bound()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                        quant_min=-bound, quant_max=bound)
    observer(weight)
    scales = observer.calculate_qparams()[0].float()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.clamp(torch.round(weight / scales.view(shape)), -bound, bound).to(torch.int8), scales


class Int8Conv(_PackedWeight):
    """``conv`` (a Detectron2 or plain ``nn.Conv2d``, its bias included, any norm or activation left out) in int8:
    ``relu?(conv(x) + bias [+ accumulated])`` on a uint8 input of the calibrated ``input_range``, written as uint8 of
    ``output_range``, or as float32 when that is None.

    Calibration (:meth:`calibrate`) runs the float convolution and records both ranges; :meth:`freeze` then
    quantizes the weight (per output channel, symmetric) and fixes the quantization parameters. The weight is
    reordered for oneDNN at the first call (a cache, dropped by copies and pickles)."""

    def __init__(self, conv: nn.Conv2d, relu: bool, input_range: "_Range", output_range: Optional["_Range"]):
        super().__init__()
        self.conv, self.relu = conv, relu
        self.input_range, self.output_range = input_range, output_range
        # as nn.Conv2d's attributes too, for code that reads them from the module (the padding-free projections)
        self.kernel_size, self.padding, self.stride, self.dilation = (conv.kernel_size, conv.padding, conv.stride,
                                                                      conv.dilation)
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def calibrate(self, x: Tensor, accumulated: Optional[Tensor] = None) -> Tensor:
        """The float convolution of ``x`` (+ ``accumulated``, ReLU), its ranges recorded."""
        self.input_range.observe(x)
        y = F.conv2d(x, self.conv.weight, self.conv.bias, *self.geometry[:3], self.conv.groups)
        if accumulated is not None:
            y = y + accumulated
        if self.relu:
            y = y.relu()
        return y if self.output_range is None else self.output_range.observe(y)

    @torch.no_grad()
    def freeze(self) -> None:
        quantized, scales = _quantized_weight(self.conv.weight)
        self.register_buffer("weight", quantized.contiguous(memory_format=torch.channels_last))
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", torch.zeros_like(scales, dtype=torch.long))
        bias = self.conv.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.input_qparams = self.input_range.qparams()
        self.output_qparams = None if self.output_range is None else self.output_range.qparams()
        del self.conv, self.input_range, self.output_range  # the float weights are no longer needed

    def _packed(self, q: Tensor) -> Tensor:
        # for the input's shape, as oneDNN picks its kernel and the weight layout it reads by that shape: packed for
        # none, ResNet-50's res5 1x1 convolutions took 26-54 ms at 800x1199 instead of 2.5-5 (the AMD EPYC)
        stride, padding, dilation, groups = self.geometry
        return self.packed(self.weight, lambda weight: torch.ops.onednn.qconv_prepack(
            weight, self.weight_scales, *self.input_qparams, stride, padding, dilation, groups, list(q.shape)),
            shape=q.shape)

    def forward(self, q: Tensor, accumulated: Optional[Tensor] = None,
                accumulated_qparams: Optional[Tuple[float, int]] = None) -> Tensor:
        """``q``: uint8, channels-last; ``accumulated`` (uint8 of ``accumulated_qparams``) is added before the ReLU,
        and may be overwritten."""
        stride, padding, dilation, groups = self.geometry
        x_scale, x_zero = self.input_qparams
        out_scale, out_zero = self.output_qparams if self.output_qparams is not None else (1.0, 0)
        out_dtype = None if self.output_qparams is not None else torch.float32
        weight = self._packed(q)
        if accumulated is None:
            return torch.ops.onednn.qconv2d_pointwise(
                q, x_scale, x_zero, weight, self.weight_scales, self.weight_zero_points, self.bias, stride, padding,
                dilation, groups, out_scale, out_zero, out_dtype, "relu" if self.relu else "none", [], "")
        return torch.ops.onednn.qconv2d_pointwise.binary(
            q, x_scale, x_zero, weight, self.weight_scales, self.weight_zero_points, accumulated, self.bias, stride,
            padding, dilation, groups, out_scale, out_zero, out_dtype, *accumulated_qparams, "sum", 1.0,
            "relu" if self.relu else None, [], "")


class _Int8Stem(nn.Module):
    def __init__(self, stem: BasicStem, image_range: _Range):
        super().__init__()
        self.out_range = _Range()
        self.conv1 = Int8Conv(stem.conv1, relu=True, input_range=image_range, output_range=self.out_range)

    def calibrate(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.conv1.calibrate(x), kernel_size=3, stride=2, padding=1)

    def forward(self, q: Tensor) -> Tensor:
        return stem_max_pool(self.conv1(q))


class _Int8Block(nn.Module):
    """A folded BottleneckBlock or BasicBlock on uint8 maps: the last convolution adds the shortcut (the input, or
    the projection's uint8 output) and applies the ReLU as post-ops."""

    def __init__(self, block: nn.Module, input_range: _Range, input_is_private: bool):
        super().__init__()
        names = ["conv1", "conv2", "conv3"] if isinstance(block, BottleneckBlock) else ["conv1", "conv2"]
        convs = [getattr(block, name) for name in names]
        ranges = [input_range] + [_Range() for _ in convs]
        self.inner = nn.ModuleList(Int8Conv(conv, True, ranges[i], ranges[i + 1]) for i, conv in enumerate(convs[:-1]))
        self.out_range = ranges[-1]
        self.last = Int8Conv(convs[-1], True, ranges[-2], self.out_range)
        self.shortcut_range = input_range if block.shortcut is None else _Range()
        self.shortcut = None if block.shortcut is None else Int8Conv(block.shortcut, False, input_range,
                                                                     self.shortcut_range)
        self.input_is_private = input_is_private

    def calibrate(self, x: Tensor) -> Tensor:
        out = x
        for conv in self.inner:
            out = conv.calibrate(out)
        shortcut = x if self.shortcut is None else self.shortcut.calibrate(x)
        return self.last.calibrate(out, shortcut)

    def freeze(self) -> None:
        self.shortcut_qparams = self.shortcut_range.qparams()
        del self.shortcut_range, self.out_range

    def forward(self, q: Tensor) -> Tensor:
        out = q
        for conv in self.inner:
            out = conv(out)
        if self.shortcut is not None:
            shortcut = self.shortcut(q)
        else:  # the sum post-op writes into its accumulator
            shortcut = q if self.input_is_private else q.clone()
        return self.last(out, shortcut, self.shortcut_qparams)


class Int8ResNet(nn.Module):
    """A folded Detectron2 ``ResNet`` on uint8 maps (the module docstring's first form); returns its features, as the
    ResNet's ``forward`` names them, dequantized to float32, or as uint8 codes of ``feature_qparams`` once
    :func:`quantize_projections` has set ``returns_codes``."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.image_range = _Range()
        self.stem = _Int8Stem(resnet.stem, self.image_range)
        self.stage_names, self.out_features = list(resnet.stage_names), list(resnet._out_features)
        self._out_feature_channels = dict(resnet._out_feature_channels)
        self._out_feature_strides = dict(resnet._out_feature_strides)
        stages, previous = [], self.stem.out_range
        for stage in resnet.stages:
            blocks = []
            for index, block in enumerate(stage):
                blocks.append(_Int8Block(block, previous, input_is_private=index > 0))
                previous = blocks[-1].out_range
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_ranges = {"stem": self.stem.out_range, **{
            name: stage[-1].out_range for name, stage in zip(self.stage_names, self.stages)}}
        self.returns_codes = False  # the features as uint8 maps of feature_qparams (set by quantize_projections)

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self.out_features}

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        x = self.stem.calibrate(x)
        for stage in self.stages:
            for block in stage:
                x = block.calibrate(x)

    @torch.no_grad()
    def freeze(self) -> None:
        self.image_qparams = self.image_range.qparams()
        self.feature_qparams = {name: r.qparams() for name, r in self.feature_ranges.items()}
        # every feature follows a ReLU: its zero is code 0 (dequantized by a scale alone; the padding value)
        assert all(zero_point == 0 for _, zero_point in self.feature_qparams.values())
        for module in list(self.modules()):
            if isinstance(module, (Int8Conv, _Int8Block)):
                module.freeze()
        del self.image_range, self.feature_ranges

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x``: the normalised images (float), or their uint8 codes of ``image_qparams`` (the fast path's
        ``SparseDETR.backbone_input``)."""
        q = x if x.dtype == torch.uint8 else quantize(x, self.image_qparams)
        q = q.contiguous(memory_format=torch.channels_last)
        q = self.stem(q)
        outputs = {}
        for name, stage in [("stem", [])] + list(zip(self.stage_names, self.stages)):
            for block in stage:
                q = block(q)
            if name in self.out_features:
                outputs[name] = q if self.returns_codes else q * self.feature_qparams[name][0]  # float32
        return outputs


@torch.no_grad()
def quantize_projections(backbone: Int8ResNet, in_features: List[str], input_proj: nn.ModuleList) -> int:
    """Let the input projections that read ``backbone``'s features (one a feature, and the first extra level's,
    which reads the last) take its uint8 maps: their convolutions (``input_proj[i][0]``, plain ``nn.Conv2d``) become
    :class:`Int8Conv` with a float32 output, and ``backbone`` returns its features undequantized. A projection
    then runs at the int8 rate, and no feature is written in float first (at 800x1199, ResNet-50's three: 13M
    values). Returns how many were converted (0, and nothing changed, unless every such projection is a plain
    convolution)."""
    names = list(in_features) + [in_features[-1]]
    convs = [proj[0] for proj in list(input_proj)[:len(names)]]
    if not all(type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
               for conv in convs):
        return 0
    for proj, conv, name in zip(input_proj, convs, names):
        proj[0] = Int8Conv(conv, relu=False, input_range=_Known(backbone.feature_qparams[name]), output_range=None)
        proj[0].freeze()
    backbone.returns_codes = True
    return len(convs)


class _Int8FloatConv(nn.Module):
    """A Detectron2 convolution with a norm that cannot be folded (GroupNorm): its input quantized, the convolution
    in int8 with a float32 output, then its norm and activation (the module docstring's second form)."""

    def __init__(self, conv: D2Conv2d):
        super().__init__()
        self.int8 = Int8Conv(conv, relu=False, input_range=_Range(), output_range=None)
        self.norm, self.activation = conv.norm, conv.activation
        self.calibrating = True

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            y = self.int8.calibrate(x.float())
        else:
            q = quantize(x, self.int8.input_qparams).contiguous(memory_format=torch.channels_last)
            y = self.int8(q)
        if self.norm is not None:
            y = self.norm(y)
        return y if self.activation is None else self.activation(y)


@torch.no_grad()
def quantize_resnet(backbone: nn.Module, images: Iterable[Tensor]) -> nn.Module:
    """An int8 copy of a Detectron2 ``ResNet`` on the CPU, its activation ranges calibrated on ``images``
    (the backbone's normalised inputs, (N, 3, H, W) each): an :class:`Int8ResNet` when every convolution is folded
    (:func:`~sparse_detr.inference.fold_batch_norms` first), else the ResNet with each convolution replaced by
    its int8 form with a float output. ``backbone`` is modified in the second case; pass a copy.

    Raises a ValueError naming the problem for anything else (a Swin, a CUDA model, no image) and a RuntimeError
    where this PyTorch has no oneDNN int8 convolution."""
    if not isinstance(backbone, ResNet):
        raise ValueError(f"TEST.PRECISION int8 quantizes ResNet backbones; this model's is a {type(backbone).__name__}")
    if any(p.device.type != "cpu" for p in backbone.parameters()):
        raise ValueError("TEST.PRECISION int8 runs on the CPU (MODEL.DEVICE cpu)")
    if not int8_available():
        raise RuntimeError("TEST.PRECISION int8 needs oneDNN's int8 convolution (torch.ops.onednn.qconv2d_pointwise), "
                           "which this PyTorch build lacks")
    images = list(images)
    if not images:
        raise ValueError("TEST.PRECISION int8 needs calibration images (at least one)")
    blocks = [block for stage in backbone.stages for block in stage]
    folded = (isinstance(backbone.stem, BasicStem) and _fusable(backbone.stem.conv1)
              and all(_block_fusable(block) for block in blocks))
    if folded:
        quantized = Int8ResNet(backbone)
        for image in images:
            quantized.calibrate(image.float().contiguous(memory_format=torch.channels_last))
        quantized.freeze()
        return quantized
    convs = [(parent, name, child) for parent in backbone.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Conv2d)]
    for parent, name, child in convs:
        setattr(parent, name, _Int8FloatConv(child))
    for image in images:
        backbone(image.float())
    for parent, name, _ in convs:
        wrapper = getattr(parent, name)
        wrapper.int8.freeze()
        wrapper.calibrating = False
    return backbone


class Int8Linear(_PackedWeight):
    """``linear`` on 8-bit integers: its input quantized as uint8 (per tensor, the range calibrated), its weight per
    output channel (symmetric), the product and the bias by oneDNN (``torch.ops.onednn.qlinear_pointwise``), the
    output in the dtype the float layer would give (bf16 under the fast path's autocast, else the input's), or in
    float32 with ``float_output`` (a head whose scores are ranked).

    Calibrating (from construction until :meth:`freeze`) it runs the float layer and records its input's range.
    The weight is reordered for oneDNN at the first call (a cache, as :class:`Int8Conv`'s)."""

    def __init__(self, linear: nn.Linear, float_output: bool = False):
        super().__init__()
        self.linear, self.float_output = linear, float_output
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.input_range = _Range()

    @property
    def calibrating(self) -> bool:
        """Until :meth:`freeze`, which drops the float layer."""
        return "linear" in self._modules

    @torch.no_grad()
    def freeze(self) -> None:
        quantized, scales = _quantized_weight(self.linear.weight)
        self.register_buffer("weight", quantized)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", torch.zeros_like(scales, dtype=torch.long))
        bias = self.linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.input_qparams = self.input_range.qparams()
        del self.linear, self.input_range

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.input_range.observe(x)
            if self.float_output:
                with torch.autocast(x.device.type, enabled=False):
                    return self.linear(x.float())  # (the head's own float32 layer)
            return self.linear(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if self.float_output:
            out_dtype = torch.float32
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=out_dtype)
        weight = self.packed(self.weight, lambda weight: torch.ops.onednn.qlinear_prepack(weight, None))
        y = torch.ops.onednn.qlinear_pointwise(
            quantize(rows, self.input_qparams), *self.input_qparams, weight, self.weight_scales,
            self.weight_zero_points, self.bias, 1.0, 0, out_dtype, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def quantize_linears(transformer: nn.Module) -> List[Int8Linear]:
    """Make the transformer's linear layers :class:`Int8Linear`, in place, but for those that place the samples or
    make the boxes: each encoder layer's value projection (every token; the encoder then projects before sampling,
    ``MSDeformAttn.projects_samples``), output projection and feed-forward pair
    (its queries: every token, or the kept ones); those over every token, the two-stage head's ``enc_output`` and
    class head (float32 logits) and the scoring network's first three layers (its last, whose scores top-k ranks,
    stays); each decoder layer's output projection and feed-forward pair. Left in float: the sampling offsets and
    attention weights, the decoder's value projections (applied to samples: ``project_values_after_sampling``) and
    self-attention, the box heads, the decoder's class heads. Returns them, calibrating: run the model on the
    calibration images, then ``freeze`` each."""
    converted = []
    places = []
    for layer in transformer.encoder.layers:
        places += [(layer.self_attn, "value_proj"), (layer.self_attn, "output_proj"), (layer, "linear1"),
                   (layer, "linear2")]
    if hasattr(transformer, "enc_output"):
        places.append((transformer, "enc_output"))
    if hasattr(transformer, "enc_mask_predictor"):  # (its last layer, whose scores top-k ranks, is left)
        scorer = transformer.enc_mask_predictor
        places += [(scorer.layer1, "1"), (scorer.layer2, "0"), (scorer.layer2, "2")]
    for layer in transformer.decoder.layers:
        places += [(layer.cross_attn, "output_proj"), (layer, "linear1"), (layer, "linear2")]
    for parent, name in places:
        child = getattr(parent, name)
        if type(child) is nn.Linear:
            setattr(parent, name, Int8Linear(child))
            converted.append(getattr(parent, name))
    if transformer.two_stage and transformer.separate_heads:
        # the two-stage class head, over every token (its own, unlike the decoder's): float32 logits, as the
        # objectness that top-k ranks has them (unwrapped from the float32 wrapper of a bf16 rest)
        heads, index = transformer.class_embed, transformer.num_decoder_layers
        head = getattr(heads[index], "module", heads[index])
        if type(head) is nn.Linear:
            heads[index] = Int8Linear(head, float_output=True)
            converted.append(heads[index])
    return converted


def quantized_convolutions(backbone: nn.Module) -> int:
    """How many convolutions of ``backbone`` run in int8."""
    return sum(isinstance(m, Int8Conv) for m in backbone.modules())
