// Host-side pieces shared by the CPU and CUDA launchers: argument checks, problem sizes, the index type.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

#include "ms_deform_attn_kernels.h"

namespace sparse_detr {

struct Problem {
  int64_t batch, tokens, queries, heads, channels, levels, points;

  // Every flat offset the bodies form is below one of these element counts (or the number of units of a
  // launch that indexes them).
  bool fits_int32(int64_t units = 0) const {
    const int64_t limit = std::numeric_limits<int32_t>::max();
    return batch * tokens * heads * channels <= limit && batch * queries * heads * channels <= limit &&
           batch * queries * heads * levels * points * 2 <= limit && units <= limit;
  }

  template <typename index_t>
  Sizes<index_t> sizes() const {
    return {static_cast<index_t>(batch),    static_cast<index_t>(tokens),   static_cast<index_t>(queries),
            static_cast<index_t>(heads),    static_cast<index_t>(channels), static_cast<index_t>(levels),
            static_cast<index_t>(points)};
  }
};

// Checks shapes, dtypes and devices (the Python wrapper gives clearer messages first; these guard direct
// calls of the op) and returns the sizes. Sampling locations and attention weights must be in the
// accumulation type of the values: float32 for float16, bfloat16 and float32 values, float64 for float64.
Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

}  // namespace sparse_detr
