// Fused CPU kernels of the normalization family, on raw pointers (no torch headers).
//
// Two access patterns cover every layer (see docs/derivations.md, "Native kernels"):
//
//   channel kind  x viewed as (A, C, B) row-major; one statistic per channel c over
//                 its A*B elements (BatchNorm: A = N, B = H*W in NCHW; channels_last
//                 and BatchNorm1d on (N, C) are B = 1, A = N*H*W or N).
//   row kind      x viewed as (R, K) row-major; one statistic per row (LayerNorm,
//                 RMSNorm: K = the trailing dims; GroupNorm/InstanceNorm: a row is one
//                 (n, group) block of K = Cg*S elements in NCHW).
//
// Forward, per statistic:  mu = mean(x), var = mean((x - mu)^2), rstd = 1/sqrt(var + eps),
// y = (x - mu) * (rstd * w) + b. Backward, with g = dL/dy, M elements per statistic:
//   dx = rstd * (g*w - sum(g*w)/M - xhat * sum(g*w*xhat)/M),   xhat = (x - mu) * rstd,
//   dw = sum(g * xhat),  db = sum(g)   (sums over what the affine is constant along).
// RMS normalization (center = false) is the same with mu = 0 and no sum(g*w)/M term.
//
// Element types T: float, double, and 16-bit floats, read and written as T and
// computed in the accumulation type A (float, or double for double). Sums over a
// statistic run in blocks that sit in L1: two passes over a block (its mean, then
// its squared deviations), blocks merged with Chan's formula in double, so a single
// trip to memory gives the two-pass variance (no E[x^2] - E[x]^2 cancellation).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <functional>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace covshift {

// Runs fn(begin, end) over [0, n) split into chunks, on several threads when the
// n units of about `unit` elements each are enough work to pay for it.
using ParFor =
    std::function<void(int64_t n, int64_t unit, const std::function<void(int64_t, int64_t)>& fn)>;

// Elements per block: 8 KB of float, so a block's second pass reads from L1.
constexpr int64_t kBlock = 2048;

// Reductions use GCC/Clang vector extensions: one vector of the widest registers the
// build targets (64 bytes with AVX-512, 32 with AVX/AVX2, else 16: SSE2, NEON) and four
// independent accumulators, so that the additions do not wait on each other's
// latency. (`#pragma omp simd reduction` gives one accumulator, about half the speed on
// rows that sit in cache.) A vector wider than the registers is not split cleanly:
// GCC keeps 64-byte vectors on an AVX2 machine on the stack and moves them through
// general registers, and a pass over a row in L1 then ran at about one float per
// cycle (GroupNorm's forward took twice a copy's time; with 32 bytes, one copy's).
#if defined(__AVX512F__)
constexpr int64_t kVecBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif
template <typename A>
struct Vec {
  typedef A type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t L = kVecBytes / sizeof(A);
};

// Loads L elements at p + i as a vector of A (converting 16-bit floats).
template <typename A>
struct VecLoad {
  int64_t i;
  template <typename U>
  typename Vec<A>::type operator()(const U* p) const {
    typename Vec<A>::type v;
    if constexpr (std::is_same_v<U, A>) {
      std::memcpy(&v, p + i, sizeof(v));
    } else {
      A tmp[Vec<A>::L];
      for (int64_t j = 0; j < Vec<A>::L; ++j) tmp[j] = static_cast<A>(p[i + j]);
      std::memcpy(&v, tmp, sizeof(v));
    }
    return v;
  }
};

// Loads one element at p + i as A (the tails).
template <typename A>
struct ScalarLoad {
  int64_t i;
  template <typename U>
  A operator()(const U* p) const {
    return static_cast<A>(p[i]);
  }
};

// The sum of a vector's lanes, as a tree (log2 L dependent vector adds rather than L
// dependent scalar ones: on rows of a few hundred elements the lane-by-lane sum
// costs as much as the loads).
template <typename V, typename A>
inline A hsum(V v) {
  constexpr int64_t L = Vec<A>::L;
  A t[L];
  std::memcpy(t, &v, sizeof(v));
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

// sum over i in [0, n) of f(load at i); f is generic in the load (vector or scalar).
template <typename A, typename F>
inline A vsum(int64_t n, F f) {
  using V = typename Vec<A>::type;
  constexpr int64_t L = Vec<A>::L;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 += f(VecLoad<A>{i});
    a1 += f(VecLoad<A>{i + L});
    a2 += f(VecLoad<A>{i + 2 * L});
    a3 += f(VecLoad<A>{i + 3 * L});
  }
  for (; i + L <= n; i += L) a0 += f(VecLoad<A>{i});
  A s = hsum<V, A>((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += f(ScalarLoad<A>{i});
  return s;
}

// Two sums in one pass: sf = sum f(load), sh = sum h(load).
template <typename A, typename F, typename H>
inline void vsum2(int64_t n, F f, H h, A& sf, A& sh) {
  using V = typename Vec<A>::type;
  constexpr int64_t L = Vec<A>::L;
  V f0 = {}, f1 = {}, h0 = {}, h1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    f0 += f(VecLoad<A>{i});
    h0 += h(VecLoad<A>{i});
    f1 += f(VecLoad<A>{i + L});
    h1 += h(VecLoad<A>{i + L});
  }
  for (; i + L <= n; i += L) {
    f0 += f(VecLoad<A>{i});
    h0 += h(VecLoad<A>{i});
  }
  sf = hsum<V, A>(f0 + f1);
  sh = hsum<V, A>(h0 + h1);
  for (; i < n; ++i) {
    sf += f(ScalarLoad<A>{i});
    sh += h(ScalarLoad<A>{i});
  }
}

// Count, mean and sum of squared deviations of a stream of blocks (Chan et al. 1979):
// merging (n_a, mu_a, m2_a) and (n_b, mu_b, m2_b) gives mu = mu_a + d * n_b / n and
// m2 = m2_a + m2_b + d^2 * n_a * n_b / n with d = mu_b - mu_a, n = n_a + n_b.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mb, double m2b) {
    if (nb == 0) return;
    if (n == 0) {  // the first block (often the only one: a row of a few hundred)
      n = nb;
      mean = mb;
      m2 = m2b;
      return;
    }
    const double nt = n + nb;
    const double d = mb - mean;
    mean += d * (nb / nt);
    m2 += m2b + d * d * (n * nb / nt);
    n = nt;
  }
};

// Adds the contiguous run x[0:n) to m, in blocks of kBlock: two passes per block.
template <typename T, typename A>
inline void add_run(Moments& m, const T* x, int64_t n, bool center) {
  for (int64_t o = 0; o < n; o += kBlock) {
    const int64_t len = std::min(kBlock, n - o);
    const T* p = x + o;
    A mu = 0;
    if (center) mu = vsum<A>(len, [&](auto ld) { return ld(p); }) / A(len);
    const A q = vsum<A>(len, [&](auto ld) {
      const auto d = ld(p) - mu;
      return d * d;
    });
    m.add(double(len), double(mu), double(q));
  }
}

// y[i] = (x[i] - mu) * scale + shift over a contiguous run.
template <typename T, typename A>
inline void affine_run(const T* x, T* y, int64_t n, A mu, A scale, A shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>((static_cast<A>(x[i]) - mu) * scale + shift);
}

// Asks for the next row while this one is worked on from L1 (its second and third
// passes): the hardware prefetcher alone stalls at each row's start, and short rows
// (LayerNorm's few hundred elements) are then bound by latency, not bandwidth.
// Only rows that fit in L1 with room to spare (longer ones stream on their own).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  if (n * int64_t(sizeof(T)) > 16384) return;
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + i);
}

// Outputs at least this big are written with non-temporal (streaming) stores where
// the kernel supports it: an ordinary store first reads the line it writes into the
// cache (read-for-ownership), a third more memory traffic for an output that cannot
// stay cached anyway. Smaller outputs keep ordinary stores, so that the layer that
// reads them next finds them in L2/L3. (16 MB: half a typical L3; a heuristic.)
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether stream_store exists for A on this build (float, double; x86 with SSE2).
template <typename A>
constexpr bool kCanStream =
#if defined(__SSE2__)
    std::is_same_v<A, float> || std::is_same_v<A, double>;
#else
    false;
#endif

// Stores one vector at p (64-byte aligned), bypassing the cache; only where
// kCanStream<A>. Pair with stream_fence() before the data is handed on.
template <typename A>
inline void stream_store(A* p, typename Vec<A>::type v) {
#if defined(__SSE2__)
  if constexpr (kCanStream<A>) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<A, float>) _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
    else _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
#elif defined(__AVX__)
    if constexpr (std::is_same_v<A, float>) _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
    else _mm256_stream_pd(p, reinterpret_cast<__m256d&>(v));
#else
    constexpr int64_t h = 16 / sizeof(A);  // lanes per 16-byte store
    for (int64_t j = 0; j < Vec<A>::L; j += h) {
      if constexpr (std::is_same_v<A, float>) {
        __m128 q;
        std::memcpy(&q, reinterpret_cast<const A*>(&v) + j, 16);
        _mm_stream_ps(p + j, q);
      } else {
        __m128d q;
        std::memcpy(&q, reinterpret_cast<const A*>(&v) + j, 16);
        _mm_stream_pd(p + j, q);
      }
    }
#endif
    return;
  }
#endif
  std::memcpy(p, &v, sizeof(v));
}

// Orders this thread's streaming stores before anything it does next (they are weakly
// ordered: without the fence another thread could read stale lines).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Rows per tile when a tile of R x C elements is reduced over its rows.
inline int64_t tile_rows(int64_t C) { return std::max<int64_t>(1, std::min<int64_t>(256, kBlock / std::max<int64_t>(C, 1))); }

// Chunks for a reduction over `rows` rows of `width` elements: about 32K elements
// each (smaller work runs on one thread), at most `threads`.
inline int64_t num_chunks(int64_t rows, int64_t width, int64_t threads) {
  const int64_t by_work = (rows * width) / 32768 + 1;
  return std::max<int64_t>(1, std::min({threads, by_work, rows}));
}

// ------------------------------------------------------------------------------------
// Channel kind: (A, C, B), statistics per c.
// ------------------------------------------------------------------------------------

// Per-channel mean and biased variance of x (A, C, B) into mean[C], var[C] (double).
// B > 1: each thread takes whole channels, runs of B elements. B == 1: rows of C,
// reduced tile by tile (vectorized across channels), chunks of rows merged at the end.
template <typename T, typename A>
void channel_moments(const T* x, int64_t NA, int64_t C, int64_t B, bool center, int64_t threads,
                     const ParFor& par, double* mean, double* var) {
  if (B > 1) {
    par(C, NA * B, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments m;
        for (int64_t a = 0; a < NA; ++a) add_run<T, A>(m, x + (a * C + c) * B, B, center);
        mean[c] = center ? m.mean : 0.0;
        var[c] = m.m2 / m.n;
      }
    });
    return;
  }
  const int64_t chunks = num_chunks(NA, C, threads);
  const int64_t per = (NA + chunks - 1) / chunks;
  std::vector<double> cn(chunks, 0.0), cmean(chunks * C, 0.0), cm2(chunks * C, 0.0);
  par(chunks, kBlock * 16, [&](int64_t k0, int64_t k1) {
    std::vector<A> s(C), q(C);
    for (int64_t k = k0; k < k1; ++k) {
      double* pm = cmean.data() + k * C;
      double* pq = cm2.data() + k * C;
      double& pn = cn[k];
      const int64_t r_end = std::min(NA, (k + 1) * per);
      const int64_t tr = tile_rows(C);
      for (int64_t t0 = k * per; t0 < r_end; t0 += tr) {
        const int64_t t1 = std::min(r_end, t0 + tr);
        const A nt = A(t1 - t0);
        std::fill(s.begin(), s.end(), A(0));
        std::fill(q.begin(), q.end(), A(0));
        if (center) {
          for (int64_t r = t0; r < t1; ++r) {
            const T* row = x + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) s[c] += static_cast<A>(row[c]);
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) s[c] /= nt;
        }
        for (int64_t r = t0; r < t1; ++r) {
          const T* row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const A d = static_cast<A>(row[c]) - s[c];
            q[c] += d * d;
          }
        }
        const double n0 = pn, n1 = double(t1 - t0), n = n0 + n1;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = double(s[c]) - pm[c];
          pm[c] += d * (n1 / n);
          pq[c] += double(q[c]) + d * d * (n0 * n1 / n);
        }
        pn = n;
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments m;
    for (int64_t k = 0; k < chunks; ++k) m.add(cn[k], cmean[k * C + c], cm2[k * C + c]);
    mean[c] = center ? m.mean : 0.0;
    var[c] = m.m2 / m.n;
  }
}

// y = (x - mu[c]) * scale[c] + shift[c] over (A, C, B).
template <typename T, typename A>
void channel_apply(const T* x, T* y, int64_t NA, int64_t C, int64_t B, const A* mu, const A* scale,
                   const A* shift, const ParFor& par) {
  if (B > 1) {
    par(NA * C, B, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        affine_run<T, A>(x + i * B, y + i * B, B, mu[c], scale[c], shift[c]);
      }
    });
    return;
  }
  par(NA, C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        yr[c] = static_cast<T>((static_cast<A>(xr[c]) - mu[c]) * scale[c] + shift[c]);
    }
  });
}

// Forward in one trip to memory where it can: with B > 1 each channel's statistics
// and its normalization run back to back, while the channel's A*B elements are still
// in L2. w, b: per-channel (never null; ones/zeros stand in for a missing affine).
template <typename T, typename A>
void channel_forward(const T* x, T* y, const A* w, const A* b, int64_t NA, int64_t C, int64_t B,
                     double eps, bool center, int64_t threads, const ParFor& par, A* mean_out,
                     A* rstd_out, A* var_out) {
  const bool fused = B > 1 && C >= threads;
  std::vector<double> mean(C), var(C);
  if (fused) {
    par(C, NA * B, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments m;
        for (int64_t a = 0; a < NA; ++a) add_run<T, A>(m, x + (a * C + c) * B, B, center);
        const double mu = center ? m.mean : 0.0, v = m.m2 / m.n, rs = 1.0 / std::sqrt(v + eps);
        mean_out[c] = A(mu);
        var_out[c] = A(v);
        rstd_out[c] = A(rs);
        const A scale = A(rs * double(w[c]));
        for (int64_t a = 0; a < NA; ++a) {
          const int64_t o = (a * C + c) * B;
          affine_run<T, A>(x + o, y + o, B, A(mu), scale, b[c]);
        }
      }
    });
    return;
  }
  channel_moments<T, A>(x, NA, C, B, center, threads, par, mean.data(), var.data());
  std::vector<A> mu(C), scale(C);
  for (int64_t c = 0; c < C; ++c) {
    const double rs = 1.0 / std::sqrt(var[c] + eps);
    mean_out[c] = A(mean[c]);
    var_out[c] = A(var[c]);
    rstd_out[c] = A(rs);
    mu[c] = A(mean[c]);
    scale[c] = A(rs * double(w[c]));
  }
  channel_apply<T, A>(x, y, NA, C, B, mu.data(), scale.data(), b, par);
}

// sum(g) and sum(g * (x - m)) over channel c of (A, C, B), B > 1, into s1, s2.
template <typename T, typename A>
inline void plane_grad_sums(const T* g, const T* x, A m, int64_t NA, int64_t C, int64_t B,
                            int64_t c, double& s1, double& s2) {
  s1 = 0;
  s2 = 0;
  for (int64_t a = 0; a < NA; ++a) {
    const int64_t base = (a * C + c) * B;
    for (int64_t o = 0; o < B; o += kBlock) {
      const int64_t len = std::min(kBlock, B - o);
      const T* gp = g + base + o;
      const T* xp = x + base + o;
      A f1, f2;
      vsum2<A>(
          len, [&](auto ld) { return ld(gp); }, [&](auto ld) { return ld(gp) * (ld(xp) - m); }, f1,
          f2);
      s1 += f1;
      s2 += f2;
    }
  }
}

// Per-channel sums sg = sum(g), sgx = sum(g * (x - mu)) (double).
template <typename T, typename A>
void channel_grad_sums(const T* g, const T* x, const A* mu, int64_t NA, int64_t C, int64_t B,
                       int64_t threads, const ParFor& par, double* sg, double* sgx) {
  if (B > 1) {
    par(C, NA * B, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) plane_grad_sums<T, A>(g, x, mu[c], NA, C, B, c, sg[c], sgx[c]);
    });
    return;
  }
  const int64_t chunks = num_chunks(NA, C, threads);
  const int64_t per = (NA + chunks - 1) / chunks;
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  par(chunks, kBlock * 16, [&](int64_t k0, int64_t k1) {
    std::vector<A> t1(C), t2(C);
    for (int64_t k = k0; k < k1; ++k) {
      double* q1 = p1.data() + k * C;
      double* q2 = p2.data() + k * C;
      const int64_t r_end = std::min(NA, (k + 1) * per);
      const int64_t tr = tile_rows(C);
      for (int64_t r0 = k * per; r0 < r_end; r0 += tr) {
        std::fill(t1.begin(), t1.end(), A(0));
        std::fill(t2.begin(), t2.end(), A(0));
        for (int64_t r = r0; r < std::min(r_end, r0 + tr); ++r) {
          const T* gr = g + r * C;
          const T* xr = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const A gv = static_cast<A>(gr[c]);
            t1[c] += gv;
            t2[c] += gv * (static_cast<A>(xr[c]) - mu[c]);
          }
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          q1[c] += double(t1[c]);
          q2[c] += double(t2[c]);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += p1[k * C + c];
      s2 += p2[k * C + c];
    }
    sg[c] = s1;
    sgx[c] = s2;
  }
}

// dx = a[c] * g + bx[c] * (x - mu[c]) + k[c] over (A, C, B).
template <typename T, typename A>
inline void dx_run(const T* g, const T* x, T* dx, int64_t n, A a, A bx, A mu, A k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    dx[i] = static_cast<T>(a * static_cast<A>(g[i]) + bx * (static_cast<A>(x[i]) - mu) + k);
}

// Backward of channel_forward. Per channel, with M = A*B:
//   dw = rstd * sgx, db = sg, dx = a*g + bx*(x - mu) + k where
//   a = rstd*w, bx = -rstd^3 * w * sgx / M, k = -rstd * w * sg / M (0 without centering).
// dw, db, dx may be null when not needed.
template <typename T, typename A>
void channel_backward(const T* g, const T* x, const A* mu, const A* rstd, const A* w, int64_t NA,
                      int64_t C, int64_t B, bool center, int64_t threads, const ParFor& par, T* dx,
                      A* dw, A* db) {
  const double M = double(NA) * double(B);
  auto coefs = [&](int64_t c, double s1, double s2, A& a, A& bx, A& k) {
    const double rs = rstd[c], wc = w[c];
    a = A(rs * wc);
    bx = A(-rs * rs * rs * wc * s2 / M);
    k = center ? A(-rs * wc * s1 / M) : A(0);
  };
  if (B > 1 && C >= threads && dx != nullptr) {
    // Fused per channel: the sums, then dx while the channel's g and x are in L2.
    par(C, NA * B, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s1, s2;
        plane_grad_sums<T, A>(g, x, mu[c], NA, C, B, c, s1, s2);
        if (dw) dw[c] = A(s2 * double(rstd[c]));
        if (db) db[c] = A(s1);
        A a, bx, k;
        coefs(c, s1, s2, a, bx, k);
        for (int64_t i = 0; i < NA; ++i) {
          const int64_t o = (i * C + c) * B;
          dx_run<T, A>(g + o, x + o, dx + o, B, a, bx, mu[c], k);
        }
      }
    });
    return;
  }
  std::vector<double> sg(C), sgx(C);
  channel_grad_sums<T, A>(g, x, mu, NA, C, B, threads, par, sg.data(), sgx.data());
  std::vector<A> av(C), bv(C), kv(C);
  for (int64_t c = 0; c < C; ++c) {
    if (dw) dw[c] = A(sgx[c] * double(rstd[c]));
    if (db) db[c] = A(sg[c]);
    coefs(c, sg[c], sgx[c], av[c], bv[c], kv[c]);
  }
  if (dx == nullptr) return;
  if (B > 1) {
    par(NA * C, B, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        dx_run<T, A>(g + i * B, x + i * B, dx + i * B, B, av[c], bv[c], mu[c], kv[c]);
      }
    });
    return;
  }
  par(NA, C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * C;
      const T* xr = x + r * C;
      T* dr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        dr[c] = static_cast<T>(av[c] * static_cast<A>(gr[c]) +
                               bv[c] * (static_cast<A>(xr[c]) - mu[c]) + kv[c]);
    }
  });
}

// ------------------------------------------------------------------------------------
// Row kind: (R, K), statistics per row. The affine index of element k of row r is
// (r % G) * Cg + k / S with K = Cg * S: LayerNorm/RMSNorm have G = 1, Cg = K, S = 1
// (element-wise affine); GroupNorm has G groups of Cg channels of S = H*W elements;
// InstanceNorm is Cg = 1, G = C.
// ------------------------------------------------------------------------------------

// y = (x - mu) * rs * w + b over a row of K (element-wise affine, S == 1); `stream`
// as in row_dx.
template <typename T, typename A>
inline void row_affine(const T* xr, T* yr, const A* w, const A* b, int64_t K, A mu, A rs,
                       bool stream) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, A> && kCanStream<A>) {
    if (stream) {
      constexpr int64_t L = Vec<A>::L;
      const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(yr) % 64);
      const int64_t head =
          mis % int64_t(sizeof(A)) ? K : std::min(K, (64 - mis) % 64 / int64_t(sizeof(A)));
      for (; k < head; ++k) yr[k] = (xr[k] - mu) * rs * w[k] + b[k];
      for (; k + L <= K; k += L) {
        const VecLoad<A> ld{k};
        stream_store<A>(yr + k, (ld(xr) - mu) * rs * ld(w) + ld(b));
      }
    }
  }
#pragma omp simd
  for (int64_t j = k; j < K; ++j)
    yr[j] = static_cast<T>((static_cast<A>(xr[j]) - mu) * rs * w[j] + b[j]);
}

// Per row: its moments (add_run), then y from L1, the next row prefetched meanwhile
// (measured faster here, unlike in the backward). Outputs of kStreamBytes or more with
// an element-wise affine (S == 1) are written with streaming stores (row_affine).
template <typename T, typename A>
void row_forward(const T* x, T* y, const A* w, const A* b, int64_t R, int64_t K, int64_t G,
                 int64_t Cg, int64_t S, double eps, bool center, const ParFor& par, A* mean_out,
                 A* rstd_out, A* var_out) {
  const bool stream = S == 1 && R * K * int64_t(sizeof(T)) >= kStreamBytes;
  par(R, K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * K;
      T* yr = y + r * K;
      if (r + 1 < r1) prefetch_row(xr + K, K);
      Moments m;
      add_run<T, A>(m, xr, K, center);
      const double v = m.m2 / m.n, rs = 1.0 / std::sqrt(v + eps);
      const A mu = A(center ? m.mean : 0.0), rsa = A(rs);
      mean_out[r] = mu;
      var_out[r] = A(v);
      rstd_out[r] = rsa;
      const int64_t base = (r % G) * Cg;
      if (S == 1) {
        row_affine<T, A>(xr, yr, w + base, b + base, K, mu, rsa, stream);
      } else {
        for (int64_t j = 0; j < Cg; ++j)
          affine_run<T, A>(xr + j * S, yr + j * S, S, mu, rsa * w[base + j], b[base + j]);
      }
    }
    if (stream) stream_fence();
  });
}

// Pass 1 of a row's backward (S == 1), the one that streams g and x in from memory:
//   a1 = sum(g*w), a2 = sum(g*w*(x - m)), and with Acc the affine partials
//   tw[k] += g*(x - m)*rs, tb[k] += g.
// Everything but dx is done here, where the loads keep the core waiting anyway; the
// row then sits in L1 for pass 2 (row_dx). Two accumulators per sum (a row of a few
// hundred elements is too short for four to pay).
template <bool Acc, typename T, typename A>
inline void row_grad_pass(const T* gr, const T* xr, const A* w, int64_t K, A m, A rs, A* tw, A* tb,
                          A& a1, A& a2) {
  using V = typename Vec<A>::type;
  constexpr int64_t L = Vec<A>::L;
  V s0 = {}, s1 = {}, q0 = {}, q1 = {};
  auto step = [&](int64_t k, V& s, V& q) {
    const VecLoad<A> ld{k};
    const V gv = ld(gr), xc = ld(xr) - m, gw = gv * ld(w);
    s += gw;
    q += gw * xc;
    if constexpr (Acc) {
      const V t = ld(tw) + gv * (xc * rs), u = ld(tb) + gv;
      std::memcpy(tw + k, &t, sizeof(V));
      std::memcpy(tb + k, &u, sizeof(V));
    }
  };
  int64_t k = 0;
  for (; k + 2 * L <= K; k += 2 * L) {
    step(k, s0, q0);
    step(k + L, s1, q1);
  }
  for (; k + L <= K; k += L) step(k, s0, q0);
  a1 = hsum<V, A>(s0 + s1);
  a2 = hsum<V, A>(q0 + q1);
  for (; k < K; ++k) {
    const A gv = static_cast<A>(gr[k]), xc = static_cast<A>(xr[k]) - m, gw = gv * w[k];
    a1 += gw;
    a2 += gw * xc;
    if constexpr (Acc) {
      tw[k] += gv * xc * rs;
      tb[k] += gv;
    }
  }
}

// Pass 2 of a row's backward, from L1: dr = rs*w*g + c1 + c2*(x - m). With `stream`
// (T == A, kCanStream) the 64-byte-aligned body is written with streaming stores.
template <typename T, typename A>
inline void row_dx(const T* gr, const T* xr, const A* w, T* dr, int64_t K, A m, A rs, A c1, A c2,
                   bool stream) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, A> && kCanStream<A>) {
    if (stream) {
      using V = typename Vec<A>::type;
      constexpr int64_t L = Vec<A>::L;
      const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(dr) % 64);
      const int64_t head =
          mis % int64_t(sizeof(A)) ? K : std::min(K, (64 - mis) % 64 / int64_t(sizeof(A)));
      for (; k < head; ++k) dr[k] = rs * w[k] * gr[k] + c1 + c2 * (xr[k] - m);
      for (; k + L <= K; k += L) {
        const VecLoad<A> ld{k};
        stream_store<A>(dr + k, rs * ld(w) * ld(gr) + c1 + c2 * (ld(xr) - m));
      }
    }
  }
#pragma omp simd
  for (int64_t j = k; j < K; ++j)
    dr[j] = static_cast<T>(rs * w[j] * static_cast<A>(gr[j]) + c1 +
                           c2 * (static_cast<A>(xr[j]) - m));
}

// Backward of row_forward. Per row, with A1 = sum(g*w), A2 = sum(g*w*(x - mu)):
//   dx = rstd*w*g - rstd*A1/K - (x - mu) * rstd^3 * A2/K      (no A1 term without centering)
// dw[i] = sum over rows of sum_{k -> i} g*(x - mu)*rstd, db[i] = sum of g, accumulated
// per chunk of rows (in tiles of A, flushed to double) and summed at the end.
// S == 1 (LayerNorm, RMSNorm): two passes per row, the first from memory (row_grad_pass:
// every sum), the second from L1 (row_dx). No software prefetch of the next row: on
// rows of a few KB it measured slower than the hardware prefetcher alone.
template <typename T, typename A>
void row_backward(const T* g, const T* x, const A* mu, const A* rstd, const A* w, int64_t R,
                  int64_t K, int64_t G, int64_t Cg, int64_t S, bool center, int64_t threads,
                  const ParFor& par, T* dx, A* dw, A* db) {
  const bool need_p = dw != nullptr || db != nullptr;
  const int64_t P = G * Cg;  // affine length
  const double M = double(K);
  if (S == 1) {
    const int64_t chunks = num_chunks(R, K, threads);
    const int64_t per = (R + chunks - 1) / chunks;
    const bool stream = R * K * int64_t(sizeof(T)) >= kStreamBytes;
    std::vector<double> pw(need_p ? chunks * P : 0, 0.0), pb(need_p ? chunks * P : 0, 0.0);
    par(chunks, kBlock * 16, [&](int64_t k0, int64_t k1) {
      std::vector<A> tw(need_p ? K : 0), tb(need_p ? K : 0);
      for (int64_t ch = k0; ch < k1; ++ch) {
        const int64_t r_end = std::min(R, (ch + 1) * per);
        int64_t in_tile = 0;
        auto flush = [&](int64_t gi) {
          double* qw = pw.data() + ch * P + gi * Cg;
          double* qb = pb.data() + ch * P + gi * Cg;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {
            qw[k] += double(tw[k]);
            qb[k] += double(tb[k]);
            tw[k] = 0;
            tb[k] = 0;
          }
        };
        int64_t tile_g = -1;
        for (int64_t r = ch * per; r < r_end; ++r) {
          const int64_t gi = r % G;
          if (need_p && tile_g != gi) {
            if (tile_g >= 0) flush(tile_g);
            tile_g = gi;
            in_tile = 0;
          }
          const T* gr = g + r * K;
          const T* xr = x + r * K;
          const A* wr = w + gi * Cg;
          const A m = mu[r], rs = rstd[r];
          A a1, a2;
          if (need_p)
            row_grad_pass<true>(gr, xr, wr, K, m, rs, tw.data(), tb.data(), a1, a2);
          else if (dx != nullptr)
            row_grad_pass<false>(gr, xr, wr, K, m, rs, static_cast<A*>(nullptr),
                                 static_cast<A*>(nullptr), a1, a2);
          if (dx != nullptr) {
            const A c1 = center ? A(-double(rs) * double(a1) / M) : A(0);
            const A c2 = A(-double(rs) * double(rs) * double(rs) * double(a2) / M);
            row_dx<T, A>(gr, xr, wr, dx + r * K, K, m, rs, c1, c2, stream);
          }
          if (need_p && ++in_tile >= 64) {
            flush(gi);
            in_tile = 0;
          }
        }
        if (need_p && tile_g >= 0) flush(tile_g);
      }
      if (stream) stream_fence();
    });
    if (need_p) {
      for (int64_t i = 0; i < P; ++i) {
        double s1 = 0, s2 = 0;
        for (int64_t ch = 0; ch < chunks; ++ch) {
          s1 += pw[ch * P + i];
          s2 += pb[ch * P + i];
        }
        if (dw) dw[i] = A(s1);
        if (db) db[i] = A(s2);
      }
    }
    return;
  }
  // S > 1: per (row, channel-in-group) sums over S elements; the affine sums need them
  // kept per row: sg[r, j], sgx[r, j] (R x Cg doubles, small).
  std::vector<double> sg(need_p ? R * Cg : 0), sgx(need_p ? R * Cg : 0);
  par(R, K, [&](int64_t r0, int64_t r1) {
    std::vector<double> s1(Cg), s2(Cg);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = (r % G) * Cg;
      const A m = mu[r];
      const double rs = rstd[r];
      double a1 = 0, a2 = 0;
      for (int64_t j = 0; j < Cg; ++j) {
        const T* gp = g + r * K + j * S;
        const T* xp = x + r * K + j * S;
        double t1 = 0, t2 = 0;
        for (int64_t o = 0; o < S; o += kBlock) {
          const int64_t len = std::min(kBlock, S - o);
          A f1, f2;
          const T* gq = gp + o;
          const T* xq = xp + o;
          vsum2<A>(
              len, [&](auto ld) { return ld(gq); }, [&](auto ld) { return ld(gq) * (ld(xq) - m); },
              f1, f2);
          t1 += f1;
          t2 += f2;
        }
        s1[j] = t1;
        s2[j] = t2;
        a1 += double(w[base + j]) * t1;
        a2 += double(w[base + j]) * t2;
        if (need_p) {
          sg[r * Cg + j] = t1;
          sgx[r * Cg + j] = t2 * rs;
        }
      }
      if (dx == nullptr) continue;
      const A k = center ? A(-rs * a1 / M) : A(0);
      const A bx = A(-rs * rs * rs * a2 / M);
      for (int64_t j = 0; j < Cg; ++j) {
        const int64_t o = r * K + j * S;
        dx_run<T, A>(g + o, x + o, dx + o, S, A(rs * double(w[base + j])), bx, m, k);
      }
    }
  });
  if (!need_p) return;
  const int64_t N = R / G;
  for (int64_t gi = 0; gi < G; ++gi)
    for (int64_t j = 0; j < Cg; ++j) {
      double s1 = 0, s2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = (n * G + gi) * Cg + j;
        s1 += sg[i];
        s2 += sgx[i];
      }
      if (dw) dw[gi * Cg + j] = A(s2);
      if (db) db[gi * Cg + j] = A(s1);
    }
}

}  // namespace covshift
