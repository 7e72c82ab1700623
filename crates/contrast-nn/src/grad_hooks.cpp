// The second C++ shim of contrast: a hook that runs when libtorch has
// accumulated a parameter's gradient in backward (PyTorch's
// `register_post_accumulate_grad_hook`, which tch does not expose). The engine
// uses it to start a gradient bucket's all-reduce while backward goes on.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>

typedef void (*contrast_ready_fn)(void* ctx, int64_t index);

namespace {
struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(contrast_ready_fn f, void* ctx, int64_t index) : f_(f), ctx_(ctx), index_(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { f_(ctx_, index_); }
  contrast_ready_fn f_;
  void* ctx_;
  int64_t index_;
};
}  // namespace

// Set (f non-null) or clear (f null) the post-accumulate hook of the leaf
// tensor `tensor` (a tch tensor handle, that is a `torch::Tensor*`). When set,
// libtorch calls f(ctx, index) right after it accumulates the tensor's gradient.
// Returns 0, or -1 when libtorch refuses (the tensor is not a leaf that requires grad).
extern "C" int contrast_set_ready_hook(void* tensor, contrast_ready_fn f, void* ctx, int64_t index) {
  try {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    if (!t.is_leaf() || !t.requires_grad()) {
      return -1;
    }
    if (f == nullptr) {
      torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    } else {
      torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<ReadyHook>(f, ctx, index));
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Make `grad` (same shape, dtype and device) the gradient of the leaf `param`:
// backward then accumulates into `grad`'s memory in place (the engine points
// every gradient into one flat buffer per all-reduce bucket, as DDP's
// `gradient_as_bucket_view` does). Returns 0, or -1 when libtorch refuses.
extern "C" int contrast_set_grad(void* param, void* grad) {
  try {
    const at::Tensor& p = *static_cast<at::Tensor*>(param);
    const at::Tensor& g = *static_cast<at::Tensor*>(grad);
    if (!p.is_leaf() || g.sizes() != p.sizes() || g.scalar_type() != p.scalar_type() || g.device() != p.device()) {
      return -1;
    }
    p.mutable_grad() = g;
    return 0;
  } catch (...) {
    return -1;
  }
}
