// The decoder attention map (DAM) on the CPU in float32 (projects/SparseDETR/sparse_detr/dam.py):
//
//   sparse_detr_C::decoder_attention_map(spatial_shapes, level_start_index, sampling_locations, attention_weights)
//       -> dam
//
// spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64; sampling_locations (N, ..., L, P, 2) float32
// (x, y) in [0, 1]; attention_weights (N, ..., L, P) float32. dam (N, S), S = sum of H_l * W_l: every attention
// weight splatted bilinearly onto its level's grid at location * (W, H) (no half-pixel shift), the shares that fall
// outside the map dropped.
//
// It computes what dam.py's PyTorch version computes, element for element: the same float32 operations on each
// sample (pixel = location * size, its floor, the fraction, each corner's share as the product of the two axes'
// factors, then weight * share * inside), and each token's contributions summed in the order of the flattened
// (..., L, P, corner) samples, as scatter_add_ does on the CPU. A level's samples only reach its own tokens, so the
// (image, level) pairs run in parallel; the corners outside the map, which the PyTorch version adds to token 0 as
// zeros (or NaN, from a NaN or infinite location), are added there at the end (see splat_level).
// One pass over the samples instead of some 70 (the DAM at 800x1199, 300 queries and six layers: 41 ms on two threads
// of the 2-core Xeon).
//
// No vector loop: the sums must keep their order. No multiply-add is fused either (the pragmas below; x86-64's
// baseline has no FMA anyway): an FMA would round pixel - floor(pixel) differently from PyTorch's two operations.
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace sparse_detr {
namespace {

// One image's samples on one level (`groups` groups of levels x points locations and weights), summed into its
// map `dam` (S,) in their order. The corners that fall outside the map are not added to token 0 here but to the
// returned sum, which is +-0 or NaN (a contribution is the product of 0 and a weight and share): added to token 0
// later, it gives what adding each in turn gives, so the levels can run in parallel (their tokens are disjoint).
float splat_level(const float* locations, const float* weights, int64_t level, int64_t height, int64_t width,
                  int64_t start, int64_t groups, int64_t levels, int64_t points, float* dam) {
  constexpr float kLimit = 4.0e18f;  // beyond it a floor does not fit int64: far outside any map
  const float w_size = static_cast<float>(width), h_size = static_cast<float>(height);
  float outside = 0.0f;
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t point = 0; point < points; ++point) {
      const int64_t sample = (group * levels + level) * points + point;
      const float px = locations[2 * sample] * w_size, py = locations[2 * sample + 1] * h_size;
      const float lx = std::floor(px), ly = std::floor(py);
      const float fx = px - lx, fy = py - ly;
      const bool finite = std::fabs(lx) < kLimit && std::fabs(ly) < kLimit;  // false for NaN too
      const int64_t col0 = finite ? static_cast<int64_t>(lx) : -2, row0 = finite ? static_cast<int64_t>(ly) : -2;
      const float attention = weights[sample];
      for (int corner = 0; corner < 4; ++corner) {  // (dx, dy): (0, 0), (1, 0), (0, 1), (1, 1)
        const int dx = corner & 1, dy = corner >> 1;
        const int64_t col = col0 + dx, row = row0 + dy;
        const float share = (dx ? fx : 1.0f - fx) * (dy ? fy : 1.0f - fy);
        if (col >= 0 && col < width && row >= 0 && row < height) {
          dam[start + row * width + col] += attention * share * 1.0f;
        } else {
          outside += attention * share * 0.0f;
        }
      }
    }
  }
  return outside;
}

at::Tensor decoder_attention_map(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.scalar_type() == at::kLong,
              "decoder_attention_map: spatial_shapes must be (L, 2) int64, got ", spatial_shapes.sizes(), " ",
              spatial_shapes.scalar_type());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels &&
                  level_start_index.scalar_type() == at::kLong,
              "decoder_attention_map: level_start_index must be (L,) int64 with L = ", levels, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.scalar_type() == at::kFloat && attention_weights.scalar_type() == at::kFloat &&
                  sampling_locations.device().is_cpu() && attention_weights.device().is_cpu(),
              "decoder_attention_map: sampling_locations and attention_weights must be float32 CPU tensors");
  TORCH_CHECK(sampling_locations.dim() >= 4 && sampling_locations.size(-1) == 2 &&
                  sampling_locations.size(-3) == levels &&
                  attention_weights.sizes() == sampling_locations.sizes().slice(0, sampling_locations.dim() - 1),
              "decoder_attention_map: sampling_locations must be (N, ..., L, P, 2) and attention_weights (N, ..., L, "
              "P) with L = ", levels, ", got ", sampling_locations.sizes(), " and ", attention_weights.sizes());
  const at::Tensor shapes = spatial_shapes.cpu().contiguous(), starts = level_start_index.cpu().contiguous();
  const at::Tensor sizes = shapes.select(1, 0) * shapes.select(1, 1);
  TORCH_CHECK(levels == 0 || (starts.select(0, 0).item<int64_t>() == 0 &&
                              starts.slice(0, 1).equal(sizes.cumsum(0).slice(0, 0, levels - 1))),
              "decoder_attention_map: level_start_index must start each level where the previous one ends (0, then "
              "the running sum of H_l * W_l), got ", starts, " for spatial_shapes ", shapes);
  const int64_t total = sizes.sum().item<int64_t>();
  const int64_t batch = sampling_locations.size(0), points = sampling_locations.size(-2);
  at::Tensor dam = at::zeros({batch, total}, sampling_locations.options());
  if (batch == 0 || levels == 0 || points == 0 || total == 0) {
    return dam;
  }
  const at::Tensor locations = sampling_locations.contiguous(), weights = attention_weights.contiguous();
  const int64_t groups = weights.numel() / (batch * levels * points);
  const int64_t per_image = groups * levels * points;
  const int64_t* shape = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  std::vector<float> outside(batch * levels);
  at::parallel_for(0, batch * levels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / levels, level = item % levels;
      outside[item] = splat_level(locations.data_ptr<float>() + 2 * image * per_image,
                                  weights.data_ptr<float>() + image * per_image, level, shape[2 * level],
                                  shape[2 * level + 1], start[level], groups, levels, points,
                                  dam.data_ptr<float>() + image * total);
    }
  });
  float* map = dam.data_ptr<float>();
  for (int64_t item = 0; item < batch * levels; ++item) {
    map[item / levels * total] += outside[item];
  }
  return dam;
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) {
  m.def("decoder_attention_map(Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) { m.impl("decoder_attention_map", &sparse_detr::decoder_attention_map); }
