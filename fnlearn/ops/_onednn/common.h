// What fnlearn's oneDNN FFI handlers share: one CPU engine, one execution at a time, and
// the dtypes they take.
#ifndef FNLEARN_ONEDNN_COMMON_H_
#define FNLEARN_ONEDNN_COMMON_H_

#include <atomic>
#include <mutex>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace fnlearn {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Held around each execution, so oneDNN runs one primitive at a time in the process. Each
// runs on every core (oneDNN's OpenMP team), while XLA:CPU runs independent ops side by
// side on its own threads: two executions at once put two teams on the same cores, which
// measured slower (docs/performance.md, "one oneDNN call at a time"). It counts the
// executions in flight, and the most at once (`FnlearnOnednnPeakExecutions`, for tests).
class Exclusive {
 public:
  Exclusive() : lock_(Mutex()) {
    const int now = ++InFlight();
    int peak = Peak().load();
    while (now > peak && !Peak().compare_exchange_weak(peak, now)) {
    }
  }
  ~Exclusive() { --InFlight(); }
  Exclusive(const Exclusive&) = delete;
  Exclusive& operator=(const Exclusive&) = delete;

  static std::atomic<int>& Peak() {
    static std::atomic<int> peak{0};
    return peak;
  }

 private:
  static std::mutex& Mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::atomic<int>& InFlight() {
    static std::atomic<int> in_flight{0};
    return in_flight;
  }
  std::lock_guard<std::mutex> lock_;
};

inline bool ToDnnl(xla::ffi::DataType type, dnnl::memory::data_type* out) {
  switch (type) {
    case xla::ffi::DataType::F32: *out = dnnl::memory::data_type::f32; return true;
    case xla::ffi::DataType::BF16: *out = dnnl::memory::data_type::bf16; return true;
    default: return false;
  }
}

}  // namespace fnlearn

#endif  // FNLEARN_ONEDNN_COMMON_H_
