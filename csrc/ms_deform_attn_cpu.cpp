// CPU launcher of the multi-scale deformable attention bodies (ms_deform_attn_kernels.h): plain loops over
// the units under at::parallel_for, registered as the CPU kernels of sparse_detr_C::ms_deform_attn_forward
// and _backward.
//
// Forward: the rows (image, query, head) are split among the threads; a unit is 32, 16 or 8 channels of a row
// (the largest that divides the head dim; the compiler vectorises them whole), else one channel.
//
// Backward: a unit is one sampling point (its channels in groups of 32, 16 or 8, else one by one); the work is
// split by (image, level, group of heads), never inside one: the value rows of a level, image and head receive
// gradient only from that level's sampling points of that image and head, so each value row has exactly one
// writer, the accumulate() of the bodies is a plain add, and the result does not depend on how the work is split.
//
// The loops are compiled for three x86 instruction sets (any x86-64, AVX2 + FMA, AVX-512) and the one ATen
// reports for this machine runs (at::get_cpu_capability(): ATEN_CPU_CAPABILITY=default|avx2|avx512 picks
// another, as for PyTorch's own kernels).
#include <algorithm>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

// A parallel chunk gets at least this many (channel x corner) products: smaller work runs on one thread.
constexpr int64_t kMinProductsPerChunk = 1 << 16;

// Channels per unit: the largest of 32, 16 and 8 that divides the head dim (the compiler vectorises a unit's
// channels whole; a head dim of 64 is two units), else one.
int64_t channels_per_unit(int64_t channels) {
  for (const int64_t width : {32, 16, 8}) {
    if (channels % width == 0) {
      return width;
    }
  }
  return 1;
}

// rows are (image, query, head) triples, head fastest
template <int kChannels, typename scalar_t, typename index_t>
C10_ALWAYS_INLINE void forward_rows(const ForwardArgs<scalar_t, index_t>& args, int64_t begin, int64_t end) {
  const index_t heads = args.size.heads;
  const index_t queries = args.size.queries;
  index_t head = static_cast<index_t>(begin % heads);
  index_t query = static_cast<index_t>((begin / heads) % queries);
  index_t image = static_cast<index_t>(begin / (heads * queries));
  // a head of 4k groups (the fast path's decoder samples all 256 channels of a token) takes 4 at a time: each
  // point's interpolation is computed once for them (800x1199, two threads: 3.2-3.4 against 7.1-7.4 ms a layer)
  const bool by_fours = kChannels > 1 && args.size.channels % (4 * kChannels) == 0;
  for (int64_t row = begin; row < end; ++row) {
    if (by_fours) {
      for (index_t channel = 0; channel < args.size.channels; channel += 4 * kChannels) {
        forward_unit<kChannels, 1, 4>(args, image, query, head, channel);
      }
    } else {
      for (index_t channel = 0; channel < args.size.channels; channel += kChannels) {
        forward_unit<kChannels, 1>(args, image, query, head, channel);
      }
    }
    if (++head == heads) {
      head = 0;
      if (++query == queries) {
        query = 0;
        ++image;
      }
    }
  }
}

// tasks are (image, level, group of heads_per_task heads) triples, groups fastest
template <int kChannels, typename scalar_t, typename index_t>
C10_ALWAYS_INLINE void backward_tasks(const BackwardArgs<scalar_t, index_t>& args, int64_t heads_per_task,
                                      int64_t begin, int64_t end) {
  const Sizes<index_t>& size = args.size;
  const int64_t groups = (size.heads + heads_per_task - 1) / heads_per_task;
  for (int64_t task = begin; task < end; ++task) {
    const index_t first_head = static_cast<index_t>((task % groups) * heads_per_task);
    const index_t end_head = static_cast<index_t>(std::min<int64_t>(size.heads, first_head + heads_per_task));
    const index_t level = static_cast<index_t>((task / groups) % size.levels);
    const index_t image = static_cast<index_t>(task / (groups * size.levels));
    for (index_t query = 0; query < size.queries; ++query) {
      for (index_t head = first_head; head < end_head; ++head) {
        for (index_t point = 0; point < size.points; ++point) {
          backward_unit<kChannels, 1>(args, image, query, head, level, point);
        }
      }
    }
  }
}

// The loops above, compiled for one instruction set: the bodies inline into them and take its vectors.
#define MSDA_CPU_LOOPS(ISA, TARGET_ATTRIBUTE)                                                               \
  template <int kChannels, typename scalar_t, typename index_t>                                             \
  TARGET_ATTRIBUTE void forward_rows_##ISA(const ForwardArgs<scalar_t, index_t>& args, int64_t begin,       \
                                           int64_t end) {                                                   \
    forward_rows<kChannels>(args, begin, end);                                                              \
  }                                                                                                         \
  template <int kChannels, typename scalar_t, typename index_t>                                             \
  TARGET_ATTRIBUTE void backward_tasks_##ISA(const BackwardArgs<scalar_t, index_t>& args,                   \
                                             int64_t heads_per_task, int64_t begin, int64_t end) {          \
    backward_tasks<kChannels>(args, heads_per_task, begin, end);                                            \
  }

MSDA_CPU_LOOPS(default, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_X86_VARIANTS 1
MSDA_CPU_LOOPS(avx2, __attribute__((target("avx2,fma,f16c"))))
MSDA_CPU_LOOPS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))))
#endif
#undef MSDA_CPU_LOOPS

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? Isa::kAvx512 : capability == "AVX2" ? Isa::kAvx2 : Isa::kDefault;
  }();
  return isa;
}

template <typename scalar_t, typename index_t>
using ForwardLoop = void (*)(const ForwardArgs<scalar_t, index_t>&, int64_t, int64_t);
template <typename scalar_t, typename index_t>
using BackwardLoop = void (*)(const BackwardArgs<scalar_t, index_t>&, int64_t, int64_t, int64_t);

// The loop for this machine's instruction set; the scalar path (one channel per unit) gains nothing from wider
// vectors and is compiled once.
template <int kChannels, typename scalar_t, typename index_t>
ForwardLoop<scalar_t, index_t> forward_loop() {
#ifdef MSDA_X86_VARIANTS
  if constexpr (kChannels > 1) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return &forward_rows_avx512<kChannels, scalar_t, index_t>;
      case Isa::kAvx2:
        return &forward_rows_avx2<kChannels, scalar_t, index_t>;
      case Isa::kDefault:
        break;
    }
  }
#endif
  return &forward_rows_default<kChannels, scalar_t, index_t>;
}

template <int kChannels, typename scalar_t, typename index_t>
BackwardLoop<scalar_t, index_t> backward_loop() {
#ifdef MSDA_X86_VARIANTS
  if constexpr (kChannels > 1) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return &backward_tasks_avx512<kChannels, scalar_t, index_t>;
      case Isa::kAvx2:
        return &backward_tasks_avx2<kChannels, scalar_t, index_t>;
      case Isa::kDefault:
        break;
    }
  }
#endif
  return &backward_tasks_default<kChannels, scalar_t, index_t>;
}

template <typename scalar_t, typename index_t>
void run_forward(const Problem& problem, const ForwardArgs<scalar_t, index_t>& args) {
  const int64_t channels = channels_per_unit(problem.channels);
  const ForwardLoop<scalar_t, index_t> loop = channels == 32   ? forward_loop<32, scalar_t, index_t>()
                                              : channels == 16 ? forward_loop<16, scalar_t, index_t>()
                                              : channels == 8  ? forward_loop<8, scalar_t, index_t>()
                                                               : forward_loop<1, scalar_t, index_t>();
  const int64_t products_per_row = problem.levels * problem.points * 4 * problem.channels;
  const int64_t grain = std::max<int64_t>(1, kMinProductsPerChunk / std::max<int64_t>(1, products_per_row));
  at::parallel_for(0, problem.batch * problem.queries * problem.heads, grain,
                   [&](int64_t begin, int64_t end) { loop(args, begin, end); });
}

template <typename scalar_t, typename index_t>
void run_backward(const Problem& problem, const BackwardArgs<scalar_t, index_t>& args) {
  const int64_t channels = channels_per_unit(problem.channels);
  const BackwardLoop<scalar_t, index_t> loop = channels == 32   ? backward_loop<32, scalar_t, index_t>()
                                               : channels == 16 ? backward_loop<16, scalar_t, index_t>()
                                               : channels == 8  ? backward_loop<8, scalar_t, index_t>()
                                                                : backward_loop<1, scalar_t, index_t>();
  // All heads of a level in one task when that leaves enough tasks (4 per thread): the loop then walks every
  // head of neighbouring tokens together. One head's rows alone, one in every M * D values, would map onto an
  // M-th of the cache's sets (measured: the backward 25-35 % slower on the 2-core machine).
  const int64_t level_tasks = problem.batch * problem.levels;
  if (level_tasks == 0) {
    return;  // no sampling point: the gradients are zeros
  }
  const int64_t groups = std::min<int64_t>(problem.heads, (4 * at::get_num_threads() + level_tasks - 1) / level_tasks);
  const int64_t heads_per_task = (problem.heads + groups - 1) / groups;
  const int64_t tasks = level_tasks * ((problem.heads + heads_per_task - 1) / heads_per_task);
  const int64_t products_per_task = problem.queries * heads_per_task * problem.points * 4 * problem.channels;
  const int64_t grain = std::max<int64_t>(1, kMinProductsPerChunk / std::max<int64_t>(1, products_per_task));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { loop(args, heads_per_task, begin, end); });
}

// The bodies trust the level table; on the CPU it costs nothing to check that it stays inside value.
void check_levels(const Problem& problem, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  for (int64_t level = 0; level < problem.levels; ++level) {
    const int64_t height = shapes[2 * level], width = shapes[2 * level + 1], start = starts[level];
    TORCH_CHECK(height >= 0 && width >= 0 && start >= 0 && start + height * width <= problem.tokens, "level ", level,
                " (", height, " x ", width, " cells from token ", start, ") does not fit in the ", problem.tokens,
                " tokens of value");
  }
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                       bool force_int64_index) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels(problem, in.spatial_shapes, in.level_start_index);
  at::Tensor output = at::empty({problem.batch, problem.queries, problem.heads * problem.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    with_index_type(problem.fits_int32(), force_int64_index, [&](auto index_zero) {
      run_forward(problem, in.forward_args<scalar_t, decltype(index_zero)>(problem, output));
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool force_int64_index, bool value_grad) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(problem, grad_output_in, value);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels(problem, in.spatial_shapes, in.level_start_index);

  // The value gradient is summed in the accumulation type (a float32 buffer for half-precision values), and
  // only when asked for; every sampling point writes its location and weight gradients once.
  const at::TensorOptions acc_options = value.options().dtype(at::toOpMathType(value.scalar_type()));
  at::Tensor grad_value = value_grad ? at::zeros(value.sizes(), acc_options) : at::empty({0}, acc_options);
  at::Tensor grad_locations = at::empty(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::empty(attention_weights.sizes(), acc_options);
  if (sampling_locations.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu",
                                    [&] {
      with_index_type(problem.fits_int32(), force_int64_index, [&](auto index_zero) {
        run_backward(problem, in.backward_args<scalar_t, decltype(index_zero)>(problem, grad_output, grad_value,
                                                                               grad_locations, grad_weights));
      });
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) {
  m.impl("ms_deform_attn_forward", &sparse_detr::forward_cpu);
  m.impl("ms_deform_attn_backward", &sparse_detr::backward_cpu);
}
