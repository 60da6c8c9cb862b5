"""The float32 Winograd convolution of the fast inference path (csrc/winograd_cpu.cpp, sparse_detr.fusion.WinogradConv):
the 3x3 convolution's values with either library's products (MKL's batched product in the op, oneDNN's grouped
convolution between the two transform ops), every instruction set, its errors, and where the fast path uses it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import Conv2d

from sparse_detr import fusion
from sparse_detr.fusion import (FLOAT32_MATMUL_ENV, PACKED_FLOAT32_MIN_ROWS, PackedLinear, WinogradConv,
                                float32_matmul_library, fuse_resnet, pack_linears, winograd_available, winograd_weight)
from sparse_detr.inference import FastInferenceModel, fold_batch_norms

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not winograd_available(), reason="sparse_detr._C is not built (make setup)")


def winograd(x, weight, bias, relu, products="mkl"):
    """The op (MKL's products), or ``WinogradConv`` with oneDNN's products."""
    if products == "mkl":
        return torch.ops.sparse_detr_C.winograd_conv3x3(x, winograd_weight(weight), bias, relu)
    conv = Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
    conv.weight.data, conv.bias.data = weight, bias
    with torch.no_grad():
        return WinogradConv(conv, relu, products)(x)


def check_against_float64(batch, channels, out_channels, height, width, relu, seed=0, products="mkl"):
    """The Winograd convolution is as close to the float64 convolution as float32 allows: within 2e-6 of its
    largest value (the direct float32 convolution's own error is 2-10e-7 on these sizes)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator).relu()
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) * (2 / (9 * channels)) ** 0.5
    bias = torch.randn(out_channels, generator=generator) * 0.1
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    if relu:
        expected = expected.relu()
    actual = winograd(x.contiguous(memory_format=torch.channels_last), weight, bias, relu, products)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize("batch, channels, out_channels, height, width", [
    (1, 16, 16, 8, 8),  # whole tiles
    (2, 5, 7, 9, 11),  # odd sides (a half tile at the edges), channels not a multiple of the 16-channel block
    (1, 128, 96, 13, 19),  # ResNet-50's widths
    (1, 3, 4, 1, 1),  # one pixel: every tap but the centre is padding
])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("products", ["mkl", "onednn"])
def test_winograd_convolution_equals_the_convolution(batch, channels, out_channels, height, width, relu, products):
    check_against_float64(batch, channels, out_channels, height, width, relu, products=products)


def test_the_transform_ops_compose_to_the_convolution_op():
    """winograd_input_tiles gives the op's transformed tiles as (tiles, 16, C); winograd_output_tiles reads products
    of any layout with K contiguous: a batched product over their views gives the op's output bit for bit."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 7, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(33, 20, 3, 3, generator=generator) * 0.1, torch.randn(33, generator=generator)
    tiles = torch.ops.sparse_detr_C.winograd_input_tiles(x)
    assert tiles.shape == (2 * 4 * 5, 16, 20) and tiles.is_contiguous()
    products = torch.bmm(tiles.transpose(0, 1), winograd_weight(weight))  # (16, tiles, K)
    for relu in (True, False):
        expected = torch.ops.sparse_detr_C.winograd_conv3x3(x, winograd_weight(weight), bias, relu)
        for layout in (products.transpose(0, 1), products.transpose(0, 1).contiguous()):
            actual = torch.ops.sparse_detr_C.winograd_output_tiles(layout, bias, relu, [2, 7, 9])
            assert torch.equal(actual, expected) and actual.is_contiguous(memory_format=torch.channels_last)
    empty = torch.ops.sparse_detr_C.winograd_input_tiles(torch.randn(0, 8, 6, 7))
    assert empty.shape == (0, 16, 8)
    assert torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(0, 16, 5), torch.randn(5), True,
                                                         [0, 6, 7]).shape == (0, 5, 6, 7)


def test_the_transform_ops_reject_wrong_inputs():
    bias = torch.randn(8)
    with pytest.raises(RuntimeError, match="winograd_input_tiles: input must be a \\(N, C, H, W\\) float32"):
        torch.ops.sparse_detr_C.winograd_input_tiles(torch.randn(1, 8, 6, 7).double())
    with pytest.raises(RuntimeError, match="tiles = 12 for an input of size \\[1, 6, 7\\]"):
        torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(11, 16, 8), bias, True, [1, 6, 7])
    with pytest.raises(RuntimeError, match="K contiguous"):
        torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(12, 8, 16).transpose(1, 2), bias, True, [1, 6, 7])
    with pytest.raises(RuntimeError, match="size must be the input's \\(N, H, W\\)"):
        torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(12, 16, 8), bias, True, [6, 7])
    with pytest.raises(RuntimeError, match="winograd_output_tiles: bias must be \\(K,\\) float32 with K = 8"):
        torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(12, 16, 8), torch.randn(5), True, [1, 6, 7])
    with pytest.raises(ValueError, match="'mkl' or 'onednn', got 'blas'"):
        WinogradConv(Conv2d(8, 8, 3, padding=1), True, "blas")


def test_the_float32_matmul_library_is_chosen_by_vendor_or_environment(monkeypatch):
    """auto: oneDNN on an x86 CPU not made by Intel (MKL is slow there), MKL on Intel's and where the vendor is
    unknown; $SPARSE_DETR_FLOAT32_MATMUL overrides; a bad value is named. The fast path's layers follow it."""
    assert fusion.cpu_vendor() == _cpuinfo_vendor()
    monkeypatch.delenv(FLOAT32_MATMUL_ENV, raising=False)
    for vendor, expected in (("GenuineIntel", "mkl"), ("AuthenticAMD", "onednn"), ("", "mkl")):
        monkeypatch.setattr(fusion, "cpu_vendor", lambda vendor=vendor: vendor)
        assert float32_matmul_library() == expected
    for choice in ("mkl", "onednn"):
        monkeypatch.setenv(FLOAT32_MATMUL_ENV, choice)
        assert float32_matmul_library() == choice
        linear = torch.nn.Sequential(torch.nn.Linear(16, 8))
        pack_linears(linear)
        assert linear[0].float32_min_rows == (0 if choice == "onednn" else PACKED_FLOAT32_MIN_ROWS)
    monkeypatch.setenv(FLOAT32_MATMUL_ENV, "blas")
    with pytest.raises(ValueError, match="SPARSE_DETR_FLOAT32_MATMUL='blas': expected one of auto, mkl, onednn"):
        float32_matmul_library()


def _cpuinfo_vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def test_a_float32_packed_linear_on_onednn_takes_every_size():
    """With float32_min_rows 0 (oneDNN's library) a float32 layer packs its weight for any number of rows, within
    float32 rounding of the plain layer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 91)
    packed = PackedLinear(linear, float32_min_rows=0)
    few = torch.randn(2, 3, 256)
    with torch.no_grad():
        torch.testing.assert_close(packed(few), linear(few), rtol=1e-5, atol=1e-5)
    assert "weight" in packed._packed_weights


def test_winograd_takes_contiguous_input_and_empty_batches():
    x = torch.randn(1, 8, 6, 7)  # NCHW: made channels-last inside
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    torch.testing.assert_close(winograd(x, weight, bias, False), F.conv2d(x, weight, bias, padding=1),
                               rtol=1e-5, atol=1e-5)
    assert winograd(torch.randn(0, 8, 6, 7), weight, bias, True).shape == (0, 8, 6, 7)


def test_onednn_products_serve_inputs_of_other_sizes_and_empty_batches():
    """The grouped convolution's weight is packed for the first input's tile count and serves any other."""
    conv = Conv2d(24, 16, 3, padding=1)
    layer = WinogradConv(conv, relu=True, products="onednn")
    with torch.no_grad():
        for shape in ((1, 24, 20, 30), (2, 24, 7, 9), (1, 24, 41, 3)):
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), F.conv2d(x, conv.weight, conv.bias, padding=1).relu(),
                                       rtol=1e-5, atol=1e-5)
        assert layer(torch.randn(0, 24, 6, 7)).shape == (0, 16, 6, 7)
    grouped = layer._packed_weights["grouped"][1]
    assert layer._packed_weights["weight"][0][-1] == (1, 16 * 24, 21 * 2, 1)  # packed for the last tile count (41x3)
    with torch.no_grad():
        layer(torch.randn(1, 24, 8, 8))
    assert layer._packed_weights["weight"][0][-1] == (1, 16 * 24, 16, 1)
    assert layer._packed_weights["grouped"][1] is grouped  # the weight's transform is kept


def test_winograd_rejects_wrong_inputs():
    x, weight, bias = torch.randn(1, 8, 6, 7), torch.randn(8, 8, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError, match="float32"):
        winograd(x.double(), weight, bias, True)
    with pytest.raises(RuntimeError, match=r"\(16, C, K\)"):
        torch.ops.sparse_detr_C.winograd_conv3x3(x, torch.randn(9, 8, 8), bias, True)
    with pytest.raises(RuntimeError, match="bias"):
        winograd(x, weight, torch.randn(5), True)


def test_every_instruction_set():
    """The transforms are compiled for any x86-64, AVX2 and AVX-512; ATEN_CPU_CAPABILITY picks one per process."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        from test_winograd import check_against_float64
        for shape in ((1, 16, 16, 8, 8), (2, 5, 7, 9, 11), (1, 40, 24, 5, 6)):
            check_against_float64(*shape, relu=True)
            check_against_float64(*shape, relu=False, products="onednn")
    """)
    for capability in ("default", "avx2"):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_fast_float32_resnet_runs_its_wide_3x3_convolutions_by_winograd(tiny_model, monkeypatch, library):
    """In float32, the blocks' 3x3 convolutions of stride 1 with 128 channels or more (ResNet-50: 3 of res3's 4
    blocks, 5 of res4's 6, 2 of res5's 3) run by Winograd, their products in the float32 matmul library, the
    others by oneDNN; the features are the folded backbone's (float32 rounding); bf16 keeps oneDNN; a changed
    weight is transformed again."""
    monkeypatch.setenv(FLOAT32_MATMUL_ENV, library)
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    convs = [m for m in fast.model.modules() if isinstance(m, WinogradConv)]
    assert len(convs) == 10 and all(c.products == library for c in convs)
    assert sorted(c.conv.in_channels for c in convs) == [128] * 3 + [256] * 5 + [512] * 2
    assert all(c.stride == (1, 1) for c in convs)
    assert not any(isinstance(m, WinogradConv) for m in FastInferenceModel(model, torch.bfloat16).modules())

    backbone = model.backbone
    fold_batch_norms(backbone)
    image = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = backbone(image)
        fuse_resnet(backbone, winograd=True)
        actual = backbone(image)
        for name, feature in expected.items():
            torch.testing.assert_close(actual[name], feature, rtol=0, atol=1e-5 * feature.abs().max().item())
        conv = next(m for m in backbone.modules() if isinstance(m, WinogradConv))
        x = torch.randn(1, conv.conv.in_channels, 6, 5)
        conv.conv.weight.mul_(2)  # in place: the transformed weight follows
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.conv.weight, conv.conv.bias, padding=1).relu(),
                                   rtol=1e-5, atol=1e-5)
