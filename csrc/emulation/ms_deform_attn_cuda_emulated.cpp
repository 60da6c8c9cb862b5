// Test-only: ms_deform_attn_cuda.cu compiled for the host under the emulation of cuda_emulation.h (the same
// translation unit, every line but the runtime calls), plus the emulation's own ops:
//   configure(arch, seed, multiprocessors)  the emulated GPU and the shuffle's seed
//   take_launches() -> str[]                the launches since the last call ("kernel<...> blocks=B threads=T")
#include "cuda_emulation.h"

#include "../ms_deform_attn_cuda.cu"

namespace sparse_detr {
namespace emulation {
namespace {

void configure(int64_t arch, int64_t seed, int64_t multiprocessors) {
  TORCH_CHECK(arch >= 750 && multiprocessors >= 1, "emulated CUDA: arch >= 750 and multiprocessors >= 1");
  State& s = state();
  s.arch = arch;
  s.seed = static_cast<uint64_t>(seed);
  s.multiprocessors = multiprocessors;
}

std::vector<std::string> take_launches() {
  std::vector<std::string> launches;
  launches.swap(state().launches);
  return launches;
}

}  // namespace
}  // namespace emulation
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) {
  m.def("configure(int arch, int seed, int multiprocessors) -> ()", &sparse_detr::emulation::configure);
  m.def("take_launches() -> str[]", &sparse_detr::emulation::take_launches);
}
