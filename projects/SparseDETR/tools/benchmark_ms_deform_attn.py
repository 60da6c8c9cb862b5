#!/usr/bin/env python
"""Time the multi-scale deformable attention op against a grid_sample-per-level baseline.

Shapes are those of Sparse DETR on a COCO-sized batch: 2 images, 4 levels (100x150, 50x75, 25x38, 13x19
= 19947 tokens), 8 heads of 32 channels, 4 points per level. Encoder queries are rho x tokens
(rho = 0.1 and 1.0, the sparse and the dense encoder), decoder queries are the 300 object queries.
Each row reports the median of ``--repeats`` timed runs after ``--warmup`` untimed ones, for the
forward alone and for forward + backward (gradients of value, locations and weights), and the
largest difference between the two implementations' outputs.

    python projects/SparseDETR/tools/benchmark_ms_deform_attn.py --device cpu --dtype float32 --repeats 5
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_detr.layers import multi_scale_deformable_attention

LEVEL_SHAPES = [(100, 150), (50, 75), (25, 38), (13, 19)]
BATCH, HEADS, HEAD_DIM, POINTS = 2, 8, 32, 4
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def grid_sample_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The obvious baseline: one ``F.grid_sample`` per level over every head, then the weighted sum.

    Same arguments and result as :func:`multi_scale_deformable_attention`. ``spatial_shapes`` and
    ``level_start_index`` are passed as Python lists of ints here, so no host sync is timed.
    """
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample's grid is in [-1, 1]; with align_corners=False, -1 and 1 are the outer pixel edges
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).flatten(0, 1).to(value.dtype)  # (N*M, Lq, L, P, 2)
    sampled = []
    for level, ((height, width), start) in enumerate(zip(spatial_shapes, level_start_index)):
        level_value = value[:, start:start + height * width]  # (N, H*W, M, D)
        level_value = level_value.permute(0, 2, 3, 1).reshape(n * m, d, height, width)
        sampled.append(F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, num_queries, num_levels * num_points)
    out = (sampled * weights.to(value.dtype)).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, num_queries).transpose(1, 2)


def token_centres():
    """(S, 2) (x, y) centre of every token of the flattened levels, in [0, 1]."""
    centres = []
    for height, width in LEVEL_SHAPES:
        y, x = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
        centres.append(torch.stack([x, y], -1).view(-1, 2))
    return torch.cat(centres)


def make_inputs(num_queries, encoder, device, dtype, seed=0):
    """Inputs as the model makes them: every head samples a few cells around the query's reference point.

    Encoder queries are tokens (all of them in order for rho = 1, a random subset in score order
    otherwise) with their own centre as reference point; decoder reference points are anywhere.
    Offsets follow the initialisation (point p at p + 1 cells along the head's direction) plus
    unit noise, at every level; some locations fall outside the map.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_tokens, num_levels = int(areas.sum()), len(LEVEL_SHAPES)
    value = torch.randn(BATCH, num_tokens, HEADS, HEAD_DIM, generator=generator)
    if encoder:
        centres = token_centres()
        tokens = torch.stack([torch.randperm(num_tokens, generator=generator)[:num_queries]
                              if num_queries < num_tokens else torch.arange(num_tokens) for _ in range(BATCH)])
        reference = centres[tokens]  # (N, Lq, 2)
    else:
        reference = torch.rand(BATCH, num_queries, 2, generator=generator)
    angles = torch.arange(HEADS) * (2 * math.pi / HEADS)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    steps = directions.view(HEADS, 1, 1, 2) * torch.arange(1, POINTS + 1).view(1, 1, POINTS, 1)
    offsets = steps + torch.randn(BATCH, num_queries, HEADS, num_levels, POINTS, 2, generator=generator)
    level_sizes = spatial_shapes.flip(-1).view(num_levels, 1, 2)  # (W, H)
    locations = reference.view(BATCH, num_queries, 1, 1, 1, 2) + offsets / level_sizes
    logits = torch.randn(BATCH, num_queries, HEADS, num_levels * POINTS, generator=generator)
    weights = logits.softmax(-1).view(BATCH, num_queries, HEADS, num_levels, POINTS)
    location_dtype = torch.promote_types(dtype, torch.float32)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, location_dtype), weights.to(device, location_dtype))


def time_call(fn, device, warmup, repeats):
    """Median wall time of ``fn()`` in milliseconds."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def benchmark_case(num_queries, encoder, device, dtype, warmup, repeats):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(num_queries, encoder, device, dtype)
    shapes_list, starts_list = spatial_shapes.tolist(), level_start_index.tolist()
    implementations = {
        "ours": lambda v, loc, w: multi_scale_deformable_attention(v, spatial_shapes, level_start_index, loc, w),
        "grid_sample": lambda v, loc, w: grid_sample_ms_deform_attn(v, shapes_list, starts_list, loc, w),
    }
    grad_output = torch.randn(BATCH, num_queries, HEADS * HEAD_DIM, device=device).to(dtype)
    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]

    results, outputs = {}, {}
    for name, op in implementations.items():
        with torch.no_grad():
            outputs[name] = op(value, locations, weights).float()
            forward = time_call(lambda: op(value, locations, weights), device, warmup, repeats)

        def forward_backward():
            torch.autograd.grad(op(*leaves), leaves, grad_output)

        results[name] = (forward, time_call(forward_backward, device, warmup, repeats))
    difference = (outputs["ours"] - outputs["grid_sample"]).abs().max().item()
    return results, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    tokens = sum(h * w for h, w in LEVEL_SHAPES)
    cases = [("encoder rho=0.1", int(0.1 * tokens), True), ("encoder rho=1.0", tokens, True), ("decoder", 300, False)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | {where} | {args.dtype} | batch {BATCH}, levels {LEVEL_SHAPES}, "
          f"{HEADS} heads x {HEAD_DIM} ch, {POINTS} points | median of {args.repeats} after {args.warmup} warm-up")
    header = (f"{'case':<16} {'queries':>7} | {'ours fwd':>9} {'ours f+b':>9} | {'grid fwd':>9} {'grid f+b':>9}"
              f" | {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for label, num_queries, encoder in cases:
        results, difference = benchmark_case(num_queries, encoder, device, dtype, args.warmup, args.repeats)
        (ours_fwd, ours_fb), (grid_fwd, grid_fb) = results["ours"], results["grid_sample"]
        print(f"{label:<16} {num_queries:>7} | {ours_fwd:>7.1f}ms {ours_fb:>7.1f}ms | {grid_fwd:>7.1f}ms "
              f"{grid_fb:>7.1f}ms | {difference:>10.2e}")


if __name__ == "__main__":
    main()
