// CUDA launcher of the multi-scale deformable attention bodies (ms_deform_attn_kernels.h): one grid-stride
// loop over the units per op, on the current stream, registered as the CUDA kernels of
// sparse_detr_C::ms_deform_attn_forward and _backward.
//
// A unit is one group of channels (16 bytes: 8 float16/bfloat16, 4 float32 or 2 float64 channels, read as
// one vector load) of one (image, query, head) in the forward and of one sampling point in the backward;
// neighbouring threads take neighbouring groups, so a warp reads whole value rows. A head dim whose rows
// are not a multiple of 16 bytes (or an unaligned tensor) takes the scalar path: one channel per unit.
// The backward adds into the value gradient (a float32 buffer for half-precision values) with atomicAdd,
// and, with several groups per point, into the location and weight gradients as well.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / kThreads) * 4;
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
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor output = at::empty({problem.batch, problem.queries, problem.heads * problem.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int channels =
        channels_per_unit<scalar_t>(problem.channels, {in.value.const_data_ptr(), output.const_data_ptr()});
    const int64_t units = problem.batch * problem.queries * problem.heads * (problem.channels / channels);
    with_index_type(problem.fits_int32(units), force_int64_index, [&](auto index_zero) {
      const auto args = in.forward_args<scalar_t, decltype(index_zero)>(problem, output);
      constexpr int kVector = kVectorBytes / sizeof(scalar_t);
      if (channels == kVector) {
        forward_kernel<kVector><<<blocks_for(units), kThreads, 0, stream>>>(args, units);
      } else {
        forward_kernel<1><<<blocks_for(units), kThreads, 0, stream>>>(args, units);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool force_int64_index) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(problem, grad_output_in, value);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);

  const at::TensorOptions acc_options = value.options().dtype(at::toOpMathType(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  // zeros: with several units per sampling point the location and weight gradients are atomic sums
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  if (grad_output.numel() > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda",
                                    [&] {
      const int channels =
          channels_per_unit<scalar_t>(problem.channels, {in.value.const_data_ptr(), grad_output.const_data_ptr()});
      const int64_t units = problem.batch * problem.queries * problem.heads * problem.levels * problem.points *
                            (problem.channels / channels);
      with_index_type(problem.fits_int32(units), force_int64_index, [&](auto index_zero) {
        const auto args = in.backward_args<scalar_t, decltype(index_zero)>(problem, grad_output, grad_value,
                                                                           grad_locations, grad_weights);
        constexpr int kVector = kVectorBytes / sizeof(scalar_t);
        if (channels == kVector) {
          backward_kernel<kVector><<<blocks_for(units), kThreads, 0, stream>>>(args, units);
        } else {
          backward_kernel<1><<<blocks_for(units), kThreads, 0, stream>>>(args, units);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_IMPL(sparse_detr_C, CUDA, m) {
  m.impl("ms_deform_attn_forward", &sparse_detr::forward_cuda);
  m.impl("ms_deform_attn_backward", &sparse_detr::backward_cuda);
}
