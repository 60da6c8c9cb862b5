// A 3x3 convolution (stride 1, padding 1) in float32 on the CPU by Winograd's minimal filtering F(2x2, 3x3),
// for the fast inference path's ResNet blocks (projects/SparseDETR/sparse_detr/fusion.py):
//
//   sparse_detr_C::winograd_conv3x3(input, transformed_weight, bias, relu) -> output
//
// input (N, C, H, W) float32 in channels-last memory; transformed_weight (16, C, K) = G w G^T of the
// (K, C, 3, 3) weight for each of the 16 positions of a 4x4 tile (computed once, in Python, in float64);
// bias (K,). The output (N, K, H, W), channels-last, is relu?(conv(input, w) + bias).
//
// Each 2x2 block of outputs reads a 4x4 block of inputs; in the transformed domain the convolution becomes
// 16 independent matrix products (tiles x C) @ (C x K), 16 multiplications for 4 outputs where the direct
// convolution takes 36: 2.25x fewer multiply-adds. The transforms are additions only:
//
//   V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   (d: the 4x4 input block, zero outside)
//   Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]                         (M: the 4x4 block of products)
//
// F(2x2, 3x3) rounds within a few times the direct convolution's float32 error (its transforms add at most
// three terms of coefficient 1); the larger tiles (F(4x4, 3x3): 4x fewer multiply-adds) round 20-40x worse,
// which the fast path's float32 bound (scores within 1e-5 of the plain model) does not allow.
//
// The transforms (winograd_loops.h) run over tiles under at::parallel_for, 16 channels at a time in one vector of
// this machine's instruction set (the max pool's scheme, see max_pool_cpu.cpp); the products are one at::bmm.
#include <algorithm>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

constexpr int64_t kBlock = 16;  // channels a transform handles at once: one AVX-512 vector of float32
constexpr int64_t kTileGrain = 16;

struct Geometry {
  int64_t batch, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return batch * tiles_h * tiles_w; }
};

#define ISA_VARIANT_LOOPS "winograd_loops.h"
#include "isa_variants.h"

using InputLoop = void (*)(const float*, float*, const Geometry&, int64_t, int64_t, int64_t);
using OutputLoop = void (*)(const float*, const float*, float*, const Geometry&, int64_t, bool, int64_t, int64_t);

// The variant of ATen's CPU capability (ATEN_CPU_CAPABILITY=default|avx2|avx512 picks another).
std::pair<InputLoop, OutputLoop> loops() {
#ifdef SPARSE_DETR_X86_VARIANTS
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return {&avx512::input_tiles, &avx512::output_tiles};
  }
  if (capability == "AVX2") {
    return {&avx2::input_tiles, &avx2::output_tiles};
  }
#endif
  return {&generic::input_tiles, &generic::output_tiles};
}

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& transformed_weight, const at::Tensor& bias,
                            bool relu) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "winograd_conv3x3: input must be a (N, C, H, W) float32 CPU tensor, got ", input.sizes(), " ",
              input.scalar_type(), " on ", input.device());
  const int64_t channels = input.size(1);
  TORCH_CHECK(transformed_weight.dim() == 3 && transformed_weight.size(0) == 16 &&
                  transformed_weight.size(1) == channels && transformed_weight.scalar_type() == at::kFloat,
              "winograd_conv3x3: transformed_weight must be (16, C, K) float32 with C = ", channels, ", got ",
              transformed_weight.sizes(), " ", transformed_weight.scalar_type());
  const int64_t out_channels = transformed_weight.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_channels && bias.scalar_type() == at::kFloat,
              "winograd_conv3x3: bias must be (K,) float32 with K = ", out_channels, ", got ", bias.sizes());
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g{input.size(0), input.size(2), input.size(3), (input.size(2) + 1) / 2, (input.size(3) + 1) / 2};
  at::Tensor output = at::empty({g.batch, out_channels, g.height, g.width},
                                input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) {
    return output;
  }
  const auto [input_loop, output_loop] = loops();
  at::Tensor v = at::empty({16, g.tiles(), channels}, input.options());
  at::parallel_for(0, g.tiles(), kTileGrain, [&](int64_t begin, int64_t end) {
    input_loop(in.data_ptr<float>(), v.data_ptr<float>(), g, channels, begin, end);
  });
  const at::Tensor m = at::bmm(v, transformed_weight.contiguous());
  const at::Tensor b = bias.contiguous();
  at::parallel_for(0, g.tiles(), kTileGrain, [&](int64_t begin, int64_t end) {
    output_loop(m.data_ptr<float>(), b.data_ptr<float>(), output.data_ptr<float>(), g, out_channels, relu, begin,
                end);
  });
  return output;
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) {
  m.def("winograd_conv3x3(Tensor input, Tensor transformed_weight, Tensor bias, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) { m.impl("winograd_conv3x3", &sparse_detr::winograd_conv3x3); }
