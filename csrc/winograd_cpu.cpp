// A 3x3 convolution (stride 1, padding 1) in float32 on the CPU by Winograd's minimal filtering F(2x2, 3x3) or
// F(4x4, 3x3), for the fast inference path's ResNet blocks (projects/SparseDETR/sparse_detr/fusion.py):
//
//   sparse_detr_C::winograd_conv3x3(input, transformed_weight, bias, relu) -> output
//
// input (N, C, H, W) float32 in channels-last memory; transformed_weight (P, C, K) = G w G^T of the (K, C, 3, 3)
// weight for each of the P positions of a tile (computed once, in Python, in float64): P = 16 (4x4 tiles) for
// F(2x2, 3x3), 36 (6x6 tiles) for F(4x4, 3x3); bias (K,). The output (N, K, H, W), channels-last, is
// relu?(conv(input, w) + bias).
//
// Each M x M block of outputs (M = 2 or 4) reads an (M + 2) x (M + 2) block of inputs; in the transformed domain
// the convolution becomes P independent matrix products (tiles x C) @ (C x K): F(2x2, 3x3) takes 16 multiplications
// for 4 outputs, F(4x4, 3x3) 36 for 16, where the direct convolution takes 9 an output (2.25x and 4x fewer
// multiply-adds). The transforms are additions and multiplications by powers of two:
//
//   F(2x2, 3x3) (the points 0, 1, -1 and infinity):
//   V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   (d: the 4x4 input block, zero outside)
//   Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]                         (M: the 4x4 block of products)
//
//   F(4x4, 3x3) (the points 0, 1, -1, 2, -2 and infinity; G's rows carry the fractions):
//   B^T = [4 0 -5 0 1 0; 0 4 4 -1 -1 0; 0 -4 4 1 -1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
//
// Accuracy: F(2x2, 3x3) rounds within a few times the direct convolution's float32 error (its transforms add at
// most three terms of coefficient 1); one F(4x4, 3x3) convolution alone rounds 20-40x worse than the direct one
// (its coefficients reach 5 and 8), but through ResNet-50 (whose residual sums and 1x1 convolutions carry most of
// each feature) the fast path's features end as near float64 as with oneDNN's direct convolutions (within 1.5x,
// tests/test_winograd.py; 1.2x F(2x2, 3x3)'s distance).
//
// The transforms (winograd_loops.h) run over tiles under at::parallel_for, 16 channels at a time in one vector of
// this machine's instruction set (the max pool's scheme, see max_pool_cpu.cpp). winograd_conv3x3 takes the products
// as one at::bmm (MKL's batched sgemm). The two transforms are also ops of their own, for products computed
// elsewhere (sparse_detr/fusion.py: oneDNN's grouped 1x1 convolution, faster than MKL on CPUs other than Intel's):
//
//   sparse_detr_C::winograd_input_tiles(input, tile=2) -> V                      (tiles, P, C), contiguous
//   sparse_detr_C::winograd_output_tiles(M, bias, relu, size, tile=2) -> output  M (tiles, P, K), K contiguous;
//                                                                                 size (N, H, W) of the input
//
// where `tile` is M (2 or 4), P = (M + 2)^2 and tiles = N * ceil(H / M) * ceil(W / M), in the order (image, tile
// row, tile column).
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

constexpr int64_t kBlock = 16;  // channels a transform handles at once: one AVX-512 vector of float32
constexpr int64_t kTileGrain = 16;

struct Geometry {
  int64_t batch, height, width, tile, tiles_h, tiles_w;  // tile: the outputs of a tile along each side (M)
  int64_t tiles() const { return batch * tiles_h * tiles_w; }
  int64_t positions() const { return (tile + 2) * (tile + 2); }
};

Geometry geometry_of(int64_t batch, int64_t height, int64_t width, int64_t tile, const char* op) {
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ", tile);
  return {batch, height, width, tile, (height + tile - 1) / tile, (width + tile - 1) / tile};
}

// Where V[p, tile, c] (or M[p, tile, k]) lies: p * position + tile * tile + c from the start.
struct Layout {
  int64_t position, tile;
};

#define ISA_VARIANT_LOOPS "winograd_loops.h"
#include "isa_variants.h"

using InputLoop = void (*)(const float*, float*, const Geometry&, const Layout&, int64_t, int64_t, int64_t);
using OutputLoop = void (*)(const float*, const float*, float*, const Geometry&, const Layout&, int64_t, bool, int64_t,
                            int64_t);

// The loops of a tile size in the variant of ATen's CPU capability (ISA_VARIANT).
std::pair<InputLoop, OutputLoop> loops(int64_t tile) {
  return tile == 4 ? std::make_pair(ISA_VARIANT(input_tiles<4>), ISA_VARIANT(output_tiles<4>))
                   : std::make_pair(ISA_VARIANT(input_tiles<2>), ISA_VARIANT(output_tiles<2>));
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kFloat && input.device().is_cpu(), op,
              ": input must be a (N, C, H, W) float32 CPU tensor, got ", input.sizes(), " ", input.scalar_type(),
              " on ", input.device());
}

void check_bias(const at::Tensor& bias, int64_t out_channels, const char* op) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_channels && bias.scalar_type() == at::kFloat, op,
              ": bias must be (K,) float32 with K = ", out_channels, ", got ", bias.sizes(), " ", bias.scalar_type());
}

// V = B^T d B of every tile of the channels-last `input`, into `v` laid out as `layout` says.
void transform_input(const at::Tensor& input, const Geometry& g, float* v, const Layout& layout) {
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const InputLoop input_loop = loops(g.tile).first;
  at::parallel_for(0, g.tiles(), kTileGrain, [&](int64_t begin, int64_t end) {
    input_loop(in.data_ptr<float>(), v, g, layout, input.size(1), begin, end);
  });
}

// The (N, K, H, W) output of the input `g` describes, channels-last, uninitialised.
at::Tensor empty_output(const Geometry& g, int64_t out_channels, const at::TensorOptions& options) {
  return at::empty({g.batch, out_channels, g.height, g.width}, options.memory_format(at::MemoryFormat::ChannelsLast));
}

// relu?(A^T M A + bias) of every tile, from `m` laid out as `layout` says, as a channels-last (N, K, H, W) tensor.
at::Tensor transform_output(const float* m, const Layout& layout, const at::Tensor& bias, bool relu,
                            const Geometry& g, const at::TensorOptions& options) {
  const int64_t out_channels = bias.size(0);
  at::Tensor output = empty_output(g, out_channels, options);
  const at::Tensor b = bias.contiguous();
  const OutputLoop output_loop = loops(g.tile).second;
  at::parallel_for(0, g.tiles(), kTileGrain, [&](int64_t begin, int64_t end) {
    output_loop(m, b.data_ptr<float>(), output.data_ptr<float>(), g, layout, out_channels, relu, begin, end);
  });
  return output;
}

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& transformed_weight, const at::Tensor& bias,
                            bool relu) {
  check_input(input, "winograd_conv3x3");
  const int64_t channels = input.size(1);
  const int64_t positions = transformed_weight.dim() == 3 ? transformed_weight.size(0) : 0;
  TORCH_CHECK(transformed_weight.dim() == 3 && (positions == 16 || positions == 36) &&
                  transformed_weight.size(1) == channels && transformed_weight.scalar_type() == at::kFloat,
              "winograd_conv3x3: transformed_weight must be (16, C, K) (F(2x2, 3x3)) or (36, C, K) (F(4x4, 3x3)) ",
              "float32 with C = ", channels, ", got ", transformed_weight.sizes(), " ",
              transformed_weight.scalar_type());
  const int64_t out_channels = transformed_weight.size(2);
  check_bias(bias, out_channels, "winograd_conv3x3");
  const Geometry g =
      geometry_of(input.size(0), input.size(2), input.size(3), positions == 16 ? 2 : 4, "winograd_conv3x3");
  if (g.tiles() == 0) {
    return empty_output(g, out_channels, input.options());
  }
  // position-major (P, tiles, C): the P products are one batched matrix product
  at::Tensor v = at::empty({positions, g.tiles(), channels}, input.options());
  transform_input(input, g, v.data_ptr<float>(), Layout{g.tiles() * channels, channels});
  const at::Tensor m = at::bmm(v, transformed_weight.contiguous());
  return transform_output(m.data_ptr<float>(), Layout{g.tiles() * out_channels, out_channels}, bias, relu, g,
                          input.options());
}

at::Tensor winograd_input_tiles(const at::Tensor& input, int64_t tile) {
  check_input(input, "winograd_input_tiles");
  const Geometry g = geometry_of(input.size(0), input.size(2), input.size(3), tile, "winograd_input_tiles");
  const int64_t channels = input.size(1);
  at::Tensor v = at::empty({g.tiles(), g.positions(), channels}, input.options());
  if (v.numel() > 0) {
    transform_input(input, g, v.data_ptr<float>(), Layout{channels, g.positions() * channels});
  }
  return v;
}

at::Tensor winograd_output_tiles(const at::Tensor& products, const at::Tensor& bias, bool relu, at::IntArrayRef size,
                                 int64_t tile) {
  TORCH_CHECK(size.size() == 3 && size[0] >= 0 && size[1] >= 0 && size[2] >= 0,
              "winograd_output_tiles: size must be the input's (N, H, W), got ", size);
  const Geometry g = geometry_of(size[0], size[1], size[2], tile, "winograd_output_tiles");
  TORCH_CHECK(products.dim() == 3 && products.size(0) == g.tiles() && products.size(1) == g.positions() &&
                  products.scalar_type() == at::kFloat && products.device().is_cpu() &&
                  (products.stride(2) == 1 || products.size(2) <= 1),
              "winograd_output_tiles: products must be a (tiles, ", g.positions(), ", K) float32 CPU tensor with K ",
              "contiguous and tiles = ", g.tiles(), " for an input of size ", size, " and tile ", tile, ", got ",
              products.sizes(), " strides ", products.strides(), " ", products.scalar_type(), " on ",
              products.device());
  check_bias(bias, products.size(2), "winograd_output_tiles");
  if (g.tiles() == 0 || products.size(2) == 0) {
    return empty_output(g, products.size(2), products.options());
  }
  return transform_output(products.data_ptr<float>(), Layout{products.stride(1), products.stride(0)}, bias, relu, g,
                          products.options());
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) {
  m.def("winograd_conv3x3(Tensor input, Tensor transformed_weight, Tensor bias, bool relu) -> Tensor");
  m.def("winograd_input_tiles(Tensor input, int tile=2) -> Tensor");
  m.def("winograd_output_tiles(Tensor products, Tensor bias, bool relu, int[] size, int tile=2) -> Tensor");
}

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) {
  m.impl("winograd_conv3x3", &sparse_detr::winograd_conv3x3);
  m.impl("winograd_input_tiles", &sparse_detr::winograd_input_tiles);
  m.impl("winograd_output_tiles", &sparse_detr::winograd_output_tiles);
}
