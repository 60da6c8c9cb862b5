// The scalar value of an element the CPU loops read (float32, bf16 as its bits, uint8 codes), as float32: a bf16 is
// the upper half of a float32 of the same value. Included inside a source file's namespace, before its loops
// (max_pool_cpu.cpp, quantize_cpu.cpp).
#pragma once

inline float as_float(float x) { return x; }
inline float as_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof(x));
  return x;
}
inline float as_float(uint8_t x) { return x; }
