"""The benchmark tool: FLOP counting handles, the timing path, the scaling study and the ``--json`` output.

Tiny models (conftest's TINY transformer on the config's ResNet-50) on 64x96 images keep this fast. The
level sizes of a 64x96 image are 8x12, 4x6, 2x3 and 1x2: 128 tokens, of which rho = 0.1 keeps
floor(12.8) + 1 = 13.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from sparse_detr.flops import SAMPLING_TAPS, authors_op_handles, count_flops
from sparse_detr.layers import multi_scale_deformable_attention

from conftest import REPO_ROOT, TINY, load_script

BENCHMARK_PATH = REPO_ROOT / "projects" / "SparseDETR" / "benchmark.py"
HEIGHT, WIDTH = 64, 96
LEVEL_SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2)]
TOKENS = sum(h * w for h, w in LEVEL_SHAPES)


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


def test_speed_on_cpu(benchmark, tiny_model):
    model = tiny_model("sparse_detr_r50_rho0.1.yaml", dtype=torch.float32)
    speed = benchmark.measure_speed(model, image_batch()[0], batch_size=2, warmup=0, repeats=1)
    assert len(speed.seconds) == 1 and speed.seconds[0] > 0
    assert speed.fps > 0 and all(v > 0 for v in speed.fps_iqr)
    assert speed.peak_mem_mb is None or speed.peak_mem_mb >= 0


def test_scaling_study(benchmark, tmp_path):
    overrides = [f"MODEL.SPARSE_DETR.{key} {value}" for key, value in TINY.items()]
    args = benchmark.build_parser().parse_args(
        ["--scaling", "--device", "cpu", "--scaling-sizes", "48", "--scaling-repeats", "1", "--scaling-warmup", "0",
         "--config-file", "sparse_detr_r50_rho0.1.yaml"] + " ".join(overrides).split())
    rows = benchmark.scaling_study([benchmark.resolve_config_file(c) for c in args.config_file], args)
    assert [(r["short_side"], r["image_size"]) for r in rows] == [(48, [48, 72])]
    assert 0 < rows[0]["encoder_ms"] < rows[0]["total_ms"]
    benchmark.plot_scaling(rows, tmp_path / "scaling.png", "CPU")
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "| sparse_detr_r50_rho0.1.yaml | 48 | 48x72 |" in benchmark.scaling_table(rows, "CPU")


def test_json_output():
    overrides = [item for key, value in TINY.items() for item in (f"MODEL.SPARSE_DETR.{key}", str(value))]
    command = [sys.executable, str(BENCHMARK_PATH), "--config-file", "sparse_detr_r50_rho0.1.yaml", "--json",
               "--device", "cpu", "--image-size", str(HEIGHT), str(WIDTH), "--repeats", "1", "--warmup", "0",
               "--threads", "1", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert {"params_m", "gflops", "gflops_with_sampling", "fps", "b4fps", "peak_mem_mb", "device"} <= result.keys()
    assert result["device"] == "cpu" and result["num_classes"] == TINY["NUM_CLASSES"]
    assert result["gflops_with_sampling"] > result["gflops"] > 0
    assert result["fps"] > 0 and result["b4fps"] > 0 and result["params_m"] > 0


def test_paper_parameter_count_leaves_out_the_encoder_auxiliary_heads(benchmark, tiny_model):
    sparse = tiny_model("sparse_detr_r50_rho0.1.yaml")  # 2 decoder layers, the two-stage head, 1 auxiliary head
    heads = benchmark.encoder_auxiliary_heads(sparse)
    assert heads == ["transformer.class_embed.3.", "transformer.bbox_embed.3."]
    auxiliary = sum(p.numel() for m in (sparse.transformer.class_embed[3], sparse.transformer.bbox_embed[3])
                    for p in m.parameters())
    assert benchmark.trainable_parameters(sparse) - benchmark.trainable_parameters(sparse, heads) == auxiliary > 0
    assert benchmark.encoder_auxiliary_heads(tiny_model("deformable_detr_r50_bbr_two_stage.yaml")) == []
