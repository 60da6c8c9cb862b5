// kLanes float32 lanes (GCC's vector extensions) and their loads from float32 or bf16 (widened exactly: a bf16 is
// the upper half of a float32 of the same value). Included by the loops headers (max_pool_loops.h,
// quantize_loops.h) inside each instruction set's namespace, so no include guard; kLanes comes from the source file.

typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline Floats load(const float* from) {
  Floats v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}
inline Floats load(const uint16_t* from) {
  Halves h;
  std::memcpy(&h, from, sizeof(h));
  const Words w = __builtin_convertvector(h, Words) << 16;
  Floats v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
