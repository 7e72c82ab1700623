//! Compute precision of the encoders (`train.precision`): fp32, or bf16 by
//! libtorch's autocast (matrix products and convolutions in bf16, reductions and
//! normalisations in fp32, weights and their gradients in fp32), on the CPU and
//! on CUDA alike. The loss head always runs in fp32: the towers are cast back
//! before the exchange.

use tch::{Device, Kind, Tensor};

extern "C" {
    fn contrast_autocast_bf16(cuda: i32, enabled: i32) -> i32;
    fn contrast_flush_denormal(on: i32) -> i32;
}

/// Flush denormal floats to zero on the CPU (`torch.set_flush_denormal`) for
/// this thread and the threads it starts afterwards (libtorch's intra-op pool,
/// created on its first use): products with exp of very negative logits, which
/// a temperature-free loss such as CPC's reaches as training sharpens it, then
/// stay on the fast path. Whether the CPU supports it.
pub fn flush_denormal(on: bool) -> bool {
    // SAFETY: a plain C function (src/autocast.cpp) taking an int, catching every
    // C++ exception; it sets only this thread's floating-point control flags.
    #[allow(unsafe_code)]
    let supported = unsafe { contrast_flush_denormal(i32::from(on)) };
    supported == 1
}

/// Turn bf16 autocast on or off for `device`'s type on this thread; the previous state.
fn set(device: Device, enabled: bool) -> bool {
    let cuda = i32::from(device != Device::Cpu);
    // SAFETY: a plain C function (src/autocast.cpp) taking two ints, catching every
    // C++ exception; it touches only libtorch's thread-local autocast state.
    #[allow(unsafe_code)]
    let previous = unsafe { contrast_autocast_bf16(cuda, i32::from(enabled)) };
    assert!(previous >= 0, "libtorch refused to switch autocast for {device:?}");
    previous == 1
}

/// Run `f` with bf16 autocast for `device` when `bf16`, restoring the previous
/// state afterwards (also when `f` panics).
pub fn autocast<T>(bf16: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !bf16 {
        return f();
    }
    struct Restore(Device, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            set(self.0, self.1);
        }
    }
    let _restore = Restore(device, set(device, true));
    f()
}

/// `x` as fp32 (the loss head's precision), with its graph.
pub fn to_f32(x: &Tensor) -> Tensor {
    if x.kind() == Kind::BFloat16 || x.kind() == Kind::Half {
        x.to_kind(Kind::Float)
    } else {
        x.shallow_clone()
    }
}
