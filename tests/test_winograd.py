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
from sparse_detr.fusion import (FLOAT32_MATMUL_ENV, PACKED_FLOAT32_MIN_ROWS, WINOGRAD_TILE_ENV, PackedLinear,
                                WinogradConv, float32_matmul_library, fuse_resnet, pack_linears, winograd_available,
                                winograd_tile, winograd_weight)
from sparse_detr.inference import FastInferenceModel, fold_batch_norms

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not winograd_available(), reason="sparse_detr._C is not built (make setup)")


# The largest error of a Winograd convolution against the float64 one, as a share of its largest value, by tile:
# the direct float32 convolution's own is 2-10e-7 on these sizes; F(4x4, 3x3)'s transforms, whose coefficients
# reach 5 and 8, round 20-40x worse (ResNet-50's features: see test_fast_resnet_50_features_stay_near_float64).
TOLERANCE = {2: 2e-6, 4: 3e-5}


def winograd(x, weight, bias, relu, products="mkl", tile=2):
    """The op (MKL's products), or ``WinogradConv`` with oneDNN's products."""
    if products == "mkl":
        return torch.ops.sparse_detr_C.winograd_conv3x3(x, winograd_weight(weight, tile), bias, relu)
    conv = Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
    conv.weight.data, conv.bias.data = weight, bias
    with torch.no_grad():
        return WinogradConv(conv, relu, products, tile)(x)


def check_against_float64(batch, channels, out_channels, height, width, relu, seed=0, products="mkl", tile=2):
    """The Winograd convolution is as close to the float64 convolution as float32 allows: within
    ``TOLERANCE[tile]`` of its largest value."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator).relu()
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) * (2 / (9 * channels)) ** 0.5
    bias = torch.randn(out_channels, generator=generator) * 0.1
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    if relu:
        expected = expected.relu()
    actual = winograd(x.contiguous(memory_format=torch.channels_last), weight, bias, relu, products, tile)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=TOLERANCE[tile] * expected.abs().max().item())


@pytest.mark.parametrize("batch, channels, out_channels, height, width", [
    (1, 16, 16, 8, 8),  # whole tiles
    (2, 5, 7, 9, 11),  # odd sides (part of a tile at the edges), channels not a multiple of the 16-channel block
    (1, 128, 96, 13, 19),  # ResNet-50's widths
    (1, 3, 4, 1, 1),  # one pixel: every tap but the centre is padding
    (1, 16, 8, 6, 10),  # F(4x4, 3x3): 1.5 and 2.5 tiles, the edge tiles' outputs half outside the image
])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("products", ["mkl", "onednn"])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_convolution_equals_the_convolution(batch, channels, out_channels, height, width, relu, products,
                                                     tile):
    check_against_float64(batch, channels, out_channels, height, width, relu, products=products, tile=tile)


@pytest.mark.parametrize("tile, tiles", [(2, 2 * 4 * 5), (4, 2 * 2 * 3)])
def test_the_transform_ops_compose_to_the_convolution_op(tile, tiles):
    """winograd_input_tiles gives the op's transformed tiles as (tiles, P, C); winograd_output_tiles reads products
    of any layout with K contiguous: a batched product over their views gives the op's output bit for bit."""
    positions = (tile + 2) ** 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 7, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(33, 20, 3, 3, generator=generator) * 0.1, torch.randn(33, generator=generator)
    transformed = winograd_weight(weight, tile)
    assert transformed.shape == (positions, 20, 33)
    v = torch.ops.sparse_detr_C.winograd_input_tiles(x, tile)
    assert v.shape == (tiles, positions, 20) and v.is_contiguous()
    products = torch.bmm(v.transpose(0, 1), transformed)  # (P, tiles, K)
    for relu in (True, False):
        expected = torch.ops.sparse_detr_C.winograd_conv3x3(x, transformed, bias, relu)
        for layout in (products.transpose(0, 1), products.transpose(0, 1).contiguous()):
            actual = torch.ops.sparse_detr_C.winograd_output_tiles(layout, bias, relu, [2, 7, 9], tile)
            assert torch.equal(actual, expected) and actual.is_contiguous(memory_format=torch.channels_last)
    empty = torch.ops.sparse_detr_C.winograd_input_tiles(torch.randn(0, 8, 6, 7), tile)
    assert empty.shape == (0, positions, 8)
    assert torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(0, positions, 5), torch.randn(5), True,
                                                         [0, 6, 7], tile).shape == (0, 5, 6, 7)


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
    with pytest.raises(RuntimeError, match="winograd_input_tiles: tile must be 2 \\(F\\(2x2, 3x3\\)\\) or 4"):
        torch.ops.sparse_detr_C.winograd_input_tiles(torch.randn(1, 8, 6, 7), 3)
    with pytest.raises(RuntimeError, match="products must be a \\(tiles, 36, K\\)"):
        torch.ops.sparse_detr_C.winograd_output_tiles(torch.randn(4, 16, 8), bias, True, [1, 6, 7], 4)
    with pytest.raises(ValueError, match="WinogradConv: tile must be one of \\(2, 4\\), got 3"):
        WinogradConv(Conv2d(8, 8, 3, padding=1), True, "onednn", tile=3)
    with pytest.raises(ValueError, match="winograd_weight: tile must be one of \\(2, 4\\), got 6"):
        winograd_weight(torch.randn(8, 8, 3, 3), 6)


def test_the_winograd_tile_is_chosen_by_the_environment(monkeypatch, tiny_model):
    """F(4x4, 3x3) unless $SPARSE_DETR_WINOGRAD_TILE says 2; a bad value is named. The fast path follows it."""
    monkeypatch.delenv(WINOGRAD_TILE_ENV, raising=False)
    assert winograd_tile() == 4
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    for choice in ("2", "4"):
        monkeypatch.setenv(WINOGRAD_TILE_ENV, choice)
        assert winograd_tile() == int(choice)
        assert {m.tile for m in FastInferenceModel(model).modules() if isinstance(m, WinogradConv)} == {int(choice)}
    monkeypatch.setenv(WINOGRAD_TILE_ENV, "3")
    with pytest.raises(ValueError, match="SPARSE_DETR_WINOGRAD_TILE='3': expected one of 4, 2"):
        winograd_tile()


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
    """The transforms are compiled for any x86-64, AVX2 and AVX-512 (ATEN_CPU_CAPABILITY picks one per process), and
    each gives the same numbers: they multiply by powers of two only, which a fused multiply-add rounds alike."""
    script = textwrap.dedent("""
        import hashlib, sys
        import torch
        sys.path.insert(0, "tests")
        from test_winograd import check_against_float64
        for shape in ((1, 16, 16, 8, 8), (2, 5, 7, 9, 11), (1, 40, 24, 5, 6)):
            for tile in (2, 4):
                check_against_float64(*shape, relu=True, tile=tile)
                check_against_float64(*shape, relu=False, products="onednn", tile=tile)
        def values(*shape):  # the same in every process (torch.randn's vectorized kernels are not)
            count = torch.tensor(shape).prod().item()
            return ((torch.arange(count) * 7919 % 1013).float() / 1013 - 0.5).reshape(shape)

        x = values(2, 9, 11, 40).permute(0, 3, 1, 2)  # channels-last
        digest = hashlib.sha256()
        for tile in (2, 4):
            v = torch.ops.sparse_detr_C.winograd_input_tiles(x, tile)
            products = values(v.shape[0], v.shape[1], 24)
            out = torch.ops.sparse_detr_C.winograd_output_tiles(products, values(24), True, [2, 9, 11], tile)
            digest.update(v.numpy().tobytes())
            digest.update(out.contiguous().numpy().tobytes())
        print(digest.hexdigest())
    """)
    digests = set()
    for capability in ("default", "avx2", None):  # None: this machine's best
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        digests.add(run.stdout.split()[-1])
    assert len(digests) == 1


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("tile", [4, 2])
def test_fast_float32_resnet_runs_its_wide_3x3_convolutions_by_winograd(tiny_model, monkeypatch, library, tile):
    """In float32, the blocks' 3x3 convolutions of stride 1 with 64 channels or more for F(4x4, 3x3) (ResNet-50:
    res2's 3, 3 of res3's 4 blocks, 5 of res4's 6, 2 of res5's 3), 128 or more for F(2x2, 3x3) (all but res2's) run
    by Winograd, their products in the float32 matmul library, the others by oneDNN; the features are the folded
    backbone's (float32 rounding); bf16 keeps oneDNN; a changed weight is transformed again."""
    monkeypatch.setenv(FLOAT32_MATMUL_ENV, library)
    monkeypatch.setenv(WINOGRAD_TILE_ENV, str(tile))
    model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32)
    fast = FastInferenceModel(model, torch.float32)
    convs = [m for m in fast.model.modules() if isinstance(m, WinogradConv)]
    assert all(c.products == library and c.tile == tile for c in convs)
    assert sorted(c.conv.in_channels for c in convs) == [64] * 3 * (tile == 4) + [128] * 3 + [256] * 5 + [512] * 2
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
        expected = F.conv2d(x, conv.conv.weight, conv.conv.bias, padding=1).relu()
        torch.testing.assert_close(conv(x), expected, rtol=0, atol=TOLERANCE[tile] * expected.abs().max().item())


def test_fast_resnet_50_features_stay_near_float64(tiny_model, monkeypatch):
    """Through ResNet-50 (batch norms with statistics of their own), the fast float32 backbone's features with
    Winograd convolutions of either tile are as near the float64 backbone's (relative Frobenius error) as those of
    the fast backbone without them (the batch norms folded into float32 weights, oneDNN's direct convolutions),
    within 1.5x: one F(4x4, 3x3) convolution alone rounds 20-40x worse than the direct one, but the residual sums
    and the 1x1 convolutions carry most of each feature. Measured on this test's image and at 320x480 (res3, res4,
    res5): F(4x4, 3x3) 8.5e-7, 1.3e-6, 1.4-1.5e-6; F(2x2, 3x3) 6.5e-7, 1.1e-6, 1.2e-6; without Winograd 7.8e-7,
    1.3e-6, 1.5e-6; the plain float32 backbone 4.9-5.9e-7, 6.8-7.4e-7, 6.9-7.6e-7."""
    import copy
    from test_inference import randomise_norms

    model = randomise_norms(tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float32))
    image = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(1))

    def fast_backbone(winograd):
        backbone = copy.deepcopy(model.backbone)
        fold_batch_norms(backbone)
        fuse_resnet(backbone, winograd=winograd)
        return {m.tile for m in backbone.modules() if isinstance(m, WinogradConv)}, backbone(
            image.contiguous(memory_format=torch.channels_last))

    with torch.no_grad():
        exact = copy.deepcopy(model.backbone).double()(image.double())
        _, direct = fast_backbone(winograd=False)
        for tile in (2, 4):
            monkeypatch.setenv(WINOGRAD_TILE_ENV, str(tile))
            tiles, features = fast_backbone(winograd=True)
            assert tiles == {tile}
            for name, expected in exact.items():
                error, direct_error = ((torch.linalg.norm(f[name].double() - expected)
                                        / torch.linalg.norm(expected)).item() for f in (features, direct))
                assert error <= 1.5 * direct_error, (tile, name, error, direct_error)
