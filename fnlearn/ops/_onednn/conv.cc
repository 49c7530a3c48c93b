// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers.
//
// Three handlers, one per direction of a channels-last convolution: forward
// (x, kernel -> y), input gradient (dy, kernel -> dx) and kernel gradient
// (x, dy -> dkernel). Activations are NHWC and kernels HWIO, as JAX holds them;
// oneDNN reads NHWC in place (PyTorch's channels_last) and the kernel is reordered
// into the blocked layout oneDNN picks, which is small next to the convolution.
// Every shape comes from the buffers; strides and padding are attributes.
// Primitives are built once per (direction, shapes, dtypes) and kept (up to 1024):
// building one costs far more than running a small convolution.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Direction : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

using fnlearn::Engine;
using fnlearn::ToDnnl;

// One built convolution: the primitive, and how the user's HWIO kernel maps to
// the primitive's own kernel layout (a reorder before, or after for the kernel grad;
// empty where the layouts agree).
struct Plan {
  dnnl::primitive conv;
  memory::desc user_kernel;    // HWIO
  memory::desc kernel;         // the primitive's layout
  dnnl::primitive reorder;
  memory::desc scratchpad;     // each call brings one of this size
};

// Each direction's (x, kernel, y) execution arguments.
const int kArgs[3][3] = {{DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
                         {DNNL_ARG_DIFF_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_DST},
                         {DNNL_ARG_SRC, DNNL_ARG_DIFF_WEIGHTS, DNNL_ARG_DIFF_DST}};

// Logical oneDNN dims: activations {N, C, H, W}, kernels {O, I, KH, KW}.
Plan Build(Direction dir, const memory::dims& x, const memory::dims& k, const memory::dims& y,
           memory::data_type x_type, memory::data_type k_type, memory::data_type y_type,
           const memory::dims& strides, const memory::dims& pad_lo, const memory::dims& pad_hi) {
  using tag = memory::format_tag;
  auto& engine = Engine();
  memory::desc x_md(x, x_type, tag::nhwc), y_md(y, y_type, tag::nhwc);
  memory::desc k_any(k, k_type, tag::any);
  // Each call brings its scratchpad, so the plans kept hold no memory between calls.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_fpmath_mode(dnnl::fpmath_mode::strict);  // float32 stays float32, whatever the environment says
  Plan plan;
  plan.user_kernel = memory::desc(k, k_type, tag::hwio);
  // The forward descriptor is the hint the backward ones need; forward_training
  // where a backward pass follows, so oneDNN picks kernels that pair with it.
  auto prop = dir == kForward ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
  dnnl::convolution_forward::primitive_desc fwd(engine, prop, dnnl::algorithm::convolution_direct, x_md,
                                                k_any, y_md, strides, pad_lo, pad_hi, attr);
  if (dir == kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.kernel = fwd.weights_desc();
    plan.scratchpad = fwd.scratchpad_desc();
  } else if (dir == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(engine, dnnl::algorithm::convolution_direct, x_md,
                                                        k_any, y_md, strides, pad_lo, pad_hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_data(bwd);
    plan.kernel = bwd.weights_desc();
    plan.scratchpad = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(engine, dnnl::algorithm::convolution_direct,
                                                           x_md, k_any, y_md, strides, pad_lo, pad_hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_weights(bwd);
    plan.kernel = bwd.diff_weights_desc();
    plan.scratchpad = bwd.scratchpad_desc();
  }
  if (plan.kernel != plan.user_kernel) {
    plan.reorder = dir == kKernelGrad ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan.kernel, engine, plan.user_kernel))
                                      : dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan.user_kernel, engine, plan.kernel));
  }
  return plan;
}

// The plans kept, the least recently used going first beyond `capacity` (a server meeting
// many batch sizes); 1024, as oneDNN's own primitive cache. A plan a call is running stays
// alive through its shared_ptr until the call returns.
struct Plans {
  struct Entry {
    std::shared_ptr<const Plan> plan;
    uint64_t last_use;
  };
  std::mutex mutex;
  std::map<std::vector<int64_t>, Entry> entries;
  size_t capacity = 1024;
  uint64_t uses = 0, built = 0;
};

Plans& Cache() {
  static Plans plans;
  return plans;
}

// Drops the least recently used plans until `keep` are left; the caller holds the mutex.
void Shrink(Plans& plans, size_t keep) {
  while (plans.entries.size() > keep) {
    auto oldest = plans.entries.begin();
    for (auto it = plans.entries.begin(); it != plans.entries.end(); ++it) {
      if (it->second.last_use < oldest->second.last_use) oldest = it;
    }
    plans.entries.erase(oldest);
  }
}

std::shared_ptr<const Plan> Lookup(Direction dir, const memory::dims& x, const memory::dims& k, const memory::dims& y,
                                   memory::data_type x_type, memory::data_type k_type, memory::data_type y_type,
                                   const memory::dims& strides, const memory::dims& pad_lo, const memory::dims& pad_hi) {
  std::vector<int64_t> key = {dir, static_cast<int64_t>(x_type), static_cast<int64_t>(k_type),
                              static_cast<int64_t>(y_type)};
  for (const auto* part : {&x, &k, &y, &strides, &pad_lo, &pad_hi}) key.insert(key.end(), part->begin(), part->end());
  Plans& plans = Cache();
  std::lock_guard<std::mutex> lock(plans.mutex);
  auto found = plans.entries.find(key);
  if (found == plans.entries.end()) {
    Shrink(plans, plans.capacity - 1);
    auto plan = std::make_shared<const Plan>(Build(dir, x, k, y, x_type, k_type, y_type, strides, pad_lo, pad_hi));
    found = plans.entries.emplace(key, Plans::Entry{std::move(plan), 0}).first;
    ++plans.built;
  }
  found->second.last_use = ++plans.uses;
  return found->second.plan;
}

memory::dims Activation(ffi::AnyBuffer::Dimensions d) { return {d[0], d[3], d[1], d[2]}; }  // NHWC
memory::dims Kernel(ffi::AnyBuffer::Dimensions d) { return {d[3], d[2], d[0], d[1]}; }      // HWIO

// x: NHWC input, k: HWIO kernel, y: NHWC output, whichever of them is the result.
ffi::Error Run(Direction dir, ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::AnyBuffer y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> padding) {
  if (x.dimensions().size() != 4 || k.dimensions().size() != 4 || y.dimensions().size() != 4 ||
      strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument("fnlearn oneDNN conv: 2-D NHWC/HWIO operands, 2 strides and 4 pads expected");
  }
  memory::data_type x_type, k_type, y_type;
  if (!ToDnnl(x.element_type(), &x_type) || !ToDnnl(k.element_type(), &k_type) ||
      !ToDnnl(y.element_type(), &y_type)) {
    return ffi::Error::InvalidArgument("fnlearn oneDNN conv: float32 or bfloat16 operands expected");
  }
  try {
    memory::dims s = {strides[0], strides[1]}, lo = {padding[0], padding[2]}, hi = {padding[1], padding[3]};
    memory::dims x_dims = Activation(x.dimensions()), k_dims = Kernel(k.dimensions()),
                 y_dims = Activation(y.dimensions());
    const auto plan_ptr = Lookup(dir, x_dims, k_dims, y_dims, x_type, k_type, y_type, s, lo, hi);
    const Plan& plan = *plan_ptr;
    fnlearn::Exclusive exclusive;
    auto& engine = Engine();
    dnnl::stream stream(engine);
    memory x_mem(memory::desc(x_dims, x_type, memory::format_tag::nhwc), engine, x.untyped_data());
    memory y_mem(memory::desc(y_dims, y_type, memory::format_tag::nhwc), engine, y.untyped_data());
    memory user_k(plan.user_kernel, engine, k.untyped_data());
    memory k_mem = plan.reorder ? memory(plan.kernel, engine) : user_k;
    memory scratchpad(plan.scratchpad, engine);
    if (plan.reorder && dir != kKernelGrad) plan.reorder.execute(stream, {{DNNL_ARG_FROM, user_k}, {DNNL_ARG_TO, k_mem}});
    const int* args = kArgs[dir];
    plan.conv.execute(stream, {{args[0], x_mem}, {args[1], k_mem}, {args[2], y_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (plan.reorder && dir == kKernelGrad) plan.reorder.execute(stream, {{DNNL_ARG_FROM, k_mem}, {DNNL_ARG_TO, user_k}});
    stream.wait();
  } catch (const std::exception& e) {  // nothing may unwind into XLA
    return ffi::Error::Internal(std::string("fnlearn oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding) {
  return Run(kForward, x, k, *y, strides, padding);
}

ffi::Error InputGrad(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx,
                     ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  return Run(kInputGrad, *dx, k, dy, strides, padding);
}

ffi::Error KernelGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  return Run(kKernelGrad, x, *dk, dy, strides, padding);
}

}  // namespace

#define FNLEARN_CONV_BINDING                                                                        \
  ffi::Ffi::Bind()                                                                                 \
      .Arg<ffi::AnyBuffer>()                                                                       \
      .Arg<ffi::AnyBuffer>()                                                                       \
      .Ret<ffi::AnyBuffer>()                                                                       \
      .Attr<ffi::Span<const int64_t>>("strides")                                                   \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FnlearnConvForward, Forward, FNLEARN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FnlearnConvInputGrad, InputGrad, FNLEARN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FnlearnConvKernelGrad, KernelGrad, FNLEARN_CONV_BINDING);

// For tests: sets how many plans are kept (at least 1) and returns the previous capacity.
extern "C" int64_t FnlearnConvSetPlanCapacity(int64_t capacity) {
  Plans& plans = Cache();
  std::lock_guard<std::mutex> lock(plans.mutex);
  const auto before = static_cast<int64_t>(plans.capacity);
  plans.capacity = static_cast<size_t>(capacity < 1 ? 1 : capacity);
  Shrink(plans, plans.capacity);
  return before;
}

#ifndef FNLEARN_ONEDNN_SOURCE
#define FNLEARN_ONEDNN_SOURCE "unknown"
#endif

// The hash of the sources this library was built from (setup.py's source_hash), so that
// fnlearn can refuse a library left from older sources.
extern "C" const char* FnlearnOnednnSource() { return FNLEARN_ONEDNN_SOURCE; }

// For tests: the most oneDNN executions (convolutions and batch norms) in flight at once.
extern "C" int FnlearnOnednnPeakExecutions() { return fnlearn::Exclusive::Peak().load(); }

// For tests: how many plans have been built.
extern "C" int64_t FnlearnConvPlansBuilt() {
  Plans& plans = Cache();
  std::lock_guard<std::mutex> lock(plans.mutex);
  return static_cast<int64_t>(plans.built);
}

// 1 where oneDNN runs bfloat16 convolutions natively (AVX512-BF16, AMX, AVX2-VNNI-2) in
// every direction; elsewhere it would emulate them, slower than float32.
extern "C" int FnlearnConvNativeBf16() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto has = [isa](dnnl::cpu_isa want) { return (isa & static_cast<unsigned>(want)) == static_cast<unsigned>(want); };
  if (!has(dnnl::cpu_isa::avx512_core_bf16) && !has(dnnl::cpu_isa::avx2_vnni_2)) return 0;
  const memory::dims x = {1, 8, 4, 4}, k = {8, 8, 3, 3}, s = {1, 1}, pad = {1, 1};
  const auto bf16 = memory::data_type::bf16;
  try {
    for (Direction dir : {kForward, kInputGrad, kKernelGrad}) Build(dir, x, k, x, bf16, bf16, bf16, s, pad, pad);
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}
