// The loop of csrc/quantize_cpu.cpp, included there once for each instruction set (in a namespace of its own, under
// `#pragma GCC target`; see isa_variants.h).

#include "vector_loads.h"  // Floats, Words, Halves; load() of float32 and bf16
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));

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
    float v = as_float(input[i]) * a.inverse_scale;
    v = v < a.low ? a.low : v;
    v = v > a.high ? a.high : v;
    v = (v + kRound) - kRound + a.zero_point;
    output[i] = static_cast<uint8_t>(static_cast<int32_t>(v));
  }
}
