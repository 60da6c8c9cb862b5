"""The fast inference path's stem max pool (csrc/max_pool_cpu.cpp, sparse_detr.fusion.stem_max_pool): PyTorch's
3x3 max pool of stride 2 and padding 1, element for element, in float32 and bf16 (and uint8, the int8 backbone's
codes), on every instruction set."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.fusion import _FusedStem, max_pool_available, stem_max_pool
from sparse_detr.inference import FastInferenceModel

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not max_pool_available(), reason="sparse_detr._C is not built (make setup)")

SHAPES = [
    (1, 64, 40, 60),  # the stem's 64 channels: four 16-channel vectors (one 64-code vector in uint8)
    (2, 5, 7, 9),  # odd sides (a window cut by the edge), fewer channels than a vector
    (1, 37, 6, 5),  # two vectors and a remainder of 5
    (1, 16, 1, 1),  # one pixel: every window but the centre's element is padding
    (2, 130, 9, 8),  # uint8: two 64-code vectors and a remainder of 2
]
DTYPES = [torch.float32, torch.bfloat16, torch.uint8]


def channels_last_map(shape, dtype, seed=0):
    """Random values with NaN, infinities, signed zeros and ties, in channels-last memory."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).round(decimals=1)  # ties within windows
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)
    flat[picks[0::23]] = float("nan")
    flat[picks[1::29]] = float("-inf")
    flat[picks[2::31]] = float("inf")
    flat[picks[3::17]] = -0.0
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def check_codes_equal_pytorch(shape):
    """uint8 codes (PyTorch's own uint8 pool fails on maps this large): the pool of the same values in float32."""
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    actual = torch.ops.sparse_detr_C.max_pool3x3s2(x)
    assert actual.dtype == torch.uint8 and actual.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(actual, F.max_pool2d(x.float(), kernel_size=3, stride=2, padding=1).to(torch.uint8))


def check_equals_pytorch(shape, dtype):
    if dtype == torch.uint8:
        return check_codes_equal_pytorch(shape)
    x = channels_last_map(shape, dtype)
    expected = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    actual = torch.ops.sparse_detr_C.max_pool3x3s2(x)
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert actual.is_contiguous(memory_format=torch.channels_last)
    # NaN where PyTorch has NaN (its bf16 kernel may change a NaN's payload), elsewhere the same bits (the sign of
    # every zero too)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual.float().view(torch.int32)[~nan], expected.float().view(torch.int32)[~nan])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_equals_pytorch(shape, dtype):
    check_equals_pytorch(shape, dtype)


def test_every_instruction_set():
    """The loops are compiled for any x86-64, AVX2 and AVX-512; ATEN_CPU_CAPABILITY picks one per process."""
    script = textwrap.dedent("""
        import sys
        import torch
        sys.path.insert(0, "tests")
        from test_stem_max_pool import DTYPES, SHAPES, check_equals_pytorch
        for shape in SHAPES:
            for dtype in DTYPES:
                check_equals_pytorch(shape, dtype)
    """)
    for capability in ("default", "avx2"):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "2"})
        assert run.returncode == 0, run.stderr[-3000:]


def test_max_pool_takes_any_layout_and_rejects_other_dtypes():
    x = torch.randn(2, 8, 9, 10)  # NCHW: made channels-last inside
    torch.testing.assert_close(torch.ops.sparse_detr_C.max_pool3x3s2(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)
    assert torch.ops.sparse_detr_C.max_pool3x3s2(torch.randn(0, 8, 9, 10)).shape == (0, 8, 5, 5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or uint8"):
        torch.ops.sparse_detr_C.max_pool3x3s2(x.double())


def test_stem_max_pool_falls_back_to_pytorch():
    """NCHW maps, other dtypes and maps that need gradients take F.max_pool2d (the kernel has no backward)."""
    x = torch.randn(1, 4, 9, 8, requires_grad=True)
    y = stem_max_pool(x.contiguous(memory_format=torch.channels_last))
    y.sum().backward()
    assert x.grad is not None and x.grad.sum().item() > 0
    for other in (torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8, dtype=torch.float64)):
        torch.testing.assert_close(stem_max_pool(other), F.max_pool2d(other, 3, 2, 1), rtol=0, atol=0)


def test_stem_max_pool_takes_uint8_codes_with_or_without_the_kernel(monkeypatch):
    """The int8 backbone's codes: by the kernel, and without it as float32 (PyTorch's own uint8 pool fails on a
    stem's map at 800x1199)."""
    codes = torch.randint(0, 256, (1, 64, 40, 60), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    codes = codes.contiguous(memory_format=torch.channels_last)
    expected = F.max_pool2d(codes.float(), 3, 2, 1).to(torch.uint8)
    calls = []
    kernel = torch.ops.sparse_detr_C.max_pool3x3s2
    monkeypatch.setattr(torch.ops.sparse_detr_C, "max_pool3x3s2", lambda x: calls.append(1) or kernel(x),
                        raising=False)
    assert torch.equal(stem_max_pool(codes), expected) and calls == [1]
    monkeypatch.setattr("sparse_detr.fusion.max_pool_available", lambda: False)
    assert torch.equal(stem_max_pool(codes), expected) and calls == [1]


def test_fast_path_stem_uses_it(tiny_model, monkeypatch):
    """The fused stem calls the kernel, and the fast path's detections are those it gave with PyTorch's pool."""
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    stems = [m for m in fast.modules() if isinstance(m, _FusedStem)]
    assert len(stems) == 1
    inputs = [{"image": torch.rand(3, 90, 125) * 255, "height": 90, "width": 125}]
    calls = []
    kernel = torch.ops.sparse_detr_C.max_pool3x3s2

    def counted(x):
        calls.append(tuple(x.shape))
        return kernel(x)

    with torch.no_grad():
        monkeypatch.setattr("sparse_detr.fusion.max_pool_available", lambda: False)
        expected = fast.predict(inputs)
        monkeypatch.setattr("sparse_detr.fusion.max_pool_available", lambda: True)
        monkeypatch.setattr(torch.ops.sparse_detr_C, "max_pool3x3s2", counted, raising=False)
        actual = fast.predict(inputs)
    assert len(calls) == 1 and calls[0][1] == 64
    assert torch.equal(actual.pred_logits[-1], expected.pred_logits[-1])
    assert torch.equal(actual.pred_boxes[-1], expected.pred_boxes[-1])
