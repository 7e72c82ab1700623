// The one C++ shim of contrast: libtorch's autocast for a device type with a
// chosen dtype. tch exposes only the CUDA switch (with its default fp16); the
// trainer's `train.precision: bf16` needs bf16 on the CPU and on CUDA alike.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

// Turn bf16 autocast on or off for the CPU (`cuda` = 0) or CUDA (1) on this
// thread; returns the previous state (1 on, 0 off), or -1 on failure.
extern "C" int contrast_autocast_bf16(int cuda, int enabled) {
  try {
    const c10::DeviceType device = cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    const bool previous = at::autocast::is_autocast_enabled(device);
    at::autocast::set_autocast_dtype(device, at::kBFloat16);
    at::autocast::set_autocast_enabled(device, enabled != 0);
    if (!enabled) {
      at::autocast::clear_cache();
    }
    return previous ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Flush denormal floats to zero on this thread and on the threads it starts
// later (torch.set_flush_denormal); returns 1 when the CPU supports it, 0 when
// not, -1 on failure.
extern "C" int contrast_flush_denormal(int on) {
  try {
    return at::globalContext().setFlushDenormal(on != 0) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
