"""The float32 Winograd convolution of the fast inference path (csrc/winograd_cpu.cpp, sparse_detr.fusion.WinogradConv):
the 3x3 convolution's values, every instruction set, its errors, and where the fast path uses it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.fusion import WinogradConv, fuse_resnet, winograd_available, winograd_weight
from sparse_detr.inference import FastInferenceModel, fold_batch_norms

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not winograd_available(), reason="sparse_detr._C is not built (make setup)")


def winograd(x, weight, bias, relu):
    return torch.ops.sparse_detr_C.winograd_conv3x3(x, winograd_weight(weight), bias, relu)


def check_against_float64(batch, channels, out_channels, height, width, relu, seed=0):
    """The Winograd convolution is as close to the float64 convolution as float32 allows: within 2e-6 of its
    largest value (the direct float32 convolution's own error is 2-10e-7 on these sizes)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator).relu()
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) * (2 / (9 * channels)) ** 0.5
    bias = torch.randn(out_channels, generator=generator) * 0.1
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    if relu:
        expected = expected.relu()
    actual = winograd(x.contiguous(memory_format=torch.channels_last), weight, bias, relu)
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
def test_winograd_convolution_equals_the_convolution(batch, channels, out_channels, height, width, relu):
    check_against_float64(batch, channels, out_channels, height, width, relu)


def test_winograd_takes_contiguous_input_and_empty_batches():
    x = torch.randn(1, 8, 6, 7)  # NCHW: made channels-last inside
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    torch.testing.assert_close(winograd(x, weight, bias, False), F.conv2d(x, weight, bias, padding=1),
                               rtol=1e-5, atol=1e-5)
    assert winograd(torch.randn(0, 8, 6, 7), weight, bias, True).shape == (0, 8, 6, 7)


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
    """)
    for capability in ("default", "avx2"):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]


def test_fast_float32_resnet_runs_its_wide_3x3_convolutions_by_winograd(tiny_model):
    """In float32, the blocks' 3x3 convolutions of stride 1 with 128 channels or more (ResNet-50: 3 of res3's 4
    blocks, 5 of res4's 6, 2 of res5's 3) run by Winograd, the others by oneDNN; the features are the folded backbone's (float32
    rounding); bf16 keeps oneDNN; a changed weight is transformed again."""
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    convs = [m for m in fast.model.modules() if isinstance(m, WinogradConv)]
    assert len(convs) == 10
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
