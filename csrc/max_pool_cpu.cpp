// The ResNet stem's 3x3 max pool of stride 2 and padding 1 on the CPU, channels-last, float32, bfloat16 or uint8
// (the int8 backbone's activations, ordered as the values they stand for), for the fast inference path
// (projects/SparseDETR/sparse_detr/fusion.py and quantization.py):
//
//   sparse_detr_C::max_pool3x3s2(input) -> output
//
// input (N, C, H, W) in channels-last memory; output (N, C, (H + 1) / 2, (W + 1) / 2), channels-last, the maximum
// of each window's elements inside the image (NaN if any of them is NaN), as F.max_pool2d(input, 3, 2, 1) gives.
// PyTorch's own CPU kernel also writes the int64 index of every maximum (twice the output's bytes in float32, four
// times in bf16) and took 29 ms for the stem's 64 x 400 x 600 map at 800x1199 (float32, two threads of the 2-core
// Xeon), where reading the map once takes about 6.
//
// A bf16 element is the upper half of a float32 with the same value: the windows are compared as float32 and the
// maximum written back as its upper half, exactly the element it came from.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

constexpr int64_t kLanes = 16;  // channels handled at once: one AVX-512 vector of float32

struct Shape {
  int64_t height, width, channels, out_height, out_width;
};

#include "scalar_floats.h"  // as_float
inline void put(float* to, float x) { *to = x; }
inline void put(uint8_t* to, float x) { *to = static_cast<uint8_t>(x); }  // x is one of the uint8 inputs
inline void put(uint16_t* to, float x) {
  uint32_t wide;
  std::memcpy(&wide, &x, sizeof(x));
  *to = static_cast<uint16_t>(wide >> 16);  // x is one of the bf16 inputs: its lower half is zero
}

#define ISA_VARIANT_LOOPS "max_pool_loops.h"
#include "isa_variants.h"

// Pools rows of T elements by the instruction set's loop, chosen once for the call.
template <typename T>
void pool(const at::Tensor& input, at::Tensor& output, const Shape& s, int64_t rows, int64_t grain) {
  const auto loop = ISA_VARIANT(pool_rows<T>);
  const T* from = static_cast<const T*>(input.data_ptr());
  T* to = static_cast<T*>(output.data_ptr());
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { loop(from, to, s, begin, end); });
}

at::Tensor max_pool3x3s2(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4 && input.device().is_cpu() &&
                  (input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16 ||
                   input.scalar_type() == at::kByte),
              "max_pool3x3s2: input must be a (N, C, H, W) float32, bfloat16 or uint8 CPU tensor, got ",
              input.sizes(), " ", input.scalar_type(), " on ", input.device());
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const Shape s{input.size(2), input.size(3), input.size(1), (input.size(2) + 1) / 2, (input.size(3) + 1) / 2};
  const int64_t batch = input.size(0);
  at::Tensor output = at::empty({batch, s.channels, s.out_height, s.out_width},
                                input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) {
    return output;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.out_width * s.channels));
  const int64_t rows = batch * s.out_height;
  if (input.scalar_type() == at::kFloat) {
    pool<float>(in, output, s, rows, grain);
  } else if (input.scalar_type() == at::kByte) {
    pool<uint8_t>(in, output, s, rows, grain);
  } else {
    pool<uint16_t>(in, output, s, rows, grain);  // bf16 as its bits
  }
  return output;
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) { m.def("max_pool3x3s2(Tensor input) -> Tensor"); }

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) { m.impl("max_pool3x3s2", &sparse_detr::max_pool3x3s2); }
