// What fnlearn's oneDNN FFI handlers share: one CPU engine and the dtypes they take.
#ifndef FNLEARN_ONEDNN_COMMON_H_
#define FNLEARN_ONEDNN_COMMON_H_

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace fnlearn {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline bool ToDnnl(xla::ffi::DataType type, dnnl::memory::data_type* out) {
  switch (type) {
    case xla::ffi::DataType::F32: *out = dnnl::memory::data_type::f32; return true;
    case xla::ffi::DataType::BF16: *out = dnnl::memory::data_type::bf16; return true;
    default: return false;
  }
}

}  // namespace fnlearn

#endif  // FNLEARN_ONEDNN_COMMON_H_
