// Training-mode batch normalisation for XLA:CPU through oneDNN, as XLA FFI handlers.
//
// Two handlers over a channels-last (M, C) view of the activations (every axis but the
// channels folded into M): the forward (x, scale, shift -> y, mean, variance) and the
// backward (dy, x, mean, variance, scale -> dx, dscale, dshift). x, y, dy and dx are
// float32 or bfloat16; the statistics, scale and shift are float32, and oneDNN computes
// in float32 either way. The variance is the biased one (divided by M), as flax's.
// oneDNN keeps the primitives it builds in its own cache; describing one costs
// microseconds, next to a pass over the activations.
#include <cstdint>
#include <string>
#include <unordered_map>

#include "common.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using fnlearn::Engine;

const auto kFlags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

dnnl::batch_normalization_forward::primitive_desc ForwardDesc(const memory::desc& x, float epsilon) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::batch_normalization_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training, x, x,
                                                           epsilon, kFlags, attr);
}

dnnl::batch_normalization_backward::primitive_desc BackwardDesc(const memory::desc& x, float epsilon) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::batch_normalization_backward::primitive_desc(Engine(), dnnl::prop_kind::backward, x, x, x,
                                                            epsilon, kFlags, ForwardDesc(x, epsilon), attr);
}

// The (M, C) activation descriptor of a buffer, or false where it is not one.
bool Activations(ffi::AnyBuffer buffer, memory::desc* out) {
  memory::data_type type;
  const auto dims = buffer.dimensions();
  if (dims.size() != 2 || !fnlearn::ToDnnl(buffer.element_type(), &type)) return false;
  *out = memory::desc({dims[0], dims[1]}, type, memory::format_tag::nc);
  return true;
}

// A (C) float32 buffer's memory, or false where it is not one.
bool Channels(ffi::AnyBuffer buffer, int64_t channels, memory* out) {
  const auto dims = buffer.dimensions();
  if (dims.size() != 1 || dims[0] != channels || buffer.element_type() != ffi::DataType::F32) return false;
  *out = memory(memory::desc({channels}, memory::data_type::f32, memory::format_tag::a), Engine(),
                buffer.untyped_data());
  return true;
}

// `body()`'s result; an exception (oneDNN reports its errors by them) comes back as an FFI error,
// since nothing may unwind into XLA.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("fnlearn oneDNN batch norm: ") + e.what());
  }
}

// Runs the primitive built from `desc` on `args` and a scratchpad, on a stream of its own, and waits;
// one execution at a time (`Exclusive`).
template <typename Primitive, typename Desc>
ffi::Error Execute(const Desc& desc, std::unordered_map<int, memory> args) {
  fnlearn::Exclusive exclusive;
  dnnl::stream stream(Engine());
  args.insert({DNNL_ARG_SCRATCHPAD, memory(desc.scratchpad_desc(), Engine())});
  Primitive(desc).execute(stream, args);
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BadOperands() {
  return ffi::Error::InvalidArgument(
      "fnlearn oneDNN batch norm: (M, C) float32 or bfloat16 activations and (C) float32 statistics expected");
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> variance, float epsilon) {
  return Guarded([&] {
    memory::desc x_md, y_md;
    memory scale_mem, shift_mem, mean_mem, variance_mem;
    const int64_t channels = x.dimensions().size() == 2 ? x.dimensions()[1] : -1;
    if (!Activations(x, &x_md) || !Activations(*y, &y_md) || x_md != y_md ||
        !Channels(scale, channels, &scale_mem) || !Channels(shift, channels, &shift_mem) ||
        !Channels(*mean, channels, &mean_mem) || !Channels(*variance, channels, &variance_mem)) {
      return BadOperands();
    }
    return Execute<dnnl::batch_normalization_forward>(
        ForwardDesc(x_md, epsilon),
        {{DNNL_ARG_SRC, memory(x_md, Engine(), x.untyped_data())},
         {DNNL_ARG_DST, memory(y_md, Engine(), y->untyped_data())},
         {DNNL_ARG_SCALE, scale_mem}, {DNNL_ARG_SHIFT, shift_mem},
         {DNNL_ARG_MEAN, mean_mem}, {DNNL_ARG_VARIANCE, variance_mem}});
  });
}

ffi::Error Backward(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                    ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dshift, float epsilon) {
  return Guarded([&] {
    memory::desc x_md, dy_md, dx_md;
    memory mean_mem, variance_mem, scale_mem, dscale_mem, dshift_mem;
    const int64_t channels = x.dimensions().size() == 2 ? x.dimensions()[1] : -1;
    if (!Activations(x, &x_md) || !Activations(dy, &dy_md) || !Activations(*dx, &dx_md) || x_md != dy_md ||
        x_md != dx_md || !Channels(mean, channels, &mean_mem) || !Channels(variance, channels, &variance_mem) ||
        !Channels(scale, channels, &scale_mem) || !Channels(*dscale, channels, &dscale_mem) ||
        !Channels(*dshift, channels, &dshift_mem)) {
      return BadOperands();
    }
    return Execute<dnnl::batch_normalization_backward>(
        BackwardDesc(x_md, epsilon),
        {{DNNL_ARG_SRC, memory(x_md, Engine(), x.untyped_data())},
         {DNNL_ARG_DIFF_DST, memory(dy_md, Engine(), dy.untyped_data())},
         {DNNL_ARG_MEAN, mean_mem}, {DNNL_ARG_VARIANCE, variance_mem}, {DNNL_ARG_SCALE, scale_mem},
         {DNNL_ARG_DIFF_SRC, memory(dx_md, Engine(), dx->untyped_data())},
         {DNNL_ARG_DIFF_SCALE, dscale_mem}, {DNNL_ARG_DIFF_SHIFT, dshift_mem}});
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FnlearnBatchNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FnlearnBatchNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon"));

// 1 where oneDNN has jitted kernels (not its generic C++ loops) for both directions of a
// batch norm on `bfloat16` (1) or float32 (0) activations on this CPU, for a channel count
// that is a multiple of 16 (others take the generic loops).
extern "C" int FnlearnBatchNormJitted(int bfloat16) {
  const auto type = bfloat16 ? memory::data_type::bf16 : memory::data_type::f32;
  const memory::desc x({64, 64}, type, memory::format_tag::nc);
  try {
    const auto forward = ForwardDesc(x, 1e-5f);
    const auto backward = BackwardDesc(x, 1e-5f);
    for (const char* impl : {forward.impl_info_str(), backward.impl_info_str()}) {
      if (std::string(impl).rfind("bnorm_jit", 0) != 0) return 0;
    }
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}
