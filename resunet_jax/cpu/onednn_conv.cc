// oneDNN convolutions as XLA FFI handlers: forward (plain, followed by a bias and a ReLU in the
// same primitive, or by a bias and a summand already in the output buffer, then optionally a
// ReLU), input gradient and kernel gradient of a 2-D convolution with NHWC activations and HWIO
// kernels in float32, any stride and padding.
//
// Built on first use by resunet_jax/kernels/onednn.py (g++, the headers of the onednn-devel-cpu-gomp
// wheel) and registered with jax.ffi for the CPU platform. oneDNN picks its kernel for the shape
// (brgemm convolutions on AVX-512) and keeps the kernels in its own blocked layout; the HWIO
// kernel is reordered into that layout on each call, into a buffer kept for reuse. A
// plan (primitive descriptors and primitives, JIT-compiled by oneDNN) is built once per shape
// and kept.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Shape {
  int64_t n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  auto key() const { return std::make_tuple(n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr); }
  bool operator<(const Shape& b) const { return key() < b.key(); }
};

// Every primitive here takes its scratchpad from the caller (`scratchpad_mode::user`, filled by
// `Scratchpad`). oneDNN's default, library-owned scratchpad lives in storage local to the thread
// that executes, while XLA calls a handler from whichever of its threads is free: with the
// library's scratchpad the AVX2 kernel-gradient kernels (gemm im2col) wrote past their buffer and
// training crashed with SIGSEGV (benchmarks/README.md, "The CPU backend on AVX2").
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A reorder between two layouts of a kernel.
struct Reorder {
  dnnl::reorder::primitive_desc pd;
  dnnl::reorder prim;
};

Reorder MakeReorder(const memory::desc& from, const memory::desc& to) {
  auto& e = Engine();
  Reorder r;
  r.pd = dnnl::reorder::primitive_desc(e, from, e, to, UserScratchpad());
  r.prim = dnnl::reorder(r.pd);
  return r;
}

// A forward primitive with a bias and post-ops, and the reorder of the user's kernel into its layout.
struct Fused {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  bool reorder_needed = false;
  Reorder reorder;
};

struct Plan {
  memory::desc src, wei_user, dst, bias;
  dnnl::convolution_forward::primitive_desc fwd;
  Fused bias_relu;       // + bias, then ReLU
  Fused bias_sum[2];     // + bias + the destination's prior contents, then ReLU when [1]; made on first use
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
  dnnl::convolution_forward fwd_p;
  dnnl::convolution_backward_data bwd_data_p;
  dnnl::convolution_backward_weights bwd_weights_p;
  bool fwd_reorder, bwd_data_reorder, bwd_weights_reorder;
  Reorder fwd_r, bwd_data_r, bwd_weights_r;
  memory::dims strides, pad_l, pad_r;
};

std::mutex mu;
std::map<Shape, std::unique_ptr<Plan>> plans;

Fused MakeFused(const Plan& p, const dnnl::post_ops& post_ops) {
  auto& e = Engine();
  dnnl::primitive_attr attr = UserScratchpad();
  attr.set_post_ops(post_ops);
  memory::desc wei_any(p.wei_user.get_dims(), dt::f32, tag::any);
  Fused f;
  f.pd = dnnl::convolution_forward::primitive_desc(e, dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, p.src, wei_any, p.bias, p.dst,
                                                   p.strides, p.pad_l, p.pad_r, attr);
  f.prim = dnnl::convolution_forward(f.pd);
  f.reorder_needed = f.pd.weights_desc() != p.wei_user;
  if (f.reorder_needed) f.reorder = MakeReorder(p.wei_user, f.pd.weights_desc());
  return f;
}

// The bias-and-sum primitive of a plan, made on first use (`relu`: a ReLU after the sum).
Fused& BiasSum(Plan& p, bool relu) {
  std::lock_guard<std::mutex> lock(mu);
  if (!p.bias_sum[relu].prim) {
    dnnl::post_ops ops;
    ops.append_sum(1.f);
    if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    p.bias_sum[relu] = MakeFused(p, ops);
  }
  return p.bias_sum[relu];
}

Plan& GetPlan(const Shape& s) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(s);
  if (it != plans.end()) return *it->second;
  auto& e = Engine();
  auto p = std::make_unique<Plan>();
  p->src = memory::desc({s.n, s.c, s.h, s.w}, dt::f32, tag::nhwc);
  p->dst = memory::desc({s.n, s.o, s.oh(), s.ow()}, dt::f32, tag::nhwc);
  p->wei_user = memory::desc({s.o, s.c, s.kh, s.kw}, dt::f32, tag::hwio);
  memory::desc wei_any({s.o, s.c, s.kh, s.kw}, dt::f32, tag::any);
  memory::dims strides{s.sh, s.sw}, pad_l{s.pt, s.pl}, pad_r{s.pb, s.pr};
  const dnnl::primitive_attr attr = UserScratchpad();
  p->fwd = dnnl::convolution_forward::primitive_desc(
      e, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, p->src, wei_any,
      memory::desc(), p->dst, strides, pad_l, pad_r, attr);
  p->bwd_data = dnnl::convolution_backward_data::primitive_desc(
      e, dnnl::algorithm::convolution_direct, p->src, wei_any, p->dst, strides, pad_l, pad_r, p->fwd, attr);
  p->bwd_weights = dnnl::convolution_backward_weights::primitive_desc(
      e, dnnl::algorithm::convolution_direct, p->src, wei_any, p->dst, strides, pad_l, pad_r, p->fwd, attr);
  p->bias = memory::desc({s.o}, dt::f32, tag::x);
  p->strides = strides;
  p->pad_l = pad_l;
  p->pad_r = pad_r;
  dnnl::post_ops relu;
  relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  p->bias_relu = MakeFused(*p, relu);
  p->fwd_p = dnnl::convolution_forward(p->fwd);
  p->bwd_data_p = dnnl::convolution_backward_data(p->bwd_data);
  p->bwd_weights_p = dnnl::convolution_backward_weights(p->bwd_weights);
  p->fwd_reorder = p->fwd.weights_desc() != p->wei_user;
  if (p->fwd_reorder) p->fwd_r = MakeReorder(p->wei_user, p->fwd.weights_desc());
  p->bwd_data_reorder = p->bwd_data.weights_desc() != p->wei_user;
  if (p->bwd_data_reorder) p->bwd_data_r = MakeReorder(p->wei_user, p->bwd_data.weights_desc());
  p->bwd_weights_reorder = p->bwd_weights.diff_weights_desc() != p->wei_user;
  if (p->bwd_weights_reorder) p->bwd_weights_r = MakeReorder(p->bwd_weights.diff_weights_desc(), p->wei_user);
  if (std::getenv("RESUNET_ONEDNN_VERBOSE"))
    fprintf(stderr, "conv n%ld %ldx%ld %ld->%ld k%ld: fwd %s bwd_data %s bwd_weights %s reorders %d%d%d\n", s.n, s.h, s.w,
            s.c, s.o, s.kh, p->fwd.impl_info_str(), p->bwd_data.impl_info_str(), p->bwd_weights.impl_info_str(),
            p->fwd_reorder, p->bwd_data_reorder, p->bwd_weights_reorder);
  auto& ref = *p;
  plans.emplace(s, std::move(p));
  return ref;
}

using Dims = ffi::Buffer<ffi::F32>::Dimensions;
Shape MakeShape(Dims x, Dims w, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                int64_t pr) {
  return Shape{x[0], x[1], x[2], x[3], w[3], w[0], w[1], sh, sw, pt, pb, pl, pr};
}

memory Wrap(const memory::desc& d, const void* ptr) { return memory(d, Engine(), const_cast<void*>(ptr)); }

// One primitive at a time. Each runs on all cores (oneDNN's OpenMP threads, one per core); XLA
// runs independent custom calls at once when it can, and two primitives then share the cores
// with twice their threads, each slowed to its slowest thread, and each holding its kernel
// buffer. Measured at U-Net base 64 (training, batch 4): 2.04-2.06 -> 2.11-2.19 images/s,
// peak memory 1059-1071 -> 1002-1028 MB; ResUNet base 16 unchanged (28.4-29.4 either way).
std::mutex execution;

// A buffer kept between calls and grown to the largest request (the callers hold `execution`).
// A buffer allocated for each call (oneDNN's own `memory(desc, engine)`) is mapped afresh by the
// C library when it is large, so every call faulted in and zeroed its pages: at U-Net base 64 the
// reorders of the 1024->1024 kernel (38 MB) took 16-43 ms per call in a training step, against
// 5-8 ms into a buffer touched before.
struct Buffer {
  void* data = nullptr;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = std::aligned_alloc(4096, size);
      if (data == nullptr) {
        size = 0;
        throw std::bad_alloc();
      }
    }
    return data;
  }
};
Buffer kernel_buffer;  // a kernel in oneDNN's layout
Buffer scratch_buffer;  // the scratchpad of the primitive running (one at a time)

void* KernelBuffer(size_t bytes) { return kernel_buffer.Get(bytes); }

// The scratchpad argument of a primitive whose descriptor is `pd`.
memory Scratchpad(const dnnl::primitive_desc_base& pd) {
  const memory::desc desc = pd.scratchpad_desc();
  return memory(desc, Engine(), scratch_buffer.Get(std::max<size_t>(desc.get_size(), 1)));
}

void RunReorder(dnnl::stream& stream, Reorder& r, memory& from, memory& to) {
  r.prim.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, Scratchpad(r.pd)}});
}

// The kernel in the primitive's own layout: `user` itself, or a copy reordered into KernelBuffer.
memory InLayout(dnnl::stream& stream, bool differs, Reorder& reorder, const memory::desc& desc, memory user) {
  if (!differs) return user;
  memory converted(desc, Engine(), KernelBuffer(desc.get_size()));
  RunReorder(stream, reorder, user, converted);
  return converted;
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Plan& p = GetPlan(MakeShape(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
  std::lock_guard<std::mutex> one_at_a_time(execution);
  dnnl::stream stream(Engine());
  memory wei = InLayout(stream, p.fwd_reorder, p.fwd_r, p.fwd.weights_desc(), Wrap(p.wei_user, w.typed_data()));
  p.fwd_p.execute(stream, {{DNNL_ARG_SRC, Wrap(p.src, x.typed_data())},
                           {DNNL_ARG_WEIGHTS, wei},
                           {DNNL_ARG_DST, Wrap(p.dst, y->typed_data())},
                           {DNNL_ARG_SCRATCHPAD, Scratchpad(p.fwd)}});
  stream.wait();
  return ffi::Error::Success();
}

// `fused` on x, w and b, into y.
ffi::Error RunFused(Plan& p, Fused& fused, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                    float* y) {
  std::lock_guard<std::mutex> one_at_a_time(execution);
  dnnl::stream stream(Engine());
  memory wei = InLayout(stream, fused.reorder_needed, fused.reorder, fused.pd.weights_desc(),
                        Wrap(p.wei_user, w.typed_data()));
  fused.prim.execute(stream, {{DNNL_ARG_SRC, Wrap(p.src, x.typed_data())},
                              {DNNL_ARG_WEIGHTS, wei},
                              {DNNL_ARG_BIAS, Wrap(p.bias, b.typed_data())},
                              {DNNL_ARG_DST, Wrap(p.dst, y)},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(fused.pd)}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error ForwardBiasReluImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                               ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                               int64_t pl, int64_t pr) {
  Plan& p = GetPlan(MakeShape(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
  return RunFused(p, p.bias_relu, x, w, b, y->typed_data());
}

// y = conv(x, w) + b + z, then a ReLU when `relu`; y is z's buffer (an input-output alias), or
// gets a copy of z first.
ffi::Error ForwardBiasSumImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                              ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                              int64_t pt, int64_t pb, int64_t pl, int64_t pr, bool relu) {
  Plan& p = GetPlan(MakeShape(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
  if (z.element_count() != y->element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "the summand's shape is not the convolution's output shape");
  if (y->typed_data() != z.typed_data()) std::memcpy(y->typed_data(), z.typed_data(), z.size_bytes());
  return RunFused(p, BiasSum(p, relu), x, w, b, y->typed_data());
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Plan& p = GetPlan(MakeShape(dx->dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
  std::lock_guard<std::mutex> one_at_a_time(execution);
  dnnl::stream stream(Engine());
  memory wei = InLayout(stream, p.bwd_data_reorder, p.bwd_data_r, p.bwd_data.weights_desc(),
                        Wrap(p.wei_user, w.typed_data()));
  p.bwd_data_p.execute(stream, {{DNNL_ARG_DIFF_DST, Wrap(p.dst, dy.typed_data())},
                                {DNNL_ARG_WEIGHTS, wei},
                                {DNNL_ARG_DIFF_SRC, Wrap(p.src, dx->typed_data())},
                                {DNNL_ARG_SCRATCHPAD, Scratchpad(p.bwd_data)}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Plan& p = GetPlan(MakeShape(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr));
  std::lock_guard<std::mutex> one_at_a_time(execution);
  dnnl::stream stream(Engine());
  memory user = Wrap(p.wei_user, dw->typed_data());
  const memory::desc& blocked = p.bwd_weights.diff_weights_desc();
  memory grad = p.bwd_weights_reorder ? memory(blocked, Engine(), KernelBuffer(blocked.get_size())) : user;
  p.bwd_weights_p.execute(stream, {{DNNL_ARG_SRC, Wrap(p.src, x.typed_data())},
                                   {DNNL_ARG_DIFF_DST, Wrap(p.dst, dy.typed_data())},
                                   {DNNL_ARG_DIFF_WEIGHTS, grad},
                                   {DNNL_ARG_SCRATCHPAD, Scratchpad(p.bwd_weights)}});
  if (p.bwd_weights_reorder) RunReorder(stream, p.bwd_weights_r, grad, user);
  stream.wait();
  return ffi::Error::Success();
}

// oneDNN reports failures by throwing; an exception must not cross the FFI boundary.
template <typename F>
ffi::Error Guarded(F&& body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
}

#define CONV_PARAMS int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr
#define CONV_ARGS sh, sw, pt, pb, pl, pr

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, CONV_PARAMS) {
  return Guarded([&] { return ForwardImpl(x, w, y, CONV_ARGS); });
}

ffi::Error ForwardBiasRelu(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                           ffi::ResultBuffer<ffi::F32> y, CONV_PARAMS) {
  return Guarded([&] { return ForwardBiasReluImpl(x, w, b, y, CONV_ARGS); });
}

ffi::Error ForwardBiasSum(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                          ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> y, CONV_PARAMS, int64_t relu) {
  return Guarded([&] { return ForwardBiasSumImpl(x, w, b, z, y, CONV_ARGS, relu != 0); });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                        CONV_PARAMS) {
  return Guarded([&] { return BackwardDataImpl(dy, w, dx, CONV_ARGS); });
}

// `after` (the same convolution's input gradient) is not read: as an operand it orders this call,
// and so the optimizer's in-place update of the kernel, after the last read of the old kernel.
ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> /*after*/,
                           ffi::ResultBuffer<ffi::F32> dw, CONV_PARAMS) {
  return Guarded([&] { return BackwardWeightsImpl(x, dy, dw, CONV_ARGS); });
}

}  // namespace

#define CONV_ATTRS                                                                                             \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")                                                                               \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForwardBiasRelu, ForwardBiasRelu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForwardBiasSum, ForwardBiasSum,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS.Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
