// The loop of csrc/quantize_cpu.cpp, included there once for each instruction set (in a namespace of its own, under
// `#pragma GCC target`; see isa_variants.h).

#include "vector_loads.h"  // Floats, Words, Halves; load() of float32 and bf16
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));

// The code of one value, as the vectors below compute it.
inline uint8_t code_of(float v, const Affine& a) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: a float of this size has no fraction bits
  v = v * a.inverse_scale;
  v = v < a.low ? a.low : v;
  v = v > a.high ? a.high : v;
  v = (v + kRound) - kRound + a.zero_point;
  return static_cast<uint8_t>(static_cast<int32_t>(v));
}

// Elements [begin, end): clamp(x * inverse_scale, -zero_point, 255 - zero_point), rounded half to even (by adding and
// subtracting 1.5 * 2^23, exact for the clamped range), plus zero_point: the code torch.round and torch.clamp give.
template <typename T>
void quantize_elements(const T* input, uint8_t* output, const Affine& a, int64_t begin, int64_t end) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: a float of this size has no fraction bits
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    Floats v = load(input + i) * a.inverse_scale;
    v = v < a.low ? a.low : v;
    v = v > a.high ? a.high : v;
    v = (v + kRound) - kRound + a.zero_point;
    const Bytes codes = __builtin_convertvector(__builtin_convertvector(v, Ints), Bytes);
    std::memcpy(output + i, &codes, sizeof(codes));
  }
  for (; i < end; ++i) {
    output[i] = code_of(as_float(input[i]), a);
  }
}

// One normalised value written as float32, bf16 or a uint8 code.
inline void store_normalized(float v, float* out, const Affine&) { *out = v; }
inline void store_normalized(float v, uint16_t* out, const Affine&) {  // bf16 bits, rounded as torch rounds
  *out = ::c10::detail::round_to_nearest_even(v);
}
inline void store_normalized(float v, uint8_t* out, const Affine& a) { *out = code_of(v, a); }

// Rows [begin, end) of a (channels, height, width) image (its strides: channel, row, column), normalised as torch
// computes (x - mean) / std in float32, written channels-last into out (row h at out + h * row_stride, pixel w's
// channels at w * channels): float32, bf16 (rounded to nearest even, as torch converts) or uint8 codes of
// quantize_elements. scratch holds channels x width floats.
template <typename In, typename Out>
void normalize_rows(const In* image, const int64_t* strides, const float* mean, const float* std, Out* out,
                    int64_t channels, int64_t width, int64_t row_stride, const Affine& a, float* scratch,
                    int64_t begin, int64_t end) {
  const int64_t column_stride = strides[2];
  for (int64_t h = begin; h < end; ++h) {
    for (int64_t c = 0; c < channels; ++c) {  // each channel's row, normalised (in vectors where it is contiguous)
      const In* from = image + c * strides[0] + h * strides[1];
      float* to = scratch + c * width;
      const float m = mean[c], s = std[c];
      if (column_stride == 1) {
        for (int64_t w = 0; w < width; ++w) {
          to[w] = (as_float(from[w]) - m) / s;
        }
      } else {  // e.g. an (H, W, C) array seen as (C, H, W)
        for (int64_t w = 0; w < width; ++w) {
          to[w] = (as_float(from[w * column_stride]) - m) / s;
        }
      }
    }
    Out* row = out + h * row_stride;  // then written pixel after pixel
    if (channels == 3) {
      for (int64_t w = 0; w < width; ++w) {
        store_normalized(scratch[w], row + 3 * w, a);
        store_normalized(scratch[width + w], row + 3 * w + 1, a);
        store_normalized(scratch[2 * width + w], row + 3 * w + 2, a);
      }
    } else {
      for (int64_t w = 0; w < width; ++w) {
        for (int64_t c = 0; c < channels; ++c) {
          store_normalized(scratch[c * width + w], row + w * channels + c, a);
        }
      }
    }
  }
}
