"""The benchmark tool and its package: FLOP counting handles, the timing path, the scaling study, the ``--json``
output, and A/B runs (turns interleaved, the same inputs for both sides, the ratio, bad overrides).

Tiny models (conftest's TINY transformer on the config's ResNet-50) on 64x96 images keep this fast. The
level sizes of a 64x96 image are 8x12, 4x6, 2x3 and 1x2: 128 tokens, of which rho = 0.1 keeps
floor(12.8) + 1 = 13.
"""
import json
import platform
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis

from sparse_detr.benchmark import Timing, ab_table, scaling_study, scaling_table
from sparse_detr.benchmark.figures import benchmark_config
from sparse_detr.layers import ms_deform_attn
from sparse_detr.benchmark.ab import (SIZE_SPREAD, Ratio, ab_ratio, ab_runs, build_side, inference_batches, side_keys,
                                     training_batch, training_batches, turn_image_sizes)
from sparse_detr.benchmark.counts import cpu_peak_gflops, encoder_auxiliary_heads, trainable_parameters
from sparse_detr.benchmark.timing import measure_speed, take_turns
from sparse_detr.flops import SAMPLING_TAPS, authors_op_handles, count_flops
from sparse_detr.inference import cpu_description
from sparse_detr.layers import multi_scale_deformable_attention

from conftest import CONFIG_DIR, REPO_ROOT, TINY, load_script

BENCHMARK_PATH = REPO_ROOT / "projects" / "SparseDETR" / "benchmark.py"
HEIGHT, WIDTH = 64, 96
LEVEL_SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2)]
TOKENS = sum(h * w for h, w in LEVEL_SHAPES)
TINY_OVERRIDES = [item for key, value in TINY.items() for item in (f"MODEL.SPARSE_DETR.{key}", str(value))]


@pytest.fixture(scope="module")
def benchmark():
    return load_script(BENCHMARK_PATH, "sparse_detr_benchmark")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on several threads spend their time in OpenMP barriers when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_batch(batch_size: int = 1):
    return torch.rand((batch_size, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0)) * 255


def test_handle_counts_taps_and_weighting():
    n, lq, m, levels, points, d = 2, 5, 2, 2, 3, 4
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])

    class Attention(torch.nn.Module):
        def forward(self, value, locations, weights):
            return multi_scale_deformable_attention(value, shapes, starts, locations, weights)

    inputs = (torch.rand(n, 30, m, d), torch.rand(n, lq, m, levels, points, 2), torch.rand(n, lq, m, levels, points))
    analysis = FlopCountAnalysis(Attention(), inputs).clear_op_handles().set_op_handle(**authors_op_handles())
    sampled = n * lq * m * levels * points * d
    assert analysis.by_operator() == {"ms_deform_attn_sampling": SAMPLING_TAPS * sampled,
                                      "ms_deform_attn_weighting": sampled}


@pytest.mark.parametrize("config_name, encoder_queries", [
    ("deformable_detr_r50.yaml", TOKENS),
    ("sparse_detr_r50_rho0.1.yaml", math.floor(0.1 * TOKENS) + 1),
])
def test_flop_count(tiny_model, config_name, encoder_queries):
    model = tiny_model(config_name, dtype=torch.float32)
    first, second = count_flops(model, image_batch()), count_flops(model, image_batch())
    assert first == second
    assert first.total > 0 and "conv" in first.by_operator and "linear" in first.by_operator
    assert "batch_norm" not in first.by_operator  # frozen batch norm: a multiply-add the authors did not count

    # the sampling-inclusive count adds N*Lq*M*L*P*D per deformable attention call: M*L*P*D = L*P*hidden
    per_query = 4 * 4 * TINY["HIDDEN_DIM"]
    weighting = per_query * (TINY["ENC_LAYERS"] * encoder_queries + TINY["DEC_LAYERS"] * TINY["NUM_QUERIES"])
    assert first.total_with_sampling - first.total == weighting
    assert first.by_operator["ms_deform_attn_sampling"] == SAMPLING_TAPS * weighting


def test_flop_count_keeps_every_head(tiny_model):
    """Every decoder layer's, the two-stage and the encoder auxiliary class heads count, as in the authors'
    model, whose outputs keep them all: the tracer drops what reaches no output."""
    model = tiny_model("sparse_detr_r50_rho0.1.yaml", dtype=torch.float32)
    count = count_flops(model, image_batch())
    kept = math.floor(0.1 * TOKENS) + 1
    tokens_through_heads = TINY["DEC_LAYERS"] * TINY["NUM_QUERIES"] + TOKENS + (TINY["ENC_LAYERS"] - 1) * kept
    assert count.by_module["transformer.class_embed"] == tokens_through_heads * TINY["HIDDEN_DIM"] * TINY["NUM_CLASSES"]
    assert count.by_module[""] == count.total_with_sampling


def test_speed_on_cpu(tiny_model):
    model = tiny_model("sparse_detr_r50_rho0.1.yaml", dtype=torch.float32)
    speed = measure_speed(model, image_batch()[0], batch_size=2, warmup=0, repeats=1)
    assert len(speed.seconds) == 1 and speed.seconds[0] > 0
    assert speed.fps > 0 and all(v > 0 for v in speed.fps_iqr)
    assert speed.peak_mem_mb is None or speed.peak_mem_mb >= 0


def test_scaling_study(benchmark, tmp_path):
    rows = scaling_study([CONFIG_DIR / "sparse_detr_r50_rho0.1.yaml"], TINY_OVERRIDES,
                         Timing(torch.device("cpu"), warmup=0, repeats=1), short_sides=[48])
    assert [(r["short_side"], r["image_size"]) for r in rows] == [(48, [48, 72])]
    assert 0 < rows[0]["encoder_ms"] < rows[0]["total_ms"]
    benchmark.plot_scaling(rows, tmp_path / "scaling.png", "CPU")
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "| sparse_detr_r50_rho0.1.yaml | 48 | 48x72 |" in scaling_table(rows, "CPU")


def test_json_output():
    command = [sys.executable, str(BENCHMARK_PATH), "--config-file", "sparse_detr_r50_rho0.1.yaml", "--json",
               "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH), "--repeats", "1", "--warmup", "0",
               "--threads", "1", *TINY_OVERRIDES]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert {"params_m", "gflops", "gflops_with_sampling", "fps", "b4fps", "peak_mem_mb", "device"} <= result.keys()
    assert result["device"] == "cpu" and result["num_classes"] == TINY["NUM_CLASSES"]
    assert result["gflops_with_sampling"] > result["gflops"] > 0
    assert result["fps"] > 0 and result["b4fps"] > 0 and result["params_m"] > 0


def test_compare_plain_reports_the_speed_up_and_the_shares_of_the_machines_rates(benchmark):
    """--compare-plain: the plain path's speed, the speed-up, the achieved rate (GFLOPs x FPS) against the peak the
    clock and units give and against the rate oneDNN's 3x3 convolution measured here; the table shows them."""
    from sparse_detr.benchmark.counts import convolution_gflops
    from sparse_detr.benchmark.tables import comparison_table
    timing = Timing(torch.device("cpu"), repeats=1, warmup=0)
    result = benchmark_config(CONFIG_DIR / "sparse_detr_r50_rho0.1.yaml", TINY_OVERRIDES, timing,
                              image_size=(HEIGHT, WIDTH), batch_sizes=(1,), compare_plain=True)
    assert result["speedup"] == result["fps"] / result["plain_fps"] and result["plain_fps"] > 0
    assert result["achieved_gflops_per_s"] == pytest.approx(result["gflops"] * result["fps"])
    if result["peak_gflops_per_s"] is not None:
        assert result["share_of_peak"] == pytest.approx(result["achieved_gflops_per_s"] / result["peak_gflops_per_s"])
    assert result["convolution_gflops_per_s"] > 0
    assert result["share_of_convolution_rate"] == pytest.approx(
        result["achieved_gflops_per_s"] / result["convolution_gflops_per_s"])
    row = comparison_table([result]).splitlines()[2]
    assert row.startswith("| sparse_detr_r50_rho0.1.yaml |") and f"{result['speedup']:.2f}x" in row
    assert row.endswith(f"| {result['convolution_gflops_per_s']:.0f} | {result['share_of_convolution_rate']:.0%} |")
    assert convolution_gflops(torch.float32, repeats=1) > 0
    assert convolution_gflops(torch.int8, repeats=1) > 0


def test_paper_parameter_count_leaves_out_the_encoder_auxiliary_heads(tiny_model):
    sparse = tiny_model("sparse_detr_r50_rho0.1.yaml")  # 2 decoder layers, the two-stage head, 1 auxiliary head
    heads = encoder_auxiliary_heads(sparse)
    assert heads == ["transformer.class_embed.3.", "transformer.bbox_embed.3."]
    auxiliary = sum(p.numel() for m in (sparse.transformer.class_embed[3], sparse.transformer.bbox_embed[3])
                    for p in m.parameters())
    assert trainable_parameters(sparse) - trainable_parameters(sparse, heads) == auxiliary > 0
    assert encoder_auxiliary_heads(tiny_model("deformable_detr_r50_bbr_two_stage.yaml")) == []


# ---- A/B ------------------------------------------------------------------------------------------------

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
TINY_DEMO = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
             "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.NUM_QUERIES", "10",
             "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "32"]


def test_take_turns_warms_each_side_up_then_interleaves_and_the_ratio_comes_from_the_medians():
    order, now = [], [0.0]
    durations = {"A": [9.0, 9.0, 1.0, 2.0, 4.0, 8.0], "B": [7.0, 7.0, 2.0, 2.0, 2.0, 2.0]}  # 2 warm-ups, 4 turns

    def run(side):
        order.append(side)
        now[0] += durations[side].pop(0)

    seconds = take_turns({"A": partial(run, "A"), "B": partial(run, "B")}, torch.device("cpu"), warmup=2, repeats=4,
                         clock=lambda: now[0])
    assert order == ["A", "A", "B", "B"] + ["A", "B"] * 4
    assert seconds == {"A": [1.0, 2.0, 4.0, 8.0], "B": [2.0, 2.0, 2.0, 2.0]}
    # medians 3 and 2: B / A = 2/3 (not the median of the per-turn ratios, 0.75); per turn 2, 1, 0.5, 0.25
    assert ab_ratio(seconds["A"], seconds["B"]) == Ratio(median_a=3.0, median_b=2.0, b_over_a=2 / 3,
                                                         per_turn_min=0.25, per_turn_max=2.0)
    with pytest.raises(ValueError, match="A/B turns come in pairs"):
        ab_ratio([1.0, 2.0], [1.0])


def test_ab_inference_sides_run_their_own_paths_on_the_same_images():
    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, text)
             for label, text in (("A", "TEST.PRECISION float32"), ("B", "TEST.FAST_INFERENCE False"))]
    assert [side.overrides for side in sides] == [["TEST.PRECISION", "float32"], ["TEST.FAST_INFERENCE", "False"]]
    runs = ab_runs(sides, "inference", (HEIGHT, WIDTH), batch_size=2, device=torch.device("cpu"))
    assert {label: run.path for label, run in runs.items()} == {"A": "fast, float32", "B": "plain"}
    with torch.no_grad():
        fast, plain = (runs[label].call() for label in "AB")
    # the same random weights and the same two images: the float32 fast path gives the plain path's detections
    assert len(fast) == len(plain) == 2
    for a, b in zip(fast, plain):
        a, b = a["instances"], b["instances"]
        assert a.image_size == b.image_size == (HEIGHT, WIDTH)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)


def test_an_ab_side_can_run_the_int8_backbone():
    """TEST.PRECISION int8: the side's path is calibrated on a random image of the test size (its timings do not
    depend on the ranges) and says so in its label; its detections stay near the float32 side's."""
    from sparse_detr.inference import FastInferenceModel
    from sparse_detr.quantization import Int8Conv

    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, text)
             for label, text in (("A", "TEST.PRECISION int8"), ("B", "TEST.PRECISION float32"))]
    runs = ab_runs(sides, "inference", (HEIGHT, WIDTH), batch_size=1, device=torch.device("cpu"))
    int8 = runs["A"].module
    assert isinstance(int8, FastInferenceModel) and int8.int8
    assert runs["A"].path == f"fast, int8 backbone and linear layers, {str(int8.dtype).split('.')[-1]}"
    assert any(isinstance(m, Int8Conv) for m in int8.modules())
    with torch.no_grad():
        a, b = (runs[label].call()[0]["instances"] for label in "AB")
    assert a.image_size == b.image_size == (HEIGHT, WIDTH) and len(a) == len(b)


def test_an_ab_side_can_be_the_authors_code_path_with_the_pytorch_attention():
    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, text)
             for label, text in (("A", "TEST.PRECISION float32"), ("B", "TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch"))]
    assert (sides[0].attention, sides[1].attention) == (None, "pytorch")
    assert sides[1].overrides == ["TEST.FAST_INFERENCE", "False", "MS_DEFORM_ATTN", "pytorch"]
    assert not sides[1].cfg.TEST.FAST_INFERENCE
    runs = ab_runs(sides, "inference", (HEIGHT, WIDTH), batch_size=1, device=torch.device("cpu"))
    assert {label: run.path for label, run in runs.items()} == {"A": "fast, float32", "B": "plain, pytorch attention"}
    seen = []
    original = ms_deform_attn._pytorch_forward
    with pytest.MonkeyPatch.context() as patch:  # count the PyTorch implementation's calls
        patch.setattr(ms_deform_attn, "_pytorch_forward",
                      lambda *args, **kwargs: seen.append(1) or original(*args, **kwargs))
        before = os.environ.get(ms_deform_attn.IMPLEMENTATION_VARIABLE)
        with torch.no_grad():
            fast, authors = (runs[label].call() for label in "AB")
        assert os.environ.get(ms_deform_attn.IMPLEMENTATION_VARIABLE) == before, "set around B's call only"
    assert len(seen) == 2, "B's encoder and decoder layers (one each) ran the PyTorch attention, A's none"
    a, b = fast[0]["instances"], authors[0]["instances"]
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="--ab side A 'MS_DEFORM_ATTN fast': MS_DEFORM_ATTN is one of auto, pytorch, "
                                         "compiled, got 'fast'"):
        build_side(DEMO_CONFIG, TINY_DEMO, "A", "MS_DEFORM_ATTN fast")
    # the side keys apart from the config overrides; MALLOC only for a side in a process of its own
    assert side_keys("B", "TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch MALLOC default", in_own_process=True) == (
        {"MS_DEFORM_ATTN": "pytorch", "MALLOC": "default"}, ["TEST.FAST_INFERENCE", "False"])


def test_cpu_peak_counts_the_units_of_the_cpu():
    """threads x MHz x multiply-adds a cycle: AVX-512 float32 32, AMX bf16 512, AVX512-BF16 64, AMX int8 1024,
    AVX512-VNNI int8 128, AVX2 16; AMD's Zen 4 (family 25) runs AVX-512 on 256-bit units, half those; no clock, or no
    unit for the dtype: None."""
    xeon = {"vendor": "GenuineIntel", "family": 6, "mhz": 2000.0, "amx_bf16": True, "avx512_bf16": True,
            "amx_int8": True, "avx512_vnni": True, "avx512f": True, "avx2_fma": True}
    zen4 = {"vendor": "AuthenticAMD", "family": 25, "mhz": 2600.0, "amx_bf16": False, "avx512_bf16": True,
            "amx_int8": False, "avx512_vnni": True, "avx512f": True, "avx2_fma": True}
    zen3 = {**zen4, "family": 25, "avx512_bf16": False, "avx512_vnni": False, "avx512f": False}
    assert cpu_peak_gflops(xeon, torch.float32, 2) == 2 * 2.0 * 32
    assert cpu_peak_gflops(xeon, torch.bfloat16, 2) == 2 * 2.0 * 512
    assert cpu_peak_gflops(zen4, torch.float32, 2) == 2 * 2.6 * 16
    assert cpu_peak_gflops(zen4, torch.bfloat16, 2) == 2 * 2.6 * 32
    assert cpu_peak_gflops(xeon, torch.int8, 2) == 2 * 2.0 * 1024
    assert cpu_peak_gflops(zen4, torch.int8, 2) == 2 * 2.6 * 64
    assert cpu_peak_gflops(zen3, torch.int8, 2) is None
    assert cpu_peak_gflops(zen3, torch.float32, 1) == 2.6 * 16 and cpu_peak_gflops(zen3, torch.bfloat16, 1) is None
    assert cpu_peak_gflops({**xeon, "mhz": None}, torch.float32, 2) is None
    here = cpu_description()
    assert {"vendor", "family"} <= set(here) and (here["family"] is None or isinstance(here["family"], int))


def test_an_ab_side_chooses_where_its_float32_products_run(monkeypatch):
    """FLOAT32_MATMUL mkl|onednn: each side's fast path is built with $SPARSE_DETR_FLOAT32_MATMUL set to it (its
    linear layers take oneDNN from PACKED_FLOAT32_MIN_ROWS rows on, or for every size), the variable is as it was
    afterwards, the path names it, the detections agree within float32 rounding; a bad value is named."""
    from sparse_detr.fusion import FLOAT32_MATMUL_ENV, PACKED_FLOAT32_MIN_ROWS, PackedLinear
    monkeypatch.setenv(FLOAT32_MATMUL_ENV, "auto")
    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, f"TEST.PRECISION float32 FLOAT32_MATMUL {library}")
             for label, library in (("A", "mkl"), ("B", "onednn"))]
    assert (sides[0].matmul, sides[1].matmul) == ("mkl", "onednn")
    runs = ab_runs(sides, "inference", (HEIGHT, WIDTH), batch_size=1, device=torch.device("cpu"))
    assert os.environ[FLOAT32_MATMUL_ENV] == "auto"
    assert {label: run.path for label, run in runs.items()} == {"A": "fast, float32, float32 products: mkl",
                                                                 "B": "fast, float32, float32 products: onednn"}
    for label, min_rows in (("A", PACKED_FLOAT32_MIN_ROWS), ("B", 0)):
        linears = [m for m in runs[label].module.modules() if isinstance(m, PackedLinear)]
        assert linears and all(m.float32_min_rows == min_rows for m in linears)
    with torch.no_grad():
        a, b = (runs[label].call()[0]["instances"] for label in "AB")
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--ab side A 'FLOAT32_MATMUL blas': FLOAT32_MATMUL is one of auto, mkl, "
                                         "onednn, got 'blas'"):
        build_side(DEMO_CONFIG, TINY_DEMO, "A", "FLOAT32_MATMUL blas")


def test_an_ab_side_chooses_its_winograd_tile(monkeypatch):
    """WINOGRAD_TILE 4|2: each side's fast ResNet-50 is built with $SPARSE_DETR_WINOGRAD_TILE set to it (F(4x4, 3x3)
    from 64 channels, F(2x2, 3x3) from 128), the variable is as it was afterwards, the path names it, the
    detections agree within float32 rounding; a bad value is named."""
    from sparse_detr.fusion import WINOGRAD_TILE_ENV, WinogradConv, winograd_available
    if not winograd_available():
        pytest.skip("sparse_detr._C is not built (make setup)")
    monkeypatch.delenv(WINOGRAD_TILE_ENV, raising=False)
    sides = [build_side(CONFIG_DIR / "sparse_detr_r50_rho0.3.yaml", TINY_OVERRIDES, label,
                        f"TEST.PRECISION float32 WINOGRAD_TILE {tile}") for label, tile in (("A", "4"), ("B", "2"))]
    runs = ab_runs(sides, "inference", (HEIGHT, WIDTH), batch_size=1, device=torch.device("cpu"))
    assert WINOGRAD_TILE_ENV not in os.environ
    assert {label: run.path for label, run in runs.items()} == {"A": "fast, float32, Winograd tile: 4",
                                                                 "B": "fast, float32, Winograd tile: 2"}
    for label, tile, count in (("A", 4, 13), ("B", 2, 10)):
        convs = [m for m in runs[label].module.modules() if isinstance(m, WinogradConv)]
        assert len(convs) == count and {m.tile for m in convs} == {tile}
    with torch.no_grad():
        a, b = (runs[label].call()[0]["instances"] for label in "AB")
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--ab side B 'WINOGRAD_TILE 6': WINOGRAD_TILE is one of 4, 2, got '6'"):
        build_side(DEMO_CONFIG, TINY_DEMO, "B", "WINOGRAD_TILE 6")


def test_ab_training_sides_train_alike_on_the_same_batch_with_the_same_seeds():
    """Two sides of one configuration (dropout on) taking turns: the same batch, initial weights and per-turn
    seeds give bitwise the same weights after each side's two iterations, and the iterations changed them."""
    common = [*TINY_DEMO, "MODEL.SPARSE_DETR.DROPOUT", "0.1"]
    sides = [build_side(DEMO_CONFIG, common, label, text)
             for label, text in (("A", ""), ("B", "TEST.FAST_INFERENCE False"))]  # B's key: inference only
    initial = {name: p.detach().clone() for name, p in sides[0].model.named_parameters()}
    runs = ab_runs(sides, "training", (HEIGHT, WIDTH), batch_size=2, device=torch.device("cpu"), seed=3)
    assert {label: run.path for label, run in runs.items()} == {"A": "training, float32", "B": "training, float32"}
    with EventStorage():
        for label in "ABAB":
            runs[label].call()
    trained = dict(sides[0].model.named_parameters())
    assert any(not torch.equal(trained[name], value) for name, value in initial.items())
    for name, value in sides[1].model.named_parameters():
        assert torch.equal(trained[name], value), name


def test_training_batch_is_fixed_by_its_seed():
    first, again = training_batch((HEIGHT, WIDTH), 2, num_classes=3, seed=5), training_batch((HEIGHT, WIDTH), 2, 3, 5)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, HEIGHT, WIDTH)
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        boxes = a["instances"].gt_boxes.tensor
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2:] <= torch.tensor([WIDTH, HEIGHT])).all()
        assert a["instances"].gt_classes.max() < 3
    assert not torch.equal(first[0]["image"], first[1]["image"])


def test_varying_training_batches_draw_new_sizes_each_turn_rounded_to_each_sides_multiple():
    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, text)
             for label, text in (("A", "INPUT.SIDE_MULTIPLE 16"), ("B", "INPUT.SIDE_MULTIPLE 0"))]
    cpu = torch.device("cpu")
    a, b = ([next(batches) for _ in range(4)]  # 3 turns, then the first again
            for batches in (training_batches(side, (HEIGHT, WIDTH), 2, 3, 7, "varying", 3, cpu) for side in sides))
    sizes_a, sizes_b = ([[tuple(item["image"].shape[1:]) for item in batch] for batch in turns] for turns in (a, b))
    assert sizes_a[3] == sizes_a[0] and sizes_b[3] == sizes_b[0], "the turns' batches come round again"
    assert len({tuple(turn) for turn in sizes_b[:3]}) == 3, "each turn its own sizes"
    for turn_a, turn_b in zip(sizes_a, sizes_b):
        for (ha, wa), (hb, wb) in zip(turn_a, turn_b):
            assert SIZE_SPREAD * HEIGHT - 1 <= hb <= HEIGHT and SIZE_SPREAD * WIDTH - 1 <= wb <= WIDTH
            assert (ha, wa) == (16 * int(hb / 16 + 0.5), 16 * int(wb / 16 + 0.5)), "A rounds B's draws to multiples of 16"
    for batch in a[:3]:
        for item in batch:
            boxes = item["instances"].gt_boxes.tensor
            assert item["instances"].image_size == tuple(item["image"].shape[1:])
            assert (boxes[:, 2:] <= torch.tensor(item["image"].shape[:0:-1])).all()
    assert turn_image_sizes((HEIGHT, WIDTH), 2, 7) == turn_image_sizes((HEIGHT, WIDTH), 2, 7)
    fixed = training_batches(sides[0], (HEIGHT, WIDTH), 2, 3, 7, "fixed", 3, cpu)
    assert next(fixed) is next(fixed) and next(fixed)[0]["image"].shape == (3, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="image sizes are one of"):
        ab_runs(sides, "training", (HEIGHT, WIDTH), 2, cpu, sizes="random")


def test_varying_inference_batches_give_both_sides_the_same_new_sizes_each_turn():
    """Inference with varying sizes: each turn a batch of its own (the training batches' sizes, rounded to each side's
    multiple, no boxes), the same images for both sides; each side's run takes the next batch at every call."""
    sides = [build_side(DEMO_CONFIG, TINY_DEMO, label, text)
             for label, text in (("A", "INPUT.SIDE_MULTIPLE 32"),
                                 ("B", "INPUT.SIDE_MULTIPLE 32 TEST.PRECISION float32"))]
    cpu = torch.device("cpu")
    size = (128, 192)  # 90-128 x 134-192 drawn, rounded to multiples of 32: several sizes
    a, b = ([next(batches) for _ in range(4)]
            for batches in (inference_batches(side, size, 2, 7, "varying", 3, cpu) for side in sides))
    trained = [[tuple(item["image"].shape[1:]) for item in batch]
               for batch in (next(training_batches(sides[0], size, 2, 3, 7, "varying", 3, cpu))
                             for _ in range(1))]
    sizes = [[tuple(item["image"].shape[1:]) for item in batch] for batch in a]
    assert sizes[0] == trained[0] and sizes[3] == sizes[0] and len({tuple(turn) for turn in sizes[:3]}) > 1
    for batch_a, batch_b in zip(a, b):
        for item_a, item_b in zip(batch_a, batch_b):
            assert torch.equal(item_a["image"], item_b["image"]) and "instances" not in item_a
            assert (item_a["height"], item_a["width"]) == tuple(item_a["image"].shape[1:])
            assert item_a["height"] % 32 == 0 and item_a["width"] % 32 == 0
    fixed = inference_batches(sides[0], size, 2, 7, "fixed", 3, cpu)
    assert next(fixed) is next(fixed) and next(fixed)[0]["image"].shape == (3, *size)
    runs = ab_runs(sides, "inference", size, 1, cpu, seed=7, sizes="varying", turns=3)
    seen = []
    with torch.no_grad():
        for _ in range(3):
            for label in "AB":
                seen.append((label, tuple(runs[label].call()[0]["instances"].image_size)))
    assert [size for label, size in seen if label == "A"] == [size for label, size in seen if label == "B"]
    assert len({size for _, size in seen}) > 1


def test_ab_training_with_varying_sizes_says_so(benchmark, capsys):
    argv = ["--config-file", str(DEMO_CONFIG), "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH),
            "--batch-sizes", "2", "--repeats", "2", "--warmup", "0", "--ab-step", "training", "--ab-sizes", "varying",
            "--ab", "INPUT.SIDE_MULTIPLE 32", "", "--json", *TINY_DEMO]
    assert benchmark.main(argv) == 0
    result = json.loads(capsys.readouterr().out)["ab"]
    assert result["sizes"] == "varying" and result["sides"]["A"]["path"] == "training, float32"
    assert [len(result["rows"][0]["seconds"][side]) for side in "AB"] == [2, 2]
    assert f"image sizes varying from {SIZE_SPREAD} x {HEIGHT}x{WIDTH} to {HEIGHT}x{WIDTH}, new each turn" in ab_table(result)


def test_ab_prints_both_sides_the_ratio_and_the_cpu(benchmark, capsys):
    argv = ["--config-file", str(DEMO_CONFIG), "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH),
            "--batch-sizes", "1", "--repeats", "2", "--warmup", "1",
            "--ab", "TEST.PRECISION float32", "TEST.FAST_INFERENCE False", "--json", *TINY_DEMO]
    assert benchmark.main(argv) == 0
    result = json.loads(capsys.readouterr().out)["ab"]
    assert result["step"] == "inference" and result["turns"] == 2 and result["warmup"] == 1
    assert result["sides"] == {"A": {"overrides": ["TEST.PRECISION", "float32"], "path": "fast, float32"},
                               "B": {"overrides": ["TEST.FAST_INFERENCE", "False"], "path": "plain"}}
    [row] = result["rows"]
    assert row["batch_size"] == 1 and [len(row["seconds"][side]) for side in "AB"] == [2, 2]
    assert row["b_over_a"] == pytest.approx(row["median_b"] / row["median_a"])
    assert result["cpu"]["model"] == cpu_description()["model"] and result["threads"] == 1
    text = ab_table(result)
    assert "* A: TEST.PRECISION float32 (fast, float32)" in text and "* B: TEST.FAST_INFERENCE False (plain)" in text
    assert f"| 1 | {1e3 * row['median_a']:.1f} | {1e3 * row['median_b']:.1f} | {row['b_over_a']:.2f}x |" in text
    assert f"native bf16: {'yes' if cpu_description()['native_bf16'] else 'no'}" in text


def test_ab_in_processes_gives_each_side_its_own_allocator_setting(benchmark, capsys):
    """The authors' code as it runs for its users (glibc's malloc as it is) against this project's fast path
    as train_net.py runs it (freed memory kept), each side in a process of its own."""
    argv = ["--config-file", str(DEMO_CONFIG), "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH),
            "--batch-sizes", "1", "--repeats", "2", "--warmup", "1", "--ab-processes",
            "--ab", "TEST.PRECISION float32", "TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch MALLOC default",
            "--json", *TINY_DEMO]
    assert benchmark.main(argv) == 0
    result = json.loads(capsys.readouterr().out)["ab"]
    assert result["processes"] and result["step"] == "inference" and result["turns"] == 2
    kept = "keep" if platform.libc_ver()[0] == "glibc" else "as it was"
    assert result["sides"] == {
        "A": {"overrides": ["TEST.PRECISION", "float32"], "path": "fast, float32", "malloc": kept},
        "B": {"overrides": ["TEST.FAST_INFERENCE", "False", "MS_DEFORM_ATTN", "pytorch", "MALLOC", "default"],
              "path": "plain, pytorch attention", "malloc": "as it was"}}
    [row] = result["rows"]
    assert [len(row["seconds"][side]) for side in "AB"] == [2, 2] and min(row["seconds"]["A"]) > 0
    assert row["b_over_a"] == pytest.approx(row["median_b"] / row["median_a"])
    text = ab_table(result)
    assert "interleaved, each side in its own process" in text
    assert f"* A: TEST.PRECISION float32 (fast, float32; malloc: {kept})" in text
    assert "(plain, pytorch attention; malloc: as it was)" in text


@pytest.mark.parametrize("ab, extra, message", [
    (["MALLOC default", ""], [], "error: --ab side A 'MALLOC default': MALLOC is a process's setting: give "
                                 "--ab-processes"),
    (["", "MALLOC jemalloc"], ["--ab-processes"], "error: --ab side B 'MALLOC jemalloc': MALLOC is one of keep, "
                                                  "default, got 'jemalloc'"),
    (["", ""], ["--ab-processes", "--ab-step", "training"], "error: --ab-processes times inference"),
    (["TEST.NOPE 1", ""], ["--ab-processes"], "error: --ab side A 'TEST.NOPE 1': command line: Non-existent key: "
                                              "TEST.NOPE"),
    (["TEST.NOPE 1", ""], [], "error: --ab side A 'TEST.NOPE 1': command line: Non-existent key: TEST.NOPE"),
    (["", "TEST.PRECISION"], [], "error: --ab side B 'TEST.PRECISION': give KEY VALUE pairs"),
    (["", "TEST.PRECISION float16"], [], "error: --ab side B 'TEST.PRECISION float16': TEST.PRECISION must be one of"),
    (["", ""], ["--scaling"], "error: --ab times one config's two sides: it does not go with --scaling"),
    (["", ""], ["--ab-step", "training", "--dtype", "bf16"], "error: --dtype is for inference"),
    (["", ""], ["--ab-sizes", "varying", "--ab-processes"], "error: --ab-sizes varying runs both sides in one process"),
])
def test_ab_bad_input_is_one_error_line(benchmark, capsys, ab, extra, message):
    argv = ["--config-file", str(DEMO_CONFIG), "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH),
            "--batch-sizes", "1", *extra, "--ab", *ab, *TINY_DEMO]
    assert benchmark.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
