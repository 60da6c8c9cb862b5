#!/usr/bin/env python
"""Time the multi-scale deformable attention op: the compiled kernel against the PyTorch implementation.

Shapes are those of Sparse DETR on COCO-sized images: 4 levels (100x150, 50x75, 25x38, 13x19 = 19947 tokens),
8 heads of 32 channels, 4 points per level, batch 2 and 4. Encoder queries are rho x tokens (rho = 0.1 and 1.0, the
sparse and the dense encoder), decoder queries are the 300 object queries.

For every case, batch and dtype both implementations run on the same inputs, their timed runs interleaved (so
that a busy spell of a shared machine slows both alike), and the table gives the median of ``--repeats`` runs after
``--warmup`` untimed ones, for the forward alone and for forward + backward (gradients of value, locations and
weights); the compiled kernel's speed-up over the PyTorch implementation; the bytes that must move (every input
read once, every output written once; half-precision values move 2 bytes, locations and weights 4) and the
bandwidth the compiled kernel achieves with them, also as a share of the bandwidth of a large copy measured at
start; and the largest difference between the two outputs.

    python projects/SparseDETR/tools/benchmark_ms_deform_attn.py --device cpu --dtype float32 --threads 1 --clock cpu
    python projects/SparseDETR/tools/benchmark_ms_deform_attn.py --device cuda          # every dtype (GPU check)

On the CPU, ``--threads 1 --clock cpu`` times by the process's CPU time instead of the elapsed time: with one
thread that is the time the run would take on an idle machine, the best one can do on a machine shared with
other work. ``--grid-sample`` adds the obvious baseline, one ``F.grid_sample`` per level.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_detr.benchmark.timing import CLOCKS, take_turns
from sparse_detr.layers import multi_scale_deformable_attention, use_implementation

LEVEL_SHAPES = [(100, 150), (50, 75), (25, 38), (13, 19)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4
TOKENS = sum(h * w for h, w in LEVEL_SHAPES)
CASES = {"encoder_rho0.1": (int(0.1 * TOKENS), True), "encoder_rho1.0": (TOKENS, True), "decoder": (300, False)}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMPLEMENTATIONS = ("pytorch", "compiled")


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


def make_inputs(batch, num_queries, encoder, device, dtype, seed=0):
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
    num_levels = len(LEVEL_SHAPES)
    value = torch.randn(batch, TOKENS, HEADS, HEAD_DIM, generator=generator)
    if encoder:
        centres = token_centres()
        tokens = torch.stack([torch.randperm(TOKENS, generator=generator)[:num_queries]
                              if num_queries < TOKENS else torch.arange(TOKENS) for _ in range(batch)])
        reference = centres[tokens]  # (N, Lq, 2)
    else:
        reference = torch.rand(batch, num_queries, 2, generator=generator)
    angles = torch.arange(HEADS) * (2 * math.pi / HEADS)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    steps = directions.view(HEADS, 1, 1, 2) * torch.arange(1, POINTS + 1).view(1, 1, POINTS, 1)
    offsets = steps + torch.randn(batch, num_queries, HEADS, num_levels, POINTS, 2, generator=generator)
    level_sizes = spatial_shapes.flip(-1).view(num_levels, 1, 2)  # (W, H)
    locations = reference.view(batch, num_queries, 1, 1, 1, 2) + offsets / level_sizes
    logits = torch.randn(batch, num_queries, HEADS, num_levels * POINTS, generator=generator)
    weights = logits.softmax(-1).view(batch, num_queries, HEADS, num_levels, POINTS)
    location_dtype = torch.promote_types(dtype, torch.float32)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, location_dtype), weights.to(device, location_dtype))


def bytes_to_move(batch, num_queries, dtype):
    """(forward, forward + backward) bytes: every input read once, every output written once."""
    value_size = torch.finfo(dtype).bits // 8
    location_size = torch.finfo(torch.promote_types(dtype, torch.float32)).bits // 8
    slots = batch * num_queries * HEADS * len(LEVEL_SHAPES) * POINTS
    values = batch * TOKENS * HEADS * HEAD_DIM * value_size
    outputs = batch * num_queries * HEADS * HEAD_DIM * value_size
    locations_and_weights = slots * 3 * location_size
    forward = values + locations_and_weights + outputs
    backward = outputs + values + locations_and_weights + values + locations_and_weights  # grad_out in, grads out
    return forward, forward + backward


def time_interleaved(functions, device, warmup, repeats, clock):
    """Median milliseconds of each function, their runs taking turns."""
    times = take_turns(functions, device, warmup, repeats, clock=clock)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device, clock, megabytes=512):
    """GB/s of a large copy (bytes read plus bytes written), the memory bandwidth a kernel can hope for."""
    source = torch.ones(megabytes << 18, device=device)  # float32: megabytes MiB
    target = torch.empty_like(source)
    milliseconds = time_interleaved({"copy": lambda: target.copy_(source)}, device, 1, 5, clock)["copy"]
    return 2 * source.numel() * 4 / milliseconds / 1e6


def benchmark_case(case, batch, dtype, device, args, clock):
    num_queries, encoder = CASES[case]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(batch, num_queries, encoder, device,
                                                                               dtype)
    shapes_list, starts_list = spatial_shapes.tolist(), level_start_index.tolist()
    grad_output = torch.randn(batch, num_queries, HEADS * HEAD_DIM, device=device).to(dtype)
    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]

    def forward(name, v, loc, w):
        if name == "grid_sample":
            return grid_sample_ms_deform_attn(v, shapes_list, starts_list, loc, w)
        with use_implementation(name):
            return multi_scale_deformable_attention(v, spatial_shapes, level_start_index, loc, w)

    def forward_backward(name):
        with use_implementation("pytorch" if name == "grid_sample" else name):  # the backward runs under it too
            torch.autograd.grad(forward(name, *leaves), leaves, grad_output)

    names = IMPLEMENTATIONS + (("grid_sample",) if args.grid_sample else ())
    with torch.no_grad():
        outputs = {name: forward(name, value, locations, weights).float() for name in names}
        forward_ms = time_interleaved({name: (lambda name=name: forward(name, value, locations, weights))
                                       for name in names}, device, args.warmup, args.repeats, clock)
    both_ms = time_interleaved({name: (lambda name=name: forward_backward(name)) for name in names}, device,
                               args.warmup, args.repeats, clock)
    forward_bytes, both_bytes = bytes_to_move(batch, num_queries, dtype)
    return {"case": case, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "queries": num_queries,
            "forward_ms": forward_ms, "forward_backward_ms": both_ms, "forward_bytes": forward_bytes,
            "forward_backward_bytes": both_bytes,
            "max_abs_difference": (outputs["compiled"] - outputs["pytorch"]).abs().max().item()}


def table_row(row, copy_gbps):
    fwd, both = row["forward_ms"], row["forward_backward_ms"]
    fwd_gbps = row["forward_bytes"] / fwd["compiled"] / 1e6
    both_gbps = row["forward_backward_bytes"] / both["compiled"] / 1e6
    cells = [row["case"], str(row["batch"]), row["dtype"], str(row["queries"]),
             f"{fwd['pytorch']:.2f}", f"{fwd['compiled']:.2f}", f"**{fwd['pytorch'] / fwd['compiled']:.2f}x**",
             f"{both['pytorch']:.2f}", f"{both['compiled']:.2f}", f"**{both['pytorch'] / both['compiled']:.2f}x**",
             f"{row['forward_bytes'] / 1e6:.0f}", f"{fwd_gbps:.1f} ({fwd_gbps / copy_gbps:.0%})",
             f"{row['forward_backward_bytes'] / 1e6:.0f}", f"{both_gbps:.1f} ({both_gbps / copy_gbps:.0%})",
             f"{row['max_abs_difference']:.1e}"]
    if "grid_sample" in fwd:
        cells += [f"{fwd['grid_sample']:.2f}", f"{both['grid_sample']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="cpu: the process's CPU time (CPU with --threads 1 only)")
    parser.add_argument("--grid-sample", action="store_true", help="also time one F.grid_sample per level")
    parser.add_argument("--json", type=Path, help="also write the measurements to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    clock = CLOCKS[args.clock]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    copy_gbps = copy_bandwidth(device, clock)
    print(f"torch {torch.__version__} | {where} | {args.clock} clock | levels {LEVEL_SHAPES}, {HEADS} heads x "
          f"{HEAD_DIM} ch, {POINTS} points | median of {args.repeats} after {args.warmup} warm-up | "
          f"copy bandwidth {copy_gbps:.1f} GB/s")
    header = ["case", "batch", "dtype", "queries", "PyTorch fwd ms", "compiled fwd ms", "speed-up fwd",
              "PyTorch f+b ms", "compiled f+b ms", "speed-up f+b", "fwd MB", "compiled fwd GB/s (of copy)",
              "f+b MB", "compiled f+b GB/s (of copy)", "max abs diff"]
    if args.grid_sample:
        header += ["grid_sample fwd ms", "grid_sample f+b ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for dtype_name in args.dtype:
        for case in args.cases:
            for batch in args.batch:
                row = benchmark_case(case, batch, DTYPES[dtype_name], device, args, clock)
                rows.append(row)
                print(table_row(row, copy_gbps), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "copy_gbps": copy_gbps, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
