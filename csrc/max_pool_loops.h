// The loops of csrc/max_pool_cpu.cpp, included there once for each instruction set (in a namespace of its own, under
// `#pragma GCC target`): GCC's vector extensions below become one AVX-512 register (the comparisons in mask
// registers) only in code compiled for it, which an inlined generic helper is not.

#include "vector_loads.h"  // Floats, Words, Halves; load() of float32 and bf16
typedef uint8_t Codes __attribute__((vector_size(64)));  // uint8 maps: 64 channels at once, compared as bytes

// The vector a map's elements are compared in: float32 (bf16 widened) 16 channels at a time, uint8 codes 64.
template <typename T>
struct Vector {
  typedef Floats type;
  static constexpr int64_t lanes = kLanes;
  static constexpr float lowest = -std::numeric_limits<float>::infinity();
};
template <>
struct Vector<uint8_t> {
  typedef Codes type;
  static constexpr int64_t lanes = sizeof(Codes);
  static constexpr uint8_t lowest = 0;
};

inline Codes load(const uint8_t* from) {
  Codes v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}
inline void store(float* to, const Floats& v) { std::memcpy(to, &v, sizeof(v)); }
inline void store(uint8_t* to, const Codes& v) { std::memcpy(to, &v, sizeof(v)); }
inline void store(uint16_t* to, const Floats& v) {
  Words w;
  std::memcpy(&w, &v, sizeof(w));
  const Halves h = __builtin_convertvector(w >> 16, Halves);  // v holds bf16 inputs: their lower halves are zero
  std::memcpy(to, &h, sizeof(h));
}

// Output rows [begin, end) of the flattened (N * out_height) rows. A window's elements are taken in PyTorch's order
// (rows, then columns) with its rule: an element replaces the maximum when it is greater or NaN (codes are never NaN).
template <typename T>
void pool_rows(const T* input, T* output, const Shape& s, int64_t begin, int64_t end) {
  typedef typename Vector<T>::type Lanes;
  constexpr int64_t lanes = Vector<T>::lanes;
  const int64_t vector_channels = s.channels / lanes * lanes;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / s.out_height, oy = row % s.out_height;
    const int64_t y_begin = std::max<int64_t>(2 * oy - 1, 0), y_end = std::min<int64_t>(2 * oy + 2, s.height);
    const T* map = input + image * s.height * s.width * s.channels;
    for (int64_t ox = 0; ox < s.out_width; ++ox) {
      const int64_t x_begin = std::max<int64_t>(2 * ox - 1, 0), x_end = std::min<int64_t>(2 * ox + 2, s.width);
      T* to = output + (row * s.out_width + ox) * s.channels;
      for (int64_t c0 = 0; c0 < vector_channels; c0 += lanes) {
        Lanes best = Lanes{} + Vector<T>::lowest;  // every lane the lowest value
        for (int64_t y = y_begin; y < y_end; ++y) {
          for (int64_t x = x_begin; x < x_end; ++x) {
            const Lanes v = load(map + (y * s.width + x) * s.channels + c0);
            best = (v > best) | (v != v) ? v : best;
          }
        }
        store(to + c0, best);
      }
      for (int64_t c = vector_channels; c < s.channels; ++c) {
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t y = y_begin; y < y_end; ++y) {
          for (int64_t x = x_begin; x < x_end; ++x) {
            const float v = as_float(map[(y * s.width + x) * s.channels + c]);
            best = (v > best || v != v) ? v : best;
          }
        }
        put(to + c, best);
      }
    }
  }
}

