// Multi-scale deformable attention: the kernel bodies, shared by the CPU and the CUDA launchers.
//
// Every body computes one unit of work named by its coordinates (and, through *_body(args, index), by one
// flat index), with no shared memory, warp intrinsics or barriers: a plain loop over the indices executes
// it exactly, which is what the CPU launcher does, and a CUDA grid-stride loop is the GPU launcher.
//
//   forward:  one (image, query, head, group of channels): the channels of out[n, q, m, :] in the group.
//   backward: one sampling point (image, query, head, level, point), its channels read in groups: its
//             share of the value gradient (added into grad_value with accumulate(), atomicAdd on a GPU) and its
//             location and attention-weight gradients, reduced over all the groups of the point in the unit
//             and written once (no atomics, the same order on every device).
//
// Semantics are those of the PyTorch implementation (projects/SparseDETR/sparse_detr/layers/ms_deform_attn.py):
// bilinear sampling with zeros outside the map and align_corners=False, pixel centres at (i + 0.5) / size.
// Sampling locations and attention weights are read in the accumulation type acc_t (float32 for float16,
// bfloat16 and float32 values, float64 for float64 values); values are converted to acc_t as they are read.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#ifdef MSDA_EMULATE_CUDA
#include "emulation/cuda_emulation.h"  // test-only: the CUDA launcher and its bodies run on the host
#endif

namespace sparse_detr {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// MSDA_EMULATE_CUDA: the CUDA launcher compiled for the host by the test-only emulation build
// (csrc/emulation/): the bodies then run as they do on a GPU (atomics, 16-byte packs, no host-only vector
// code), with the emulation's atomicAdd, and every pack access checks its alignment.
#if defined(__CUDACC__) || defined(MSDA_EMULATE_CUDA)
#define MSDA_GPU_LAYOUT 1  // the GPU launcher's bodies: on a GPU, or emulated on the host
#endif
#if defined(__CUDA_ARCH__) || defined(MSDA_EMULATE_CUDA)
#define MSDA_GPU_THREADS 1  // the bodies run as GPU threads: many writers per value row, atomics
#endif

// The bodies must inline into the launchers' loops: the CPU launcher compiles those loops once per
// instruction set, and only inlined code is compiled for the loop's instruction set.
#if defined(__CUDACC__)
#define MSDA_INLINE C10_HOST_DEVICE __forceinline__
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_INLINE C10_ALWAYS_INLINE
#define MSDA_UNROLL  // GCC unrolls and vectorises the fixed-length loops at -O3; unrolling them first hurts
#endif

// index_t is int32_t when every flat offset of the problem fits in 31 bits (the launchers decide), else int64_t.
template <typename index_t>
struct Sizes {
  index_t batch;     // N
  index_t tokens;    // S, all levels' cells
  index_t queries;   // Lq
  index_t heads;     // M
  index_t channels;  // D, per head
  index_t levels;    // L
  index_t points;    // P, per head and level
};

template <typename scalar_t, typename index_t>
struct ForwardArgs {
  const scalar_t* value;                           // (N, S, M, D)
  const int64_t* spatial_shapes;                   // (L, 2): (H_l, W_l)
  const int64_t* level_start_index;                // (L,)
  const acc_type<scalar_t>* sampling_locations;    // (N, Lq, M, L, P, 2): (x, y) in [0, 1]
  const acc_type<scalar_t>* attention_weights;     // (N, Lq, M, L, P)
  scalar_t* output;                                // (N, Lq, M, D)
  Sizes<index_t> size;
};

template <typename scalar_t, typename index_t>
struct BackwardArgs {
  const scalar_t* grad_output;                     // (N, Lq, M, D)
  const scalar_t* value;                           // (N, S, M, D)
  const int64_t* spatial_shapes;                   // (L, 2)
  const int64_t* level_start_index;                // (L,)
  const acc_type<scalar_t>* sampling_locations;    // (N, Lq, M, L, P, 2)
  const acc_type<scalar_t>* attention_weights;     // (N, Lq, M, L, P)
  acc_type<scalar_t>* grad_value;                  // (N, S, M, D), zero-initialised, cast to scalar_t afterwards;
                                                   // nullptr when value needs no gradient
  acc_type<scalar_t>* grad_sampling_locations;     // (N, Lq, M, L, P, 2), written once per point
  acc_type<scalar_t>* grad_attention_weights;      // (N, Lq, M, L, P), written once per point
  Sizes<index_t> size;
};

// ---- helpers ----------------------------------------------------------------------------------------

MSDA_INLINE float floor_of(float x) { return ::floorf(x); }
MSDA_INLINE double floor_of(double x) { return ::floor(x); }

// a * b rounded to acc_t, never fused with a following addition: the PyTorch implementation rounds the
// product before it subtracts the half pixel, and a fused multiply-add would move a location on a pixel
// centre (where the encoder's locations start from) to the other side of the floor, and its one-sided
// location gradient with it. Elsewhere the compilers may fuse.
#ifdef __has_builtin
#define MSDA_HAS_BUILTIN(name) __has_builtin(name)
#else
#define MSDA_HAS_BUILTIN(name) 0
#endif
template <typename acc_t>
MSDA_INLINE acc_t rounded_product(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#elif defined(__CUDACC__)
  return a * b;  // nvcc's host pass: the CUDA launcher runs the bodies on the device only
#elif MSDA_HAS_BUILTIN(__builtin_assoc_barrier)  // GCC
  return __builtin_assoc_barrier(a * b);
#elif MSDA_HAS_BUILTIN(__arithmetic_fence)  // Clang
  return __arithmetic_fence(a * b);
#else
  const volatile acc_t product = a * b;
  return product;
#endif
}

// *address += value. On a GPU many threads add into the same value rows: atomicAdd. On the CPU the
// launcher gives every value row to exactly one thread (it partitions the work by image, level and head,
// and a level's rows of one image and head receive only that level's, image's and head's points), so a
// plain add is race-free there, and the CPU's value gradient is deterministic.
template <typename T>
MSDA_INLINE void accumulate(T* address, T value) {
#ifdef MSDA_GPU_THREADS
  atomicAdd(address, value);
#else
  *address += value;
#endif
}

// Hopper (sm_90) and newer add four floats with one atomic instruction; the emulation decides at run time.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MSDA_VECTOR_ATOMICS true
#elif defined(MSDA_EMULATE_CUDA)
#define MSDA_VECTOR_ATOMICS (::sparse_detr::emulation::vector_atomics())
#endif

// The emulation checks that every 16-byte access is aligned, as a GPU requires; elsewhere nothing.
#ifndef MSDA_CHECK_ALIGNED
#define MSDA_CHECK_ALIGNED(pointer, bytes)
#endif

// address[c] += scale * values[c] for c < kChannels (address aligned to kChannels elements on a GPU).
template <int kChannels, typename T>
MSDA_INLINE void accumulate_scaled(T* address, T scale, const T* values) {
#ifdef MSDA_VECTOR_ATOMICS
  if constexpr (std::is_same_v<T, float> && kChannels % 4 == 0) {  // four floats in one instruction
    if (MSDA_VECTOR_ATOMICS) {
MSDA_UNROLL
      for (int c = 0; c < kChannels; c += 4) {
        MSDA_CHECK_ALIGNED(address + c, 16);
        atomicAdd(reinterpret_cast<float4*>(address + c), make_float4(scale * values[c], scale * values[c + 1],
                                                                      scale * values[c + 2], scale * values[c + 3]));
      }
      return;
    }
  }
#endif
MSDA_UNROLL
  for (int c = 0; c < kChannels; ++c) {
    accumulate(address + c, scale * values[c]);
  }
}

// float16 channels in float on the CPU: c10's exact conversion (a normal number rebiased by a float multiply,
// a subnormal one by a float subtraction, so a denormals-are-zero mode cannot flush it), written as one lane
// loop over the channels that compilers vectorise, where c10::Half's conversion of one value at a time stays
// scalar. Infinities and NaNs come out of the multiply as such.
template <int kChannels>
MSDA_INLINE void float16_to_float(float* to, const c10::Half* from) {
  uint32_t bits[kChannels];
  for (int c = 0; c < kChannels; ++c) {
    const uint32_t w = static_cast<uint32_t>(from[c].x) << 16;
    const uint32_t two_w = w + w;
    const float normal = c10::bit_cast<float>((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float subnormal = c10::bit_cast<float>((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    bits[c] = (w & UINT32_C(0x80000000)) |
              (two_w < (UINT32_C(1) << 27) ? c10::bit_cast<uint32_t>(subnormal) : c10::bit_cast<uint32_t>(normal));
  }
  std::memcpy(to, bits, sizeof(bits));
}

template <typename scalar_t>
constexpr bool kHostFloat16 =
#ifdef MSDA_GPU_LAYOUT
    false;  // GPUs convert half precision in hardware
#else
    std::is_same_v<scalar_t, c10::Half>;
#endif

// kPack elements read or written as one aligned vector (one 16-byte load on a GPU).
template <typename T, int kPack>
struct alignas(sizeof(T) * kPack) Pack {
  T element[kPack];
};

// to[c] = acc_t(from[c]) for c < kChannels, in packs of kPack elements (kPack == 1: element by element,
// which the CPU compiler vectorises itself without any alignment requirement).
template <int kChannels, int kPack, typename acc_t, typename scalar_t>
MSDA_INLINE void load_channels(acc_t* to, const scalar_t* from) {
  if constexpr (kPack == 1) {
    if constexpr (kHostFloat16<scalar_t>) {
      float16_to_float<kChannels>(to, from);
      return;
    }
MSDA_UNROLL
    for (int c = 0; c < kChannels; ++c) {
      to[c] = static_cast<acc_t>(from[c]);
    }
  } else {
MSDA_UNROLL
    for (int c = 0; c < kChannels; c += kPack) {
      MSDA_CHECK_ALIGNED(from + c, sizeof(Pack<scalar_t, kPack>));
      const Pack<scalar_t, kPack> pack = *reinterpret_cast<const Pack<scalar_t, kPack>*>(from + c);
MSDA_UNROLL
      for (int i = 0; i < kPack; ++i) {
        to[c + i] = static_cast<acc_t>(pack.element[i]);
      }
    }
  }
}

template <int kChannels, int kPack, typename acc_t, typename scalar_t>
MSDA_INLINE void store_channels(scalar_t* to, const acc_t* from) {
  if constexpr (kPack == 1) {
MSDA_UNROLL
    for (int c = 0; c < kChannels; ++c) {
      to[c] = static_cast<scalar_t>(from[c]);
    }
  } else {
MSDA_UNROLL
    for (int c = 0; c < kChannels; c += kPack) {
      Pack<scalar_t, kPack> pack;
MSDA_UNROLL
      for (int i = 0; i < kPack; ++i) {
        pack.element[i] = static_cast<scalar_t>(from[c + i]);
      }
      MSDA_CHECK_ALIGNED(to + c, sizeof(Pack<scalar_t, kPack>));
      *reinterpret_cast<Pack<scalar_t, kPack>*>(to + c) = pack;
    }
  }
}

// sum[c] += weight * acc_t(row[c]) for c < kChannels.
template <int kChannels, int kPack, typename acc_t, typename scalar_t>
MSDA_INLINE void add_scaled_row(acc_t* sum, const scalar_t* row, acc_t weight) {
  if constexpr (kPack == 1 && !kHostFloat16<scalar_t>) {
MSDA_UNROLL
    for (int c = 0; c < kChannels; ++c) {
      sum[c] += weight * static_cast<acc_t>(row[c]);
    }
  } else {
    acc_t channels[kChannels];
    load_channels<kChannels, kPack>(channels, row);
MSDA_UNROLL
    for (int c = 0; c < kChannels; ++c) {
      sum[c] += weight * channels[c];
    }
  }
}

// products[c] = grad[c] * acc_t(row[c]) for c < kChannels.
template <int kChannels, int kPack, typename acc_t, typename scalar_t>
MSDA_INLINE void multiply_row(acc_t* products, const scalar_t* row, const acc_t* grad) {
  load_channels<kChannels, kPack>(products, row);
MSDA_UNROLL
  for (int c = 0; c < kChannels; ++c) {
    products[c] *= grad[c];
  }
}

#if !defined(MSDA_GPU_LAYOUT) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_HOST_LANES 1
// kLanes values of acc_t as one vector of the compiler's generic vector extension (the CPU's widest registers).
template <typename acc_t, int kLanes>
struct HostLanes;
template <int kLanes>
struct HostLanes<float, kLanes> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <int kLanes>
struct HostLanes<double, kLanes> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
#endif

// x[0] + ... + x[kChannels - 1] (kChannels a power of two) by halving: the upper half is added onto the
// lower half, lane by lane, until one lane is left, in the same order on every device. Overwrites x.
template <int kChannels, typename acc_t>
MSDA_INLINE acc_t pairwise_sum(acc_t* x) {
  static_assert(kChannels > 0 && (kChannels & (kChannels - 1)) == 0, "channel groups are powers of two");
  constexpr int kHalf = kChannels / 2;
  if constexpr (kChannels == 1) {
    return x[0];
  } else {
#ifdef MSDA_HOST_LANES
    // On the CPU one vector addition per halving: compilers turn the lane loop below into scalar additions.
    typename HostLanes<acc_t, kHalf>::type low, high;
    std::memcpy(&low, x, sizeof(low));
    std::memcpy(&high, x + kHalf, sizeof(high));
    low += high;
    std::memcpy(x, &low, sizeof(low));
#else
MSDA_UNROLL
    for (int c = 0; c < kHalf; ++c) {
      x[c] += x[c + kHalf];
    }
#endif
    return pairwise_sum<kHalf>(x);
  }
}

// Linear interpolation along one axis of a level: the two cells around a coordinate.
template <typename acc_t, typename index_t>
struct Axis {
  index_t cells[2];  // low = floor(pixel) and low + 1, clamped into the map
  acc_t inside[2];   // 1 for a cell inside the map, 0 for one outside (whose clamped cell is read with weight 0)
  acc_t weights[2];  // (1 - frac, frac) times inside
};

// x clamped to [0, last], in floating point, where a NaN or a huge coordinate cannot reach an index cast;
// NaN becomes 0. Written as max-then-min of one comparison each, which compiles to two branch-free instructions.
template <typename acc_t>
MSDA_INLINE acc_t clamp_cell(acc_t x, acc_t last) {
  const acc_t positive = x > acc_t(0) ? x : acc_t(0);
  return positive < last ? positive : last;
}

// coordinate in [0, 1] relative to the map, pixel centres at (i + 0.5) / size (align_corners=False). Cells
// outside the map read as zeros: they keep their clamped index and get weight 0, so that every sampling point
// reads four rows without a branch (neighbours of the rows it needs, in the cache already). A cell is inside
// exactly when clamping leaves it unchanged.
template <typename acc_t, typename index_t>
MSDA_INLINE Axis<acc_t, index_t> interpolation_axis(acc_t coordinate, index_t size) {
  const acc_t pixel = rounded_product(coordinate, static_cast<acc_t>(size)) - acc_t(0.5);
  const acc_t low = floor_of(pixel);
  const acc_t high = low + acc_t(1);
  const acc_t frac = pixel - low;
  const acc_t last = static_cast<acc_t>(size - 1);
  const acc_t low_cell = clamp_cell(low, last);
  const acc_t high_cell = clamp_cell(high, last);
  Axis<acc_t, index_t> axis;
  axis.inside[0] = low_cell == low ? acc_t(1) : acc_t(0);
  axis.inside[1] = high_cell == high ? acc_t(1) : acc_t(0);
  axis.weights[0] = axis.inside[0] * (acc_t(1) - frac);
  axis.weights[1] = axis.inside[1] * frac;
  axis.cells[0] = static_cast<index_t>(low_cell);
  axis.cells[1] = static_cast<index_t>(high_cell);
  return axis;
}

// The level table must lie inside value. The CPU launcher checks it on the host before any body runs. On a GPU
// the table is in device memory: every unit checks the levels it reads, and a level outside value stops the
// kernel with a device-side assertion (the emulation raises the CPU launcher's error) instead of a read or an
// atomic write outside value. The level is skipped as well, so nothing outside is touched before the stop.
MSDA_INLINE bool level_inside(int64_t start, int64_t height, int64_t width, int64_t tokens) {
  // height, width <= tokens first: their product then cannot overflow for any value a GPU can hold
  return start >= 0 && height >= 0 && width >= 0 && height <= tokens && width <= tokens &&
         start + height * width <= tokens;
}

#if defined(__CUDA_ARCH__)
#define MSDA_LEVEL_OUTSIDE(level, start, height, width, tokens) \
  CUDA_KERNEL_ASSERT(!"ms_deform_attn: a level of spatial_shapes / level_start_index does not fit in the tokens of value")
#elif !defined(MSDA_LEVEL_OUTSIDE)
#define MSDA_LEVEL_OUTSIDE(level, start, height, width, tokens)  // the CPU launcher checked the table
#endif

// ---- forward -----------------------------------------------------------------------------------------

// out[image, query, head, first_channel + c] for c < kChannels * kGroups: kGroups groups of kChannels channels that
// share each point's interpolation (the CPU's wide heads; a GPU thread takes one group). Every channel's sum takes
// the same terms in the same order whatever kGroups is.
template <int kChannels, int kPack, int kGroups = 1, typename scalar_t, typename index_t>
MSDA_INLINE void forward_unit(const ForwardArgs<scalar_t, index_t>& args, index_t image, index_t query,
                              index_t head, index_t first_channel) {
  using acc_t = acc_type<scalar_t>;
  const Sizes<index_t>& size = args.size;
  const index_t token_stride = size.heads * size.channels;  // between the rows of two tokens
  const scalar_t* image_value = args.value + (image * size.tokens * size.heads + head) * size.channels + first_channel;
  const index_t first_slot = ((image * size.queries + query) * size.heads + head) * size.levels * size.points;
  acc_t sum[kChannels * kGroups] = {};
  for (index_t level = 0; level < size.levels; ++level) {
    const int64_t start = args.level_start_index[level];
    const int64_t height64 = args.spatial_shapes[2 * level], width64 = args.spatial_shapes[2 * level + 1];
#ifdef MSDA_GPU_THREADS
    if (!level_inside(start, height64, width64, static_cast<int64_t>(size.tokens))) {
      MSDA_LEVEL_OUTSIDE(level, start, height64, width64, size.tokens);
      continue;
    }
#endif
    const index_t height = static_cast<index_t>(height64), width = static_cast<index_t>(width64);
    if (height <= 0 || width <= 0) {
      continue;  // no cell to read, not even a clamped one
    }
    const scalar_t* level_value = image_value + static_cast<index_t>(start) * token_stride;
    for (index_t point = 0; point < size.points; ++point) {
      const index_t slot = first_slot + level * size.points + point;
      const acc_t attention = args.attention_weights[slot];
      const Axis<acc_t, index_t> x = interpolation_axis(args.sampling_locations[2 * slot], width);
      const Axis<acc_t, index_t> y = interpolation_axis(args.sampling_locations[2 * slot + 1], height);
MSDA_UNROLL
      for (int dy = 0; dy < 2; ++dy) {
        const scalar_t* row = level_value + y.cells[dy] * width * token_stride;
        const acc_t y_weight = attention * y.weights[dy];
MSDA_UNROLL
        for (int dx = 0; dx < 2; ++dx) {
          const scalar_t* cell = row + x.cells[dx] * token_stride;
          const acc_t weight = y_weight * x.weights[dx];
MSDA_UNROLL
          for (int group = 0; group < kGroups; ++group) {
            add_scaled_row<kChannels, kPack>(sum + group * kChannels, cell + group * kChannels, weight);
          }
        }
      }
    }
  }
  const index_t out = ((image * size.queries + query) * size.heads + head) * size.channels + first_channel;
MSDA_UNROLL
  for (int group = 0; group < kGroups; ++group) {
    store_channels<kChannels, kPack>(args.output + out + group * kChannels, sum + group * kChannels);
  }
}

// Units in the order (image, query, head, group): a GPU's neighbouring threads read neighbouring channels.
template <int kChannels, int kPack, typename scalar_t, typename index_t>
MSDA_INLINE void forward_body(const ForwardArgs<scalar_t, index_t>& args, index_t index) {
  const index_t groups = args.size.channels / kChannels;
  const index_t group = index % groups;
  index /= groups;
  const index_t head = index % args.size.heads;
  index /= args.size.heads;
  const index_t query = index % args.size.queries;
  const index_t image = index / args.size.queries;
  forward_unit<kChannels, kPack>(args, image, query, head, group * kChannels);
}

// ---- backward ----------------------------------------------------------------------------------------

// The gradients of one sampling point (image, query, head, level, point), its head's channels read in groups
// of kChannels.
//
// The point contributes out[c] += a * sum over corners k of w_k * v_k[c], with w_k = wy_k * wx_k the bilinear
// weights and v_k the corner's value row (zero outside the map). With g_k = <grad_out, v_k>:
//   d/dv_k = a * w_k * grad_out,   d/da = sum_k w_k g_k,
//   d/dx = a * W * sum over the two rows of wy * (g_right - g_left)   (d frac_x / dx = W; wx = (1 - frac, frac)),
//   d/dy = a * H * sum over the two columns of wx * (g_below - g_above).
// Each g_k is reduced over all groups of the point inside the unit (each group's products summed by halving,
// the groups in order), so the location and weight gradients are written once, without atomics, and are the
// same on every device and run. The value gradient is skipped when grad_value is nullptr.
template <int kChannels, int kPack, typename scalar_t, typename index_t>
MSDA_INLINE void backward_unit(const BackwardArgs<scalar_t, index_t>& args, index_t image, index_t query,
                               index_t head, index_t level, index_t point) {
  using acc_t = acc_type<scalar_t>;
  const Sizes<index_t>& size = args.size;
  const int64_t start = args.level_start_index[level];
  const int64_t height64 = args.spatial_shapes[2 * level], width64 = args.spatial_shapes[2 * level + 1];
  const index_t head_row = (image * size.queries + query) * size.heads + head;
  const index_t slot = (head_row * size.levels + level) * size.points + point;
  bool reads = height64 > 0 && width64 > 0;
#ifdef MSDA_GPU_THREADS
  if (!level_inside(start, height64, width64, static_cast<int64_t>(size.tokens))) {
    MSDA_LEVEL_OUTSIDE(level, start, height64, width64, size.tokens);
    reads = false;
  }
#endif
  acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
  if (reads) {
    const index_t height = static_cast<index_t>(height64), width = static_cast<index_t>(width64);
    const index_t token_stride = size.heads * size.channels;
    const acc_t attention = args.attention_weights[slot];
    const Axis<acc_t, index_t> x = interpolation_axis(args.sampling_locations[2 * slot], width);
    const Axis<acc_t, index_t> y = interpolation_axis(args.sampling_locations[2 * slot + 1], height);
    const index_t level_offset = ((image * size.tokens + static_cast<index_t>(start)) * size.heads + head) * size.channels;
    const scalar_t* grad_row = args.grad_output + head_row * size.channels;
    acc_t dots[2][2] = {};  // g_k = <grad_out, value row> of each corner
    for (index_t channel = 0; channel < size.channels; channel += kChannels) {
      acc_t grad[kChannels];
      load_channels<kChannels, kPack>(grad, grad_row + channel);
MSDA_UNROLL
      for (int dy = 0; dy < 2; ++dy) {
MSDA_UNROLL
        for (int dx = 0; dx < 2; ++dx) {
          const index_t offset = level_offset + (y.cells[dy] * width + x.cells[dx]) * token_stride + channel;
          acc_t products[kChannels];
          multiply_row<kChannels, kPack>(products, args.value + offset, grad);
          dots[dy][dx] += pairwise_sum<kChannels>(products);
          if (args.grad_value != nullptr && y.inside[dy] != acc_t(0) && x.inside[dx] != acc_t(0)) {
            accumulate_scaled<kChannels>(args.grad_value + offset, attention * y.weights[dy] * x.weights[dx], grad);
          }
        }
      }
    }
MSDA_UNROLL
    for (int dy = 0; dy < 2; ++dy) {
MSDA_UNROLL
      for (int dx = 0; dx < 2; ++dx) {
        dots[dy][dx] *= y.inside[dy] * x.inside[dx];  // 0 outside the map
      }
    }
    grad_attention = y.weights[0] * (x.weights[0] * dots[0][0] + x.weights[1] * dots[0][1]) +
                     y.weights[1] * (x.weights[0] * dots[1][0] + x.weights[1] * dots[1][1]);
    grad_x = attention * static_cast<acc_t>(width) *
             (y.weights[0] * (dots[0][1] - dots[0][0]) + y.weights[1] * (dots[1][1] - dots[1][0]));
    grad_y = attention * static_cast<acc_t>(height) *
             (x.weights[0] * (dots[1][0] - dots[0][0]) + x.weights[1] * (dots[1][1] - dots[0][1]));
  }
  args.grad_attention_weights[slot] = grad_attention;
  args.grad_sampling_locations[2 * slot] = grad_x;
  args.grad_sampling_locations[2 * slot + 1] = grad_y;
}

// Units in the order (image, query, head, level, point).
template <int kChannels, int kPack, typename scalar_t, typename index_t>
MSDA_INLINE void backward_body(const BackwardArgs<scalar_t, index_t>& args, index_t index) {
  const index_t point = index % args.size.points;
  index /= args.size.points;
  const index_t level = index % args.size.levels;
  index /= args.size.levels;
  const index_t head = index % args.size.heads;
  index /= args.size.heads;
  const index_t query = index % args.size.queries;
  const index_t image = index / args.size.queries;
  backward_unit<kChannels, kPack>(args, image, query, head, level, point);
}

}  // namespace sparse_detr
