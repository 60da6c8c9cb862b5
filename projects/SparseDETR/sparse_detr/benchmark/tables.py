"""Markdown tables of :func:`~sparse_detr.benchmark.figures.benchmark_config`'s results."""
from typing import Dict, List

import torch

__all__ = ["comparison_table", "cpu_line", "markdown_table"]


def _fmt(value, spec: str = ".1f", iqr=None) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    return text if iqr is None else f"{text} ({format(iqr[0], spec)}–{format(iqr[1], spec)})"


def markdown_table(results: List[Dict]) -> str:
    """A row per config: parameters, GFLOPs, FPS, B4FPS (with their interquartile ranges), peak memory."""
    lines = ["| config | #params (M), paper | #params (M), all | GFLOPs | GFLOPs incl. sampling weighting "
             "| FPS (IQR) | B4FPS (IQR) | peak memory (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['params_paper_m']:.1f} | {r['params_m']:.1f} | {_fmt(r['gflops'])} "
                     f"| {_fmt(r['gflops_with_sampling'])} "
                     f"| {_fmt(r['fps'], '.3g', r['fps_iqr'])} | {_fmt(r['b4fps'], '.3g', r['b4fps_iqr'])} "
                     f"| {_fmt(r['peak_mem_mb'], '.0f')} |")
    first = next((r for r in results if "error" not in r), None)
    if first is not None:
        lines.append("")
        lines.append(f"Image {first['image_size'][0]}x{first['image_size'][1]}, {first['num_classes']} classes "
                     f"({first['class_columns']} class columns), "
                     f"{first['device_name']}, {first['dtype']}.")
    return "\n".join(lines)


def cpu_line(cpu: Dict) -> str:
    """:func:`sparse_detr.inference.cpu_description` and the thread count, in one sentence."""
    threads = torch.get_num_threads()
    return (f"{cpu['model']} at {cpu['mhz']} MHz, {threads} thread{'' if threads == 1 else 's'}; native bf16: "
            f"{'yes' if cpu['native_bf16'] else 'no'} (amx_bf16 {cpu['amx_bf16']}, avx512_bf16 {cpu['avx512_bf16']}).")


def comparison_table(results: List[Dict]) -> str:
    """--compare-plain: the fast path against the plain float32 path, and the gap to the machine's peak."""
    lines = ["| config | plain float32 (ms) | fast path (ms) | speed-up | fast path | GFLOPs | achieved GFLOP/s "
             "| peak GFLOP/s | share of peak | oneDNN 3x3 conv GFLOP/s | share of it |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r or r.get("speedup") is None:
            continue
        lines.append(f"| {r['config']} | {1e3 / r['plain_fps']:.0f} | {1e3 / r['fps']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['inference_path']} | {_fmt(r['gflops'])} | {_fmt(r['achieved_gflops_per_s'], '.0f')} "
                     f"| {_fmt(r['peak_gflops_per_s'], '.0f')} | {_fmt(r['share_of_peak'], '.0%')} "
                     f"| {_fmt(r.get('convolution_gflops_per_s'), '.0f')} "
                     f"| {_fmt(r.get('share_of_convolution_rate'), '.0%')} |")
    cpu = next((r["cpu"] for r in results if r.get("cpu")), None)
    if cpu is not None:
        lines += ["", cpu_line(cpu) + " Batch 1; GFLOPs as fvcore counts them (a multiply-add is one), of the "
                  "model (the fast path skips and saves some: its rate is per the model's FLOPs); the peak from the "
                  "clock and the units, the convolution's rate measured on oneDNN's 3x3 convolution in the fast "
                  "path's dtype."]
    return "\n".join(lines)
