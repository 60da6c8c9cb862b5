// CUDA launcher of the multi-scale deformable attention bodies (ms_deform_attn_kernels.h): one grid-stride
// loop over the units per op, on the current stream, registered as the CUDA kernels of
// sparse_detr_C::ms_deform_attn_forward and _backward.
//
// A forward unit is one group of channels (16 bytes: 8 float16/bfloat16, 4 float32 or 2 float64 channels, read
// as one vector load) of one (image, query, head); neighbouring threads take neighbouring groups, so a warp
// reads whole value rows. A backward unit is one sampling point, its channels read in such groups; it reduces
// its location and attention-weight gradients itself and writes them once, and adds into the value gradient
// (a float32 buffer for half-precision values) with atomicAdd. A head dim whose rows are not a multiple of 16
// bytes (or an unaligned value, output or grad_output) takes the scalar path: one channel at a time.
//
// The same file is compiled for the host by the test-only emulation build (csrc/emulation/, MSDA_EMULATE_CUDA),
// which runs every line below except the CUDA runtime calls of the next block: its launch runs every block and
// thread of the grid, in a shuffled order, on the CPU.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef MSDA_EMULATE_CUDA
#include "emulation/cuda_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// The CUDA runtime calls, the only lines the emulation replaces.
#define MSDA_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#define MSDA_CUDA_DISPATCH_KEY CUDA
namespace sparse_detr {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// Memory every unit writes before anything reads it.
inline at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
}  // namespace sparse_detr
#endif

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <int kChannels, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs<scalar_t, index_t> args, int64_t units) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    forward_body<kChannels, kChannels>(args, static_cast<index_t>(unit));
  }
}

template <int kChannels, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs<scalar_t, index_t> args, int64_t units) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units; unit += stride) {
    backward_body<kChannels, kChannels>(args, static_cast<index_t>(unit));
  }
}

int64_t blocks_for(int64_t units) {
  // enough blocks to fill every SM several times over; the grid-stride loop covers the rest
  const int64_t resident = multiprocessor_count() * (2048 / kThreads) * 4;
  return std::max<int64_t>(1, std::min<int64_t>((units + kThreads - 1) / kThreads, resident));
}

bool aligned(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % kVectorBytes == 0; }

// Channels per unit: one 16-byte vector when every row of every tensor read or written in vectors allows it.
template <typename scalar_t>
int channels_per_unit(int64_t channels, std::initializer_list<const void*> pointers) {
  constexpr int kVector = kVectorBytes / sizeof(scalar_t);
  const bool vectors = channels % kVector == 0 &&
                       std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return aligned(p); });
  return vectors ? kVector : 1;
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                        bool force_int64_index) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const DeviceGuard device_guard(value.device());
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor output =
      uninitialized({problem.batch, problem.queries, problem.heads * problem.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int channels =
        channels_per_unit<scalar_t>(problem.channels, {in.value.const_data_ptr(), output.const_data_ptr()});
    const int64_t units = problem.batch * problem.queries * problem.heads * (problem.channels / channels);
    with_index_type(problem.fits_int32(units), force_int64_index, [&](auto index_zero) {
      const auto args = in.forward_args<scalar_t, decltype(index_zero)>(problem, output);
      constexpr int kVector = kVectorBytes / sizeof(scalar_t);
      if (channels == kVector) {
        MSDA_LAUNCH(forward_kernel<kVector>, blocks_for(units), kThreads, stream, args, units);
      } else {
        MSDA_LAUNCH(forward_kernel<1>, blocks_for(units), kThreads, stream, args, units);
      }
      check_launch();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool force_int64_index, bool value_grad) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(problem, grad_output_in, value);
  const DeviceGuard device_guard(value.device());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);

  // The value gradient is a sum of atomic adds in whatever order the threads reach them: it differs from run to
  // run in its last bits. It is summed in the accumulation type, and only when asked for.
  const at::TensorOptions acc_options = value.options().dtype(at::toOpMathType(value.scalar_type()));
  at::Tensor grad_value = at::empty({0}, acc_options);
  if (value_grad) {
    at::globalContext().alertNotDeterministic("ms_deform_attn_backward (the value gradient, CUDA)");
    grad_value = at::zeros(value.sizes(), acc_options);
  }
  // every sampling point writes its location and weight gradients once
  at::Tensor grad_locations = uninitialized(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = uninitialized(attention_weights.sizes(), acc_options);
  if (sampling_locations.numel() > 0) {
    const auto stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda",
                                    [&] {
      const int channels =
          channels_per_unit<scalar_t>(problem.channels, {in.value.const_data_ptr(), grad_output.const_data_ptr()});
      const int64_t units = problem.batch * problem.queries * problem.heads * problem.levels * problem.points;
      with_index_type(problem.fits_int32(units), force_int64_index, [&](auto index_zero) {
        const auto args = in.backward_args<scalar_t, decltype(index_zero)>(problem, grad_output, grad_value,
                                                                           grad_locations, grad_weights);
        constexpr int kVector = kVectorBytes / sizeof(scalar_t);
        if (channels == kVector) {
          MSDA_LAUNCH(backward_kernel<kVector>, blocks_for(units), kThreads, stream, args, units);
        } else {
          MSDA_LAUNCH(backward_kernel<1>, blocks_for(units), kThreads, stream, args, units);
        }
        check_launch();
      });
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, MSDA_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn_forward", &sparse_detr::forward_cuda);
  m.impl("ms_deform_attn_backward", &sparse_detr::backward_cuda);
}
