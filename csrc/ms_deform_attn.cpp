// The compiled multi-scale deformable attention ops and the Python module sparse_detr._C, whose import
// registers them:
//
//   sparse_detr_C::ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                                         attention_weights, force_int64_index=False) -> output
//   sparse_detr_C::ms_deform_attn_backward(grad_output, value, ..., force_int64_index=False, value_grad=True)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
//
// value_grad=False skips the value gradient (grad_value is then an empty tensor).
//
// Their CPU kernels are in ms_deform_attn_cpu.cpp, their CUDA kernels in ms_deform_attn_cuda.cu (built when
// CUDA is). The user-facing op sparse_detr::ms_deform_attn (projects/SparseDETR/sparse_detr/layers/ms_deform_attn.py)
// calls them from its CPU and CUDA kernels and keeps its autograd and fake implementations.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {

Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
              "level_start_index must be (L,) with L = ", spatial_shapes.size(0), ", got ", level_start_index.sizes());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "value must be floating point, got ", value.scalar_type());
  const at::ScalarType acc = at::toOpMathType(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == acc && attention_weights.scalar_type() == acc,
              "sampling_locations and attention_weights must be ", acc, " for ", value.scalar_type(), " values, got ",
              sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  for (const at::Tensor* tensor : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(tensor->device() == value.device(), "every input must be on ", value.device(), ", got one on ",
                tensor->device());
  }
  Problem problem{value.size(0),          value.size(1),          sampling_locations.size(1), value.size(2),
                  value.size(3),          spatial_shapes.size(0), sampling_locations.size(4)};
  const int64_t expected[5] = {problem.batch, problem.queries, problem.heads, problem.levels, problem.points};
  for (int dim = 0; dim < 5; ++dim) {
    TORCH_CHECK(sampling_locations.size(dim) == expected[dim] && attention_weights.size(dim) == expected[dim],
                "sampling_locations ", sampling_locations.sizes(), " and attention_weights ", attention_weights.sizes(),
                " do not match value ", value.sizes(), " and ", problem.levels, " levels at dimension ", dim);
  }
  return problem;
}

Inputs contiguous_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  return {value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
          sampling_locations.contiguous(), attention_weights.contiguous()};
}

void check_grad_output(const Problem& problem, const at::Tensor& grad_output, const at::Tensor& value) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({problem.batch, problem.queries, problem.heads * problem.channels}) &&
                  grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "grad_output must be (N, Lq, M * D) like the forward's output, got ", grad_output.sizes(), " ",
              grad_output.scalar_type());
}

}  // namespace sparse_detr

TORCH_LIBRARY(MSDA_LIBRARY, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool force_int64_index=False) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool force_int64_index=False, bool value_grad=True) "
      "-> (Tensor, Tensor, Tensor)");
}

// The Python module: sparse_detr._C, or the emulation build's (csrc/emulation/, named by its build).
#ifdef MSDA_EMULATE_CUDA
#define MSDA_MODULE_NAME "sparse_detr_cuda_emulation"
#define MSDA_MODULE_INIT PyInit_sparse_detr_cuda_emulation
#else
#define MSDA_MODULE_NAME "_C"
#define MSDA_MODULE_INIT PyInit__C
#endif

// A plain extension module: importing it loads this library, whose static initialisers register the ops.
extern "C" PyMODINIT_FUNC MSDA_MODULE_INIT(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, MSDA_MODULE_NAME,
                               "Compiled multi-scale deformable attention (ops in torch.ops." C10_STRINGIZE(MSDA_LIBRARY) ")",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#if defined(WITH_CUDA) || defined(MSDA_EMULATE_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
