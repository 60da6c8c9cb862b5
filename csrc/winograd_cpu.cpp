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
// The transforms run over tiles under at::parallel_for, their channel loops compiled for this machine's
// instruction set (as the attention kernels', see ms_deform_attn_cpu.cpp); the products are one at::bmm.
#include <algorithm>
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

// V[p, tile, c] for the 16 positions p of each tile's 4x4 input block (rows 2 ty - 1 ... 2 ty + 2).
C10_ALWAYS_INLINE void input_tiles(const float* input, float* v, const Geometry& g, int64_t channels, int64_t begin,
                                   int64_t end) {
  const int64_t tiles = g.tiles();
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * 2 - 1;
    const int64_t x0 = tile % g.tiles_w * 2 - 1;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - c0);
      float d[4][4][kBlock];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          const int64_t y = y0 + i, x = x0 + j;
          if (y >= 0 && y < g.height && x >= 0 && x < g.width) {
            const float* from = input + ((image * g.height + y) * g.width + x) * channels + c0;
            for (int64_t l = 0; l < kBlock; ++l) {
              d[i][j][l] = l < width ? from[l] : 0.0f;
            }
          } else {
            for (int64_t l = 0; l < kBlock; ++l) {
              d[i][j][l] = 0.0f;
            }
          }
        }
      }
      float t[4][4][kBlock];  // B^T d: combinations of rows
      for (int j = 0; j < 4; ++j) {
        for (int64_t l = 0; l < kBlock; ++l) {
          t[0][j][l] = d[0][j][l] - d[2][j][l];
          t[1][j][l] = d[1][j][l] + d[2][j][l];
          t[2][j][l] = d[2][j][l] - d[1][j][l];
          t[3][j][l] = d[1][j][l] - d[3][j][l];
        }
      }
      for (int i = 0; i < 4; ++i) {  // (B^T d) B: combinations of columns
        float row[4][kBlock];
        for (int64_t l = 0; l < kBlock; ++l) {
          row[0][l] = t[i][0][l] - t[i][2][l];
          row[1][l] = t[i][1][l] + t[i][2][l];
          row[2][l] = t[i][2][l] - t[i][1][l];
          row[3][l] = t[i][1][l] - t[i][3][l];
        }
        for (int j = 0; j < 4; ++j) {
          float* to = v + ((i * 4 + j) * tiles + tile) * channels + c0;
          for (int64_t l = 0; l < width; ++l) {
            to[l] = row[j][l];
          }
        }
      }
    }
  }
}

// The 2x2 outputs of each tile from its 16 products M[p, tile, k]: A^T M A + bias, then the ReLU.
C10_ALWAYS_INLINE void output_tiles(const float* m, const float* bias, float* output, const Geometry& g,
                                    int64_t channels, bool relu, int64_t begin, int64_t end) {
  const int64_t tiles = g.tiles();
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * 2;
    const int64_t x0 = tile % g.tiles_w * 2;
    for (int64_t k0 = 0; k0 < channels; k0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - k0);
      float s[2][4][kBlock];  // A^T M: combinations of rows
      for (int j = 0; j < 4; ++j) {
        const float* p0 = m + ((0 * 4 + j) * tiles + tile) * channels + k0;
        const float* p1 = m + ((1 * 4 + j) * tiles + tile) * channels + k0;
        const float* p2 = m + ((2 * 4 + j) * tiles + tile) * channels + k0;
        const float* p3 = m + ((3 * 4 + j) * tiles + tile) * channels + k0;
        for (int64_t l = 0; l < kBlock; ++l) {
          const float m0 = l < width ? p0[l] : 0.0f, m1 = l < width ? p1[l] : 0.0f;
          const float m2 = l < width ? p2[l] : 0.0f, m3 = l < width ? p3[l] : 0.0f;
          s[0][j][l] = m0 + m1 + m2;
          s[1][j][l] = m1 - m2 - m3;
        }
      }
      for (int i = 0; i < 2; ++i) {
        const int64_t y = y0 + i;
        if (y >= g.height) {
          continue;
        }
        float out[2][kBlock];  // (A^T M) A: combinations of columns
        for (int64_t l = 0; l < kBlock; ++l) {
          const float b = l < width ? bias[k0 + l] : 0.0f;
          out[0][l] = s[i][0][l] + s[i][1][l] + s[i][2][l] + b;
          out[1][l] = s[i][1][l] - s[i][2][l] - s[i][3][l] + b;
          if (relu) {
            out[0][l] = std::max(out[0][l], 0.0f);
            out[1][l] = std::max(out[1][l], 0.0f);
          }
        }
        for (int j = 0; j < 2; ++j) {
          const int64_t x = x0 + j;
          if (x >= g.width) {
            continue;
          }
          float* to = output + ((image * g.height + y) * g.width + x) * channels + k0;
          for (int64_t l = 0; l < width; ++l) {
            to[l] = out[j][l];
          }
        }
      }
    }
  }
}

// The transforms, compiled for one instruction set each (the loops above inline into them).
#define WINOGRAD_CPU_LOOPS(ISA, TARGET_ATTRIBUTE)                                                            \
  TARGET_ATTRIBUTE void input_tiles_##ISA(const float* input, float* v, const Geometry& g, int64_t channels,  \
                                          int64_t begin, int64_t end) {                                      \
    input_tiles(input, v, g, channels, begin, end);                                                          \
  }                                                                                                          \
  TARGET_ATTRIBUTE void output_tiles_##ISA(const float* m, const float* bias, float* output, const Geometry& g, \
                                           int64_t channels, bool relu, int64_t begin, int64_t end) {        \
    output_tiles(m, bias, output, g, channels, relu, begin, end);                                            \
  }

WINOGRAD_CPU_LOOPS(default, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WINOGRAD_X86_VARIANTS 1
WINOGRAD_CPU_LOOPS(avx2, __attribute__((target("avx2,fma"))))
WINOGRAD_CPU_LOOPS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
#endif
#undef WINOGRAD_CPU_LOOPS

using InputLoop = void (*)(const float*, float*, const Geometry&, int64_t, int64_t, int64_t);
using OutputLoop = void (*)(const float*, const float*, float*, const Geometry&, int64_t, bool, int64_t, int64_t);

// The variant of ATen's CPU capability (ATEN_CPU_CAPABILITY=default|avx2|avx512 picks another).
std::pair<InputLoop, OutputLoop> loops() {
#ifdef WINOGRAD_X86_VARIANTS
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return {&input_tiles_avx512, &output_tiles_avx512};
  }
  if (capability == "AVX2") {
    return {&input_tiles_avx2, &output_tiles_avx2};
  }
#endif
  return {&input_tiles_default, &output_tiles_default};
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
