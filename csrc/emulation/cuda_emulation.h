// Test-only: the host emulation of what ms_deform_attn_cuda.cu takes from CUDA, so that the CUDA launcher and
// the bodies as a GPU runs them (16-byte packs, atomics, the grid-stride loops) execute on the CPU in CI.
//
// * A launch runs every (block, thread) of its grid, one after the other in a shuffled order (seeded), with
//   blockIdx, threadIdx, blockDim and gridDim set as on a GPU; each thread runs its grid-stride loop whole.
// * atomicAdd is a plain add (the sequential launch has no races); the sm_90 four-float atomicAdd is four adds
//   and checks its 16-byte alignment, as every pack load and store does (MSDA_CHECK_ALIGNED): an unaligned
//   access raises instead of reading memory the GPU would fault on.
// * Memory the launcher leaves uninitialised (outputs, location and weight gradients) starts as NaN, so a unit
//   that is never run or never writes shows.
// * A level of the table outside value raises the CPU launcher's error where a GPU stops with an assertion.
// * The emulated GPU's architecture (vector atomics from 900 on), the number of multiprocessors (which sizes
//   the grid: fewer make every thread loop) and the shuffle's seed are set by the op configure(); the launches
//   are logged (kernel, grid, block) for the tests to read with take_launches().
//
// Built by tests/cuda_emulation.py with torch.utils.cpp_extension (never installed), with MSDA_EMULATE_CUDA
// and MSDA_LIBRARY=sparse_detr_C_emulated: its ops are torch.ops.sparse_detr_C_emulated.*, on the CPU key.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#define __global__
#define __launch_bounds__(threads)
#define MSDA_CUDA_DISPATCH_KEY CPU

#define MSDA_CHECK_ALIGNED(pointer, bytes)                                                                      \
  TORCH_CHECK(reinterpret_cast<uintptr_t>(pointer) % (bytes) == 0, "emulated CUDA: a ", (bytes),               \
              "-byte access at the unaligned address ", static_cast<const void*>(pointer))

#define MSDA_LEVEL_OUTSIDE(level, start, height, width, tokens)                                                 \
  TORCH_CHECK(false, "level ", (level), " (", (height), " x ", (width), " cells from token ", (start),         \
              ") does not fit in the ", (tokens), " tokens of value")

#define MSDA_LAUNCH(kernel, blocks, threads, stream, ...) \
  ::sparse_detr::emulation::launch(#kernel, (blocks), (threads), [&] { kernel(__VA_ARGS__); })

namespace sparse_detr {

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
inline dim3 blockIdx, threadIdx, blockDim, gridDim;

struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
inline float4 atomicAdd(float4* address, float4 value) {
  MSDA_CHECK_ALIGNED(address, 16);
  const float4 old = *address;
  *address = {old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w};
  return old;
}

namespace emulation {

struct State {
  int64_t arch = 900;
  uint64_t seed = 0;
  int64_t multiprocessors = 1;
  std::vector<std::string> launches;
};

inline State& state() {
  static State instance;
  return instance;
}

inline bool vector_atomics() { return state().arch >= 900; }

template <typename Thread>
void launch(const char* kernel, int64_t blocks, int threads, Thread&& thread) {
  State& s = state();
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max() && threads >= 1 && threads <= 1024,
              "emulated CUDA: launch of ", kernel, " with ", blocks, " blocks of ", threads, " threads");
  s.launches.push_back(std::string(kernel) + " blocks=" + std::to_string(blocks) +
                       " threads=" + std::to_string(threads));
  std::vector<std::pair<unsigned int, unsigned int>> order;
  order.reserve(static_cast<size_t>(blocks) * threads);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int t = 0; t < threads; ++t) {
      order.emplace_back(static_cast<unsigned int>(block), static_cast<unsigned int>(t));
    }
  }
  std::mt19937_64 random(s.seed * 1000003 + s.launches.size());
  std::shuffle(order.begin(), order.end(), random);
  gridDim.x = static_cast<unsigned int>(blocks);
  blockDim.x = static_cast<unsigned int>(threads);
  for (const auto& [block, t] : order) {
    blockIdx.x = block;
    threadIdx.x = t;
    thread();
  }
}

}  // namespace emulation

// The runtime calls of ms_deform_attn_cuda.cu.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline int current_stream() { return 0; }
inline int64_t multiprocessor_count() { return emulation::state().multiprocessors; }
inline at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}
inline void check_launch() {}

}  // namespace sparse_detr
