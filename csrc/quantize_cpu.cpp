// Quantizing activations to uint8 on the CPU, for the int8 path's linear layers (projects/SparseDETR/sparse_detr/
// quantization.py):
//
//   sparse_detr_C::quantize_uint8(input, scale, zero_point) -> output
//
// input float32 or bfloat16, any shape; output uint8 of its shape and memory format (channels-last stays so),
// clamp(round(input * (1 / scale)) + zero_point, 0, 255) with round half to even: torch's ops composed give the same
// codes (tested) in four passes over the tensor and three temporaries, this in one (at 800x1199, the sparse
// encoder's 20k x 256 values: 0.35 against 3.5 ms in float32, 0.42 against 3.2 in bf16, fastest of 30, two
// threads of the AMD EPYC, freed memory kept).
//
//   sparse_detr_C::normalize_image(image, mean, std, output, scale=1, zero_point=0) -> ()
//
// image (C, H, W) uint8 or float32, any strides; output an (H, W, C) view (strides (any, C, 1)): (image - mean) / std
// as torch computes it in float32, written channels-last as float32, bf16 (rounded to nearest even) or uint8 codes
// (as quantize_uint8 gives them): the fast inference path's images, straight into its backbone's layout.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 vector of float32

struct Affine {
  float inverse_scale, low, high, zero_point;  // low, high: the codes' bounds less the zero point
};

#include "scalar_floats.h"  // as_float

#define ISA_VARIANT_LOOPS "quantize_loops.h"
#include "isa_variants.h"

// Quantizes elements of T by the instruction set's loop, chosen once for the call.
template <typename T>
void quantize(const at::Tensor& input, at::Tensor& output, const Affine& affine) {
  const auto loop = ISA_VARIANT(quantize_elements<T>);
  const T* from = static_cast<const T*>(input.data_ptr());
  uint8_t* to = output.data_ptr<uint8_t>();
  constexpr int64_t grain = 1 << 16;  // elements a thread takes at least
  at::parallel_for(0, input.numel(), grain, [&](int64_t begin, int64_t end) { loop(from, to, affine, begin, end); });
}

at::Tensor quantize_uint8(const at::Tensor& input, double scale, int64_t zero_point) {
  TORCH_CHECK(input.device().is_cpu() && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16),
              "quantize_uint8: input must be a float32 or bfloat16 CPU tensor, got ", input.scalar_type(), " on ",
              input.device());
  TORCH_CHECK(scale > 0 && zero_point >= 0 && zero_point <= 255,
              "quantize_uint8: scale must be positive and zero_point in [0, 255], got ", scale, " and ", zero_point);
  // elementwise: in the input's memory format (a channels-last map stays so), the same layout for both
  const at::Tensor in = input.contiguous(input.suggest_memory_format());
  at::Tensor output = at::empty_like(in, in.options().dtype(at::kByte));
  const float zero = static_cast<float>(zero_point);
  const Affine affine{static_cast<float>(1.0 / scale), -zero, 255.0f - zero, zero};
  if (input.scalar_type() == at::kFloat) {
    quantize<float>(in, output, affine);
  } else {
    quantize<uint16_t>(in, output, affine);  // bf16 as its bits
  }
  return output;
}

template <typename In, typename Out>
void normalize(const at::Tensor& image, const at::Tensor& mean, const at::Tensor& std, at::Tensor& output,
               const Affine& affine) {
  const auto loop = ISA_VARIANT(normalize_rows<In, Out>);
  const int64_t channels = image.size(0), height = image.size(1), width = image.size(2);
  const In* from = static_cast<const In*>(image.data_ptr());
  const int64_t strides[3] = {image.stride(0), image.stride(1), image.stride(2)};
  Out* to = static_cast<Out*>(output.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, channels * width));  // rows
  at::parallel_for(0, height, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(channels * width);
    loop(from, strides, mean.data_ptr<float>(), std.data_ptr<float>(), to, channels, width, output.stride(0), affine,
         scratch.data(), begin, end);
  });
}

template <typename In>
void normalize_into(const at::Tensor& image, const at::Tensor& mean, const at::Tensor& std, at::Tensor& output,
                    const Affine& affine) {
  switch (output.scalar_type()) {
    case at::kFloat:
      return normalize<In, float>(image, mean, std, output, affine);
    case at::kBFloat16:
      return normalize<In, uint16_t>(image, mean, std, output, affine);  // bf16 as its bits
    default:
      return normalize<In, uint8_t>(image, mean, std, output, affine);
  }
}

void normalize_image(const at::Tensor& image, const at::Tensor& mean_in, const at::Tensor& std_in,
                     at::Tensor& output, double scale, int64_t zero_point) {
  TORCH_CHECK(image.device().is_cpu() && image.dim() == 3 &&
                  (image.scalar_type() == at::kByte || image.scalar_type() == at::kFloat),
              "normalize_image: image must be a (C, H, W) uint8 or float32 CPU tensor, got ", image.scalar_type(),
              " of shape ", image.sizes(), " on ", image.device());
  const int64_t channels = image.size(0);
  TORCH_CHECK(mean_in.numel() == channels && std_in.numel() == channels, "normalize_image: mean and std must have ",
              channels, " values (one a channel), got ", mean_in.numel(), " and ", std_in.numel());
  TORCH_CHECK(output.device().is_cpu() && output.dim() == 3 && output.size(0) == image.size(1) &&
                  output.size(1) == image.size(2) && output.size(2) == channels &&
                  output.stride(2) == 1 && output.stride(1) == channels,
              "normalize_image: output must be an (H, W, C) CPU view of the image's size with its pixels' channels "
              "together (strides (any, C, 1)), got shape ", output.sizes(), " strides ", output.strides());
  TORCH_CHECK(output.scalar_type() == at::kFloat || output.scalar_type() == at::kBFloat16 ||
                  output.scalar_type() == at::kByte,
              "normalize_image: output must be float32, bfloat16 or uint8 (codes), got ", output.scalar_type());
  TORCH_CHECK(scale > 0 && zero_point >= 0 && zero_point <= 255,
              "normalize_image: scale must be positive and zero_point in [0, 255], got ", scale, " and ", zero_point);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), std = std_in.to(at::kFloat).contiguous();
  const float zero = static_cast<float>(zero_point);
  const Affine affine{static_cast<float>(1.0 / scale), -zero, 255.0f - zero, zero};
  // the image read in its own strides (the predictor's are (H, W, C) arrays seen as (C, H, W)), no copy
  if (image.scalar_type() == at::kByte) {
    normalize_into<uint8_t>(image, mean, std, output, affine);
  } else {
    normalize_into<float>(image, mean, std, output, affine);
  }
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(MSDA_LIBRARY, m) {
  m.def("quantize_uint8(Tensor input, float scale, int zero_point) -> Tensor");
  m.def("normalize_image(Tensor image, Tensor mean, Tensor std, Tensor(a!) output, float scale=1.0, "
        "int zero_point=0) -> ()");
}

TORCH_LIBRARY_IMPL(MSDA_LIBRARY, CPU, m) {
  m.impl("quantize_uint8", &sparse_detr::quantize_uint8);
  m.impl("normalize_image", &sparse_detr::normalize_image);
}
