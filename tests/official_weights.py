"""The authors'-format checkpoint of a conformance fixture, rebuilt from the fixture's description of it.

The fixture lists the official state dict's keys and shapes, the keys that alias another one (heads the
official model shares between modules) and a seed. Every tensor comes from its own generator, seeded by the
CRC-32 of its name (the aliased key's name for an alias) xor the seed, as float64 standard normals scaled by the
kind of tensor so that activations stay moderate; the Swin relative-position tables are the usual lookup index.
The weights are arbitrary, but the same key list always gives the same tensors: those the authors' code ran.
"""
import math
import zlib
from typing import Dict, Sequence

import torch

__all__ = ["official_state_dict"]


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ seed) & 0x7FFFFFFF)


def _relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index of each pair's relative offset in a (2 window - 1)² bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :] + window - 1
    dx = xs.flatten()[:, None] - xs.flatten()[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def _tensor(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    kind = name.rsplit(".", 1)[-1]
    if kind == "relative_position_index":
        return _relative_position_index(math.isqrt(shape[0]))
    if kind == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    generator = _generator(name, seed)
    normal = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "running_var":  # drawn after the normals, from the same generator
        return 1.0 + 0.2 * torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "running_mean":
        return 0.1 * normal
    if kind == "weight" and len(shape) == 1:  # a norm's scale
        return 1.0 + 0.1 * normal
    if kind == "bias":  # class heads start near the focal-loss prior, log(0.01 / 0.99) = -4.6
        return (-4.6 + 0.1 * normal) if "class_embed" in name else 0.05 * normal
    if len(shape) >= 2:  # fan-in scaling
        return normal / math.sqrt(math.prod(shape[1:]))
    return 0.5 * normal


def official_state_dict(fixture: Dict) -> Dict[str, torch.Tensor]:
    """The official-format state dict (float64) whose outputs the fixture holds."""
    aliases, seed = fixture["aliases"], fixture["recipe_seed"]
    shapes = fixture["state_dict_keys"]
    return {key: _tensor(aliases.get(key, key), tuple(shape), seed) for key, shape in shapes.items()}
