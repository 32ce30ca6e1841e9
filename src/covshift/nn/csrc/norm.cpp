// Python bindings of the fused normalization kernels (norm_kernels.h): dtype dispatch,
// output allocation, and threads from ATen's pool (so torch.set_num_threads applies).
// Loaded by covshift/nn/_native.py with torch.utils.cpp_extension.load at first use.
#include <ATen/FuncTorchTLS.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "norm_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Work below this many elements per thread runs on the calling thread: waking the
// pool costs more than the arithmetic.
constexpr int64_t kGrainElems = 32768;

// A fresh full-size output, with transparent huge pages asked for when it is big.
// First touch of freshly mapped memory costs a page fault per 4 KB page, which at
// these sizes costs more than the normalization itself (a 50 MB output: ~12k faults,
// tens of ms on a VM); with 2 MB pages it is a few dozen. Advisory only: where THP
// is off, or the memory was already touched (reused from the heap), nothing changes.
Tensor empty_output(const Tensor& like) {
  Tensor out = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = out.nbytes();
  if (bytes >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

covshift::ParFor make_par() {
  return [](int64_t n, int64_t unit, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(unit, 1));
    if (n <= grain || at::get_num_threads() == 1) {
      fn(0, n);
      return;
    }
    at::parallel_for(0, n, grain, fn);
  };
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The affine vector in the accumulation dtype, contiguous; `fill` where it is missing.
Tensor affine_or(const OptTensor& t, int64_t n, at::ScalarType acc, double fill) {
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->numel() == n, "covshift native: affine has ", t->numel(), " elements, expected ", n);
    if (t->scalar_type() == acc && t->is_contiguous()) return *t;  // (skip two dispatcher calls)
    return t->to(acc).contiguous();
  }
  return at::full({n}, fill, at::TensorOptions().dtype(acc));
}

// A saved statistic (n values in the accumulation dtype) as a contiguous tensor.
Tensor saved_stat(const Tensor& t, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(t.numel() == n && t.scalar_type() == acc,
              "covshift native: a saved statistic does not match the input");
  return t.contiguous();
}

Tensor mean_or_zeros(const OptTensor& mean, int64_t n, at::ScalarType acc) {
  if (mean.has_value() && mean->defined()) return saved_stat(*mean, n, acc);
  return at::zeros({n}, at::TensorOptions().dtype(acc));
}

void check_input(const Tensor& x, int64_t numel) {
  TORCH_CHECK(x.device().is_cpu(), "covshift native kernels run on the CPU");
  TORCH_CHECK(x.numel() == numel, "covshift native: view does not match the input's size");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "covshift native: input is not dense");
}

// y, mean, rstd, var for the channel kind: x is (A, C, B) in memory (contiguous, or
// channels_last with B = 1). Statistics come back with `stat_shape`.
std::vector<Tensor> channel_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                    int64_t NA, int64_t C, int64_t B, double eps, bool center,
                                    at::IntArrayRef stat_shape) {
  check_input(x, NA * C * B);
  const auto acc = acc_type(x.scalar_type());
  Tensor w = affine_or(weight, C, acc, 1.0), b = affine_or(bias, C, acc, 0.0);
  Tensor y = empty_output(x);
  auto opts = at::TensorOptions().dtype(acc);
  Tensor mean = at::empty(stat_shape, opts), rstd = at::empty(stat_shape, opts),
         var = at::empty(stat_shape, opts);
  const int64_t threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    covshift::channel_forward<scalar_t, A>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), w.const_data_ptr<A>(),
        b.const_data_ptr<A>(), NA, C, B, eps, center, threads, make_par(),
        mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  });
  return {y, center ? mean : Tensor(), rstd, var};
}

// dx, dweight, dbias (undefined where not needed) for the channel kind; `g` has x's
// memory layout. dweight/dbias come back in the accumulation dtype with `param_shape`.
std::vector<Tensor> channel_backward(const Tensor& g, const Tensor& x, const OptTensor& mean,
                                     const Tensor& rstd, const OptTensor& weight, int64_t NA,
                                     int64_t C, int64_t B, bool need_dx, bool need_dw,
                                     bool need_db, at::IntArrayRef param_shape) {
  check_input(x, NA * C * B);
  check_input(g, NA * C * B);
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "covshift native: grad and input dtypes differ");
  const auto acc = acc_type(x.scalar_type());
  const bool center = mean.has_value() && mean->defined();
  Tensor mu = mean_or_zeros(mean, C, acc), rs = saved_stat(rstd, C, acc),
         w = affine_or(weight, C, acc, 1.0);
  auto opts = at::TensorOptions().dtype(acc);
  Tensor dx = need_dx ? empty_output(x) : Tensor();
  Tensor dw = need_dw ? at::empty(param_shape, opts) : Tensor();
  Tensor db = need_db ? at::empty(param_shape, opts) : Tensor();
  const int64_t threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    covshift::channel_backward<scalar_t, A>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<A>(),
        rs.const_data_ptr<A>(), w.const_data_ptr<A>(), NA, C, B, center, threads, make_par(),
        need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        need_dw ? dw.mutable_data_ptr<A>() : nullptr, need_db ? db.mutable_data_ptr<A>() : nullptr);
  });
  return {dx, dw, db};
}

// y, mean, rstd, var for the row kind: x is (R, K) contiguous, affine index
// (r % G) * Cg + k / S of length G * Cg.
std::vector<Tensor> row_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                int64_t R, int64_t K, int64_t G, int64_t Cg, int64_t S, double eps,
                                bool center, at::IntArrayRef stat_shape) {
  check_input(x, R * K);
  TORCH_CHECK(Cg * S == K && R % G == 0, "covshift native: bad row layout");
  const auto acc = acc_type(x.scalar_type());
  Tensor w = affine_or(weight, G * Cg, acc, 1.0), b = affine_or(bias, G * Cg, acc, 0.0);
  Tensor y = empty_output(x);
  auto opts = at::TensorOptions().dtype(acc);
  Tensor mean = at::empty(stat_shape, opts), rstd = at::empty(stat_shape, opts),
         var = at::empty(stat_shape, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    covshift::row_forward<scalar_t, A>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), w.const_data_ptr<A>(),
        b.const_data_ptr<A>(), R, K, G, Cg, S, eps, center, make_par(), mean.mutable_data_ptr<A>(),
        rstd.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  });
  return {y, center ? mean : Tensor(), rstd, var};
}

std::vector<Tensor> row_backward(const Tensor& g, const Tensor& x, const OptTensor& mean,
                                 const Tensor& rstd, const OptTensor& weight, int64_t R, int64_t K,
                                 int64_t G, int64_t Cg, int64_t S, bool need_dx, bool need_dw,
                                 bool need_db, at::IntArrayRef param_shape) {
  check_input(x, R * K);
  check_input(g, R * K);
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "covshift native: grad and input dtypes differ");
  TORCH_CHECK(Cg * S == K && R % G == 0, "covshift native: bad row layout");
  const auto acc = acc_type(x.scalar_type());
  const bool center = mean.has_value() && mean->defined();
  Tensor mu = mean_or_zeros(mean, R, acc), rs = saved_stat(rstd, R, acc),
         w = affine_or(weight, G * Cg, acc, 1.0);
  auto opts = at::TensorOptions().dtype(acc);
  Tensor dx = need_dx ? empty_output(x) : Tensor();
  Tensor dw = need_dw ? at::empty(param_shape, opts) : Tensor();
  Tensor db = need_db ? at::empty(param_shape, opts) : Tensor();
  const int64_t threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    covshift::row_backward<scalar_t, A>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<A>(),
        rs.const_data_ptr<A>(), w.const_data_ptr<A>(), R, K, G, Cg, S, center, threads,
        make_par(), need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        need_dw ? dw.mutable_data_ptr<A>() : nullptr, need_db ? db.mutable_data_ptr<A>() : nullptr);
  });
  return {dx, dw, db};
}

// running += m * (batch * scale - running), in double, for one buffer. Raw loops on
// the buffer's memory (a few ATen calls would cost microseconds on a 100-channel
// layer); the caller bumps the buffers' version counters afterwards, as for any
// in-place write autograd cannot see. Other dtypes or layouts take ATen ops.
void lerp_buffer(Tensor& running, const Tensor& batch, double factor, double scale) {
  const bool raw = running.is_contiguous() && batch.is_contiguous() &&
                   running.numel() == batch.numel() &&
                   (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble) &&
                   (batch.scalar_type() == at::kFloat || batch.scalar_type() == at::kDouble);
  if (!raw) {
    at::NoGradGuard no_grad;
    running.lerp_((batch.reshape(running.sizes()) * scale).to(running.scalar_type()), factor);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "lerp_buffer", [&] {
    using R = scalar_t;
    R* r = running.mutable_data_ptr<R>();
    AT_DISPATCH_FLOATING_TYPES(batch.scalar_type(), "lerp_buffer", [&] {
      const scalar_t* b = batch.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < running.numel(); ++i) {
        const double old = double(r[i]);
        r[i] = R(old + factor * (double(b[i]) * scale - old));
      }
    });
  });
}

// The buffer updates of BatchNorm/InstanceNorm in one call: running_mean toward the
// batch mean, running_var toward the batch variance times `bessel` (M / (M - 1)).
void update_running(const OptTensor& running_mean, const OptTensor& running_var,
                    const Tensor& mean, const Tensor& var, double factor, double bessel) {
  if (running_mean.has_value() && running_mean->defined())
    lerp_buffer(const_cast<Tensor&>(*running_mean), mean, factor, 1.0);
  if (running_var.has_value() && running_var->defined())
    lerp_buffer(const_cast<Tensor&>(*running_var), var, factor, bessel);
}

// ------------------------------------------------------------------------------------
// The autograd node: forward and backward of the whole normalization in C++, so that
// a training step pays no Python on the way back (a Python autograd.Function costs
// more than these kernels on small layers, such as Ioffe's 60 x 100 BatchNorm1d).
// ------------------------------------------------------------------------------------

// A layout, resolved once in Python (covshift/nn/_native.py) and kept as an int64
// tensor, so that calls pass it (and nodes save it) by reference:
//   [kind, channels_last, 5 sizes, then (length, values) for stat_shape (reduced
//    dims dropped), param_shape, view_shape, stat_dims, affine_shape (length 0: no
//    affine)].
// kind 0: channel, sizes (A, C, B, -, -); kind 1: row, sizes (R, K, G, Cg, S).
// The shapes are views into the tensor's memory (no copies): a Config lives no longer
// than the call, or the node, that holds the tensor.
struct Config {
  int64_t kind;
  bool channels_last;
  int64_t s[5];
  at::IntArrayRef stat_shape, param_shape, view_shape, stat_dims, affine_shape;

  explicit Config(const Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), "covshift native: bad config");
    const int64_t* p = t.const_data_ptr<int64_t>();
    const int64_t* end = p + t.numel();
    kind = *p++;
    channels_last = *p++ != 0;
    for (int i = 0; i < 5; ++i) s[i] = *p++;
    for (auto* v :
         {&stat_shape, &param_shape, &view_shape, &stat_dims, &affine_shape}) {
      const int64_t n = *p++;
      *v = at::IntArrayRef(p, n);
      p += n;
    }
    TORCH_CHECK(p == end, "covshift native: bad config");
  }
};

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

Tensor grad_in_layout(const Tensor& g, const Config& c) {
  return c.channels_last ? g.contiguous(g.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                     : at::MemoryFormat::ChannelsLast)
                         : g.contiguous();
}

// The backward as plain, differentiable ATen ops (create_graph=True: double backward).
// The statistics are recomputed from x so that they are functions of x for the second
// differentiation. The same formulas as functional._bwd_graph, element-wise flavour:
//   dx = rstd·(g·w − Σ(g·w)/M − x̂·Σ(g·w·x̂)/M),  dw = Σ g·x̂,  db = Σ g.
std::vector<Tensor> graph_backward(const Tensor& g, const Tensor& x, const Tensor& weight,
                                   const Config& c, double eps, bool center, bool nx, bool nw,
                                   bool nb) {
  const auto acc = acc_type(x.scalar_type());
  double M = 1;
  for (int64_t d : c.stat_dims) M *= double(c.view_shape[d]);
  Tensor xv = x.reshape(c.view_shape).to(acc);
  Tensor xc = center ? xv - xv.sum(c.stat_dims, true) / M : xv;
  Tensor rstd = ((xc * xc).sum(c.stat_dims, true) / M + eps).rsqrt();
  Tensor xhat = xc * rstd;
  Tensor gv = g.reshape(c.view_shape).to(acc);
  std::vector<int64_t> affine_dims;  // where the affine is constant: dw, db sum over them
  for (int64_t d = 0; d < int64_t(c.view_shape.size()); ++d)
    if (c.affine_shape.empty() || c.affine_shape[d] == 1) affine_dims.push_back(d);
  auto psum = [&](const Tensor& t) {
    return (affine_dims.empty() ? t : t.sum(affine_dims)).reshape(c.param_shape);
  };
  Tensor dx, dw, db;
  if (nb) db = psum(gv);
  if (nw) dw = psum(gv * xhat);
  if (nx) {
    Tensor gw = weight.defined() ? gv * weight.to(acc).reshape(c.affine_shape) : gv;
    dx = gw * rstd - (gw * xhat).sum(c.stat_dims, true) * (rstd / M) * xhat;
    if (center) dx = dx - gw.sum(c.stat_dims, true) * (rstd / M);
    dx = dx.to(x.scalar_type()).reshape(x.sizes());
  }
  return {dx, dw, db};
}

// The backward node of `normalize_node`, written as torch's generated nodes are: the
// generic machinery of torch::autograd::Function (a dictionary of IValues for the
// context, bookkeeping of every argument, output wrapping) costs about as much as the
// kernels themselves on a 60 x 100 layer. Its next edges are (x, weight, bias),
// invalid where a tensor is missing or needs no gradient.
struct NormalizeNode : public torch::autograd::Node {
  // x (alive anyway), the weight and two per-statistic vectors; nothing full-size.
  torch::autograd::SavedVariable x_, weight_, mean_, rstd_;
  Tensor cfg_;  // the packed Config (kept by reference, see Config)
  double eps_ = 0;
  bool center_ = false;
  std::optional<at::ScalarType> bias_type_;  // the bias's dtype; none without bias

  std::string name() const override { return "NormalizeNode"; }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    rstd_.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const bool nx = task_should_compute_output(0), nw = task_should_compute_output(1),
               nb = task_should_compute_output(2);
    if (!grads[0].defined() || !(nx || nw || nb)) return {Tensor(), Tensor(), Tensor()};
    const Tensor x = x_.unpack(), weight = weight_.unpack();
    const Config c(cfg_);
    std::vector<Tensor> d;
    if (at::GradMode::is_enabled()) {
      d = graph_backward(grads[0], x, weight, c, eps_, center_, nx, nw, nb);
    } else {
      const Tensor g = grad_in_layout(grads[0], c), mean = mean_.unpack(), rstd = rstd_.unpack();
      const OptTensor w = weight.defined() ? OptTensor(weight) : std::nullopt;
      const OptTensor mu = mean.defined() ? OptTensor(mean) : std::nullopt;
      d = c.kind == 0 ? channel_backward(g, x, mu, rstd, w, c.s[0], c.s[1], c.s[2], nx, nw, nb,
                                         c.param_shape)
                      : row_backward(g, x, mu, rstd, w, c.s[0], c.s[1], c.s[2], c.s[3], c.s[4],
                                     nx, nw, nb, c.param_shape);
    }
    // Parameter gradients in the parameters' dtypes (the compute dtype may be wider).
    if (d[1].defined() && d[1].scalar_type() != weight.scalar_type())
      d[1] = d[1].to(weight.scalar_type());
    if (d[2].defined() && bias_type_.has_value() && d[2].scalar_type() != *bias_type_)
      d[2] = d[2].to(*bias_type_);
    return {nx ? d[0] : Tensor(), nw ? d[1] : Tensor(), nb ? d[2] : Tensor()};
  }
};

// (y, mean, var) with the stat_shape of the config (reduced dims dropped; mean
// undefined without centering); y gets a NormalizeNode when a gradient is wanted,
// mean and var carry none.
std::vector<Tensor> normalize_node(const Tensor& x, const OptTensor& weight,
                                   const OptTensor& bias, const Tensor& cfg, double eps,
                                   bool center) {
  const Config c(cfg);
  std::vector<Tensor> out;
  {
    // The helpers' casts and allocations record nothing (as in generated kernels).
    at::AutoDispatchBelowADInplaceOrView guard;
    out = c.kind == 0 ? channel_forward(x, weight, bias, c.s[0], c.s[1], c.s[2], eps, center,
                                        c.stat_shape)
                      : row_forward(x, weight, bias, c.s[0], c.s[1], c.s[2], c.s[3], c.s[4], eps,
                                    center, c.stat_shape);
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias)) {
    auto node = c10::make_intrusive<NormalizeNode>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->weight_ = torch::autograd::SavedVariable(weight, false);
    node->mean_ = torch::autograd::SavedVariable(out[1], false);
    node->rstd_ = torch::autograd::SavedVariable(out[2], false);
    node->cfg_ = cfg;
    node->eps_ = eps;
    node->center_ = center;
    if (given(bias)) node->bias_type_ = bias->scalar_type();
    torch::autograd::set_history(out[0], node);
  }
  return {out[0], out[1], out[3]};
}

// ------------------------------------------------------------------------------------
// Entry points. Every guard of the native path sits here, in C++ (on small layers,
// the same tests from Python cost microseconds of attribute lookups per call): each
// entry point returns None where a guard fails, before anything is written, and the
// Python caller takes the pure-PyTorch path (which raises torch's errors, if any).
// ------------------------------------------------------------------------------------

// A parameter or buffer the kernels may read: missing, or a plain strided CPU tensor.
bool absent_or_cpu(const OptTensor& t) {
  return !given(t) || (t->is_cpu() && t->layout() == at::kStrided &&
                       !t->unsafeGetTensorImpl()->is_python_dispatch() &&
                       !torch::autograd::isFwGradDefined(t));
}

// Under a functorch transform (vmap, grad, ...) tensors are wrappers without data
// pointers, and torch refuses C++ autograd functions there: the pure path serves.
bool in_functorch_transform() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

// The config that serves x, or nullptr: x a plain tensor (no Python subclass dispatch,
// negative view bit, forward-mode tangent or functorch wrapper), on the CPU, strided,
// non-empty, of a kernel dtype, and either contiguous (`cfg`) or channels_last in
// 4D/5D (`cfg_cl`) where that config exists (it does not where no kernel fits).
const Tensor* pick_config(const Tensor& x, const OptTensor& cfg, const OptTensor& cfg_cl) {
  const auto dt = x.scalar_type();
  if (!x.is_cpu() || x.layout() != at::kStrided || x.numel() == 0 ||
      !(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16) ||
      x.unsafeGetTensorImpl()->is_python_dispatch() || x.is_neg() ||
      torch::autograd::isFwGradDefined(x) || in_functorch_transform())
    return nullptr;
  const OptTensor* c = nullptr;
  if (x.is_contiguous())
    c = &cfg;
  else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
           (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    c = &cfg_cl;
  return c != nullptr && given(*c) ? &**c : nullptr;
}

// After a write through a data pointer, as after any in-place op: autograd must see it
// (a graph that saved the tensor then notices). Inference tensors have no counter.
void bump(const OptTensor& t) {
  if (given(t) && !t->is_inference()) torch::autograd::impl::bump_version(*t);
}

// (y, mean or None, var) through the autograd node, or y alone when `stats` is false
// (two fewer tensors handed to Python); None where the native path does not apply.
// With running buffers given (BatchNorm in training) also: the step counter += 1 when
// given, then the buffers move toward the batch statistics with factor `momentum`, or
// 1 / counter when it is None (the cumulative average; the caller then gives the
// counter); see update_running.
py::object normalize(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& cfg, const OptTensor& cfg_cl, double eps, bool center,
                     bool stats, const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& num_batches, std::optional<double> momentum,
                     double bessel) {
  const Tensor* c = pick_config(x, cfg, cfg_cl);
  if (c == nullptr || !absent_or_cpu(weight) || !absent_or_cpu(bias) ||
      !absent_or_cpu(running_mean) || !absent_or_cpu(running_var))
    return py::none();
  if (given(num_batches) && !(num_batches->is_cpu() && num_batches->scalar_type() == at::kLong &&
                              num_batches->numel() == 1 && num_batches->is_contiguous() &&
                              !num_batches->is_inference()))
    return py::none();
  auto out = normalize_node(x, weight, bias, *c, eps, center);
  if (given(running_mean) || given(running_var)) {
    double factor = momentum.value_or(0.0);
    if (given(num_batches)) {
      int64_t* n = num_batches->mutable_data_ptr<int64_t>();
      *n += 1;
      bump(num_batches);
      if (!momentum.has_value()) factor = 1.0 / double(*n);
    }
    update_running(running_mean, running_var, out[1], out[2], factor, bessel);
    bump(running_mean);
    bump(running_var);
  }
  if (!stats) return py::cast(out[0]);
  return py::make_tuple(out[0], center ? py::cast(out[1]) : py::none(), out[2]);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "covshift's fused CPU normalization kernels";
  m.def("normalize", &normalize);
}
