// Includes ISA_VARIANT_LOOPS, a header of loops that the including source file names, once for each instruction set
// the CPU kernels are compiled for, each in a namespace of its own: `generic` (any CPU), and on x86-64 with GCC
// `avx2` (AVX2 + FMA) and `avx512` (AVX-512) under `#pragma GCC target`, which SPARSE_DETR_X86_VARIANTS then marks.
// GCC's vector extensions in the loops become one register of the instruction set only in code compiled for it (a
// generic helper inlined into a target function keeps its vectors split into scalars). Included once per source file
// (max_pool_cpu.cpp, quantize_cpu.cpp, winograd_cpu.cpp), after the definitions the loops use.
#ifndef ISA_VARIANT_LOOPS
#error "define ISA_VARIANT_LOOPS as the header of loops to include"
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed between the loops' own inline helpers only
namespace generic {
#include ISA_VARIANT_LOOPS
}  // namespace generic
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_DETR_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include ISA_VARIANT_LOOPS
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace avx512 {
#include ISA_VARIANT_LOOPS
}  // namespace avx512
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

// ISA_VARIANT(f): the address of the loops' function f (template arguments included, commas too) in the variant of
// ATen's CPU capability, read once per process (ATEN_CPU_CAPABILITY=default|avx2|avx512 picks another); generic's
// where there are no variants. The including file includes <string> and ATen.
#ifdef SPARSE_DETR_X86_VARIANTS
enum class IsaVariant { kGeneric, kAvx2, kAvx512 };
inline IsaVariant isa_variant() {
  static const IsaVariant variant = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? IsaVariant::kAvx512
           : capability == "AVX2" ? IsaVariant::kAvx2
                                  : IsaVariant::kGeneric;
  }();
  return variant;
}
#define ISA_VARIANT(...)                                           \
  (isa_variant() == IsaVariant::kAvx512 ? &avx512::__VA_ARGS__   \
   : isa_variant() == IsaVariant::kAvx2 ? &avx2::__VA_ARGS__     \
                                        : &generic::__VA_ARGS__)
#else
#define ISA_VARIANT(...) (&generic::__VA_ARGS__)
#endif
