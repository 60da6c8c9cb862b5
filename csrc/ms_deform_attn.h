// Host-side pieces shared by the CPU and CUDA launchers: argument checks, problem sizes, the index type.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

#include "ms_deform_attn_kernels.h"

// The op library: sparse_detr_C, or the test-only emulation's own (csrc/emulation/), which registers the CUDA
// launcher compiled for the host under another name so that both load into one process.
#ifndef MSDA_LIBRARY
#define MSDA_LIBRARY sparse_detr_C
#endif

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

// The op's inputs, contiguous (a tensor that already is stays as it is), and the bodies' argument structs over
// them: the CPU and CUDA launchers differ only in how they run the units.
struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;

  template <typename scalar_t, typename index_t>
  ForwardArgs<scalar_t, index_t> forward_args(const Problem& problem, at::Tensor& output) const {
    using acc_t = acc_type<scalar_t>;
    return {value.const_data_ptr<scalar_t>(),           spatial_shapes.const_data_ptr<int64_t>(),
            level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<acc_t>(),
            attention_weights.const_data_ptr<acc_t>(),  output.mutable_data_ptr<scalar_t>(),
            problem.sizes<index_t>()};
  }

  template <typename scalar_t, typename index_t>
  BackwardArgs<scalar_t, index_t> backward_args(const Problem& problem, const at::Tensor& grad_output,
                                                at::Tensor& grad_value, at::Tensor& grad_locations,
                                                at::Tensor& grad_weights) const {
    using acc_t = acc_type<scalar_t>;
    return {grad_output.const_data_ptr<scalar_t>(),     value.const_data_ptr<scalar_t>(),
            spatial_shapes.const_data_ptr<int64_t>(),    level_start_index.const_data_ptr<int64_t>(),
            sampling_locations.const_data_ptr<acc_t>(),  attention_weights.const_data_ptr<acc_t>(),
            grad_value.numel() > 0 ? grad_value.mutable_data_ptr<acc_t>() : nullptr,  // none: not asked for
            grad_locations.mutable_data_ptr<acc_t>(),
            grad_weights.mutable_data_ptr<acc_t>(),      problem.sizes<index_t>()};
  }
};

// launch(int32_t{0}) where 32-bit offsets serve (and the 64-bit path is not forced), else launch(int64_t{0}).
template <typename Launch>
void with_index_type(bool int32_fits, bool force_int64_index, Launch&& launch) {
  if (int32_fits && !force_int64_index) {
    launch(int32_t{0});
  } else {
    launch(int64_t{0});
  }
}

// Checks shapes, dtypes and devices (the Python wrapper gives clearer messages first; these guard direct
// calls of the op) and returns the sizes. Sampling locations and attention weights must be in the
// accumulation type of the values: float32 for float16, bfloat16 and float32 values, float64 for float64.
Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

Inputs contiguous_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights);

// The backward's grad_output must be shaped, typed and placed like the forward's output.
void check_grad_output(const Problem& problem, const at::Tensor& grad_output, const at::Tensor& value);

}  // namespace sparse_detr
