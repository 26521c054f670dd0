"""C++ source of the native CPU selective scan (built by ``native_scan``).

It lives in a .py string because Flower's app packages (FABs) keep only Python and config files.
Plain C++20 + OpenMP, no torch headers. The arithmetic matches the PyTorch path
(``selective_scan._torch_forward`` / ``_torch_backward``); ``native_scan`` calls it.
"""

SOURCE = r"""
#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxState = 256;  // mamba-ssm's largest d_state

template <class T> struct Float;
template <> struct Float<float> {
  using Bits = uint32_t;
  static constexpr int mantissa = 23, exponent_bias = 127, min_exponent = -125, exp2_degree = 6, atanh_terms = 5;
};
template <> struct Float<double> {
  using Bits = uint64_t;
  static constexpr int mantissa = 52, exponent_bias = 1023, min_exponent = -1021, exp2_degree = 12, atanh_terms = 11;
};

constexpr double kLn2 = 0.6931471805599453, kLog2e = 1.4426950408889634, kSqrt2 = 1.4142135623730951;

// ln(2)^k / k!: the Taylor coefficients of 2^f.
template <class T> constexpr T exp2_coefficient(int k) { return k == 0 ? T(1) : exp2_coefficient<T>(k - 1) * T(kLn2 / k); }

// 2^x within 3 ulp (measured), written so that loops over it vectorise (std::exp2 does not): 2^k * 2^f
// with k = round(x) (adding 1.5 * 2^mantissa leaves k in the low bits) and a Taylor polynomial for
// |f| <= 1/2. x is clamped to [min_exponent, exponent_bias]: exp(delta * A) of a very large step
// is about 1e-38 (fp32), never a subnormal or inf.
template <class T> inline T exp2_vec(T x) {
  using F = Float<T>;
  using Bits = typename F::Bits;
  constexpr T shift = T(3 * (Bits(1) << (F::mantissa - 1)));
  constexpr Bits bias = Bits(F::exponent_bias) - std::bit_cast<Bits>(shift);
  x = x < T(F::min_exponent) ? T(F::min_exponent) : x;  // maxps / minps with -ffinite-math-only
  x = x > T(F::exponent_bias) ? T(F::exponent_bias) : x;
  const T s = x + shift;
  const T f = x - (s - shift);
  T p = exp2_coefficient<T>(F::exp2_degree);
  for (int k = F::exp2_degree - 1; k >= 0; --k) p = p * f + exp2_coefficient<T>(k);
  return p * std::bit_cast<T>((std::bit_cast<Bits>(s) + bias) << F::mantissa);
}

// log(1 + e) for 0 <= e <= 1 within 4 ulp (measured), vectorisable: w = 1 + e = 2^j m with m in [sqrt(1/2), sqrt(2)],
// log(m) = 2 atanh((m - 1) / (m + 1)) by its series; the last term restores what rounding 1 + e lost
// (to within half an ulp: it should be divided by w, in [1, 2]).
template <class T> inline T log1p_unit(T e) {
  constexpr int terms = Float<T>::atanh_terms;
  const T w = 1 + e;
  const T m = w > T(kSqrt2) ? w * T(0.5) : w;
  const T s = (m - 1) / (m + 1), s2 = s * s;
  T p = T(1) / (2 * terms - 1);
  for (int k = terms - 2; k >= 0; --k) p = p * s2 + T(1) / (2 * k + 1);
  return (w > T(kSqrt2) ? T(kLn2) : T(0)) + 2 * s * p + (e - (w - 1));
}

struct Shape {
  int64_t batch, channels, state, length, groups, chunk;
  bool softplus;
  int64_t chunks() const { return (length + chunk - 1) / chunk; }
};

// A unit of parallel work: one batch element, one group, a contiguous slice of the group's channels.
// Slices of the same group write separate partial dB / dC buffers, so no two threads share an output.
struct Task {
  int64_t batch, group, slice, c0, c1;
  Task(const Shape& s, int64_t slices, int64_t i) {
    const int64_t per_group = s.channels / s.groups, bg = i / slices;
    slice = i % slices;
    group = bg % s.groups;
    batch = bg / s.groups;
    c0 = group * per_group + slice * per_group / slices;
    c1 = group * per_group + (slice + 1) * per_group / slices;
  }
};

// delta = softplus(raw + bias) (or raw + bias) for m steps of one channel, and with kSlope
// slope = d delta / d raw. With e = exp(-|z|): softplus(z) = max(z, 0) + log(1 + e), sigmoid(z) = (1 or e) / (1 + e).
template <class T, bool kSlope>
inline void chunk_deltas(const T* __restrict raw, T bias, bool softplus, int64_t m, T* __restrict delta,
                         T* __restrict slope) {
  if (!softplus) {
    for (int64_t t = 0; t < m; ++t) {
      delta[t] = raw[t] + bias;
      if constexpr (kSlope) slope[t] = 1;
    }
    return;
  }
#pragma omp simd
  for (int64_t t = 0; t < m; ++t) {
    const T z = raw[t] + bias;
    const T e = exp2_vec((z < 0 ? z : -z) * T(kLog2e));
    delta[t] = (z > 0 ? z : T(0)) + log1p_unit(e);
    if constexpr (kSlope) slope[t] = (z < 0 ? e : T(1)) * (T(1) / (1 + e));
  }
}

// The recurrence over m steps of one channel from the state h0: a_t = exp(delta_t A) and
// h_t = a_t h_{t-1} + delta_t u_t B_t, stored at a[t * n], h[t * n].
template <class T, int kN>
inline void chunk_states(const T* __restrict u, const T* __restrict delta, const T* __restrict A,
                         const T* __restrict B, const T* __restrict h0, int64_t n_, int64_t m,
                         T* __restrict a, T* __restrict h) {
  const int64_t n = kN ? kN : n_;
  T A2[kN ? kN : kMaxState];  // exp(delta A) = 2^(delta A log2(e))
  for (int64_t i = 0; i < n; ++i) A2[i] = A[i] * T(kLog2e);
  for (int64_t t = 0; t < m; ++t, a += n, h += n) {
    const T dt = delta[t], x = dt * u[t];
    const T *Bt = B + t * n, *h_prev = t > 0 ? h - n : h0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      a[i] = exp2_vec(dt * A2[i]);
      h[i] = a[i] * h_prev[i] + x * Bt[i];
    }
  }
}

// Per-task scratch: one chunk of one channel.
template <class T> struct Scratch {
  std::vector<T> delta, slope, a, h;
  Scratch(const Shape& s) : delta(s.chunk), slope(s.chunk), a(s.chunk * s.state), h(s.chunk * s.state) {}
};

template <class T, int kN>
void forward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* bias, T* y,
             T* states, Shape s, int64_t slices, int threads) {
  const int64_t n = kN ? kN : s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; ++i) {
    const Task w(s, slices, i);
    const int64_t plane = (w.batch * s.groups + w.group) * s.length * n;
    Scratch<T> buf(s);
    // Chunk by chunk over all the slice's channels: the chunk's B and C rows stay in L1.
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t t0 = k * s.chunk, m = std::min(s.chunk, s.length - t0);
      const T *Bk = B + plane + t0 * n, *Ck = C + plane + t0 * n;
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t r0 = (w.batch * s.channels + c) * s.length + t0;
        T* entering = states + (k * s.batch * s.channels + w.batch * s.channels + c) * n;
        if (k == 0) std::fill_n(entering, n, T(0));
        chunk_deltas<T, false>(delta + r0, bias[c], s.softplus, m, buf.delta.data(), nullptr);
        chunk_states<T, kN>(u + r0, buf.delta.data(), A + c * n, Bk, entering, n, m, buf.a.data(), buf.h.data());
        for (int64_t t = 0; t < m; ++t) {
          const T *ht = buf.h.data() + t * n, *Ct = Ck + t * n;
          T acc = D[c] * u[r0 + t];
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < n; ++j) acc += ht[j] * Ct[j];
          y[r0 + t] = acc;
        }
        if (k + 1 < chunks) std::copy_n(buf.h.data() + (m - 1) * n, n, entering + s.batch * s.channels * n);
      }
    }
  }
}

// Reverse-time pass. With G_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) G_{t+1}:
// dC_t += dy_t h_t, dB_t += delta_t u_t G_t, d(delta_t u_t) = <G_t, B_t>,
// q_t = G_t h_{t-1} exp(delta_t A): ddelta_t += <q_t, A>, dA += delta_t q_t; and the D term.
// Each chunk's delta, a and h are recomputed from the raw delta and the state saved at its start.
template <class T, int kN>
void backward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* bias,
              const T* states, const T* dy, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dbias, Shape s,
              int64_t slices, int threads) {
  const int64_t n = kN ? kN : s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; ++i) {
    const Task w(s, slices, i);
    const int64_t plane = (w.batch * s.groups + w.group) * s.length * n;
    const int64_t partial = (w.slice * s.batch * s.groups + w.batch * s.groups + w.group) * s.length * n;
    Scratch<T> buf(s);
    std::vector<T> carry((w.c1 - w.c0) * n, T(0));
    for (int64_t k = chunks - 1; k >= 0; --k) {
      const int64_t t0 = k * s.chunk, m = std::min(s.chunk, s.length - t0);
      const T *Bk = B + plane + t0 * n, *Ck = C + plane + t0 * n;
      T *dBk = dB + partial + t0 * n, *dCk = dC + partial + t0 * n;
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t row = w.batch * s.channels + c, r0 = row * s.length + t0;
        const T* h0 = states + (k * s.batch * s.channels + row) * n;
        const T* Ac = A + c * n;
        chunk_deltas<T, true>(delta + r0, bias[c], s.softplus, m, buf.delta.data(), buf.slope.data());
        chunk_states<T, kN>(u + r0, buf.delta.data(), Ac, Bk, h0, n, m, buf.a.data(), buf.h.data());
        T g[kN ? kN : kMaxState], dA_acc[kN ? kN : kMaxState];  // g: exp(delta_{t+1} A) G_{t+1}
        T* carried = carry.data() + (c - w.c0) * n;
        std::copy_n(carried, n, g);
        std::fill_n(dA_acc, n, T(0));
        T dD_acc = 0, dbias_acc = 0;
        for (int64_t t = m - 1; t >= 0; --t) {
          const T *a = buf.a.data() + t * n, *ht = buf.h.data() + t * n, *h_prev = t > 0 ? ht - n : h0;
          const T *Bt = Bk + t * n, *Ct = Ck + t * n;
          T *dBt = dBk + t * n, *dCt = dCk + t * n;
          const T dyt = dy[r0 + t], ut = u[r0 + t], dt = buf.delta[t], x = dt * ut;
          T d_x = 0, d_dt = 0;
#pragma omp simd reduction(+ : d_x, d_dt)
          for (int64_t j = 0; j < n; ++j) {
            const T G = dyt * Ct[j] + g[j];
            dCt[j] += dyt * ht[j];
            dBt[j] += x * G;
            d_x += G * Bt[j];
            const T q = G * h_prev[j] * a[j];
            d_dt += q * Ac[j];
            dA_acc[j] += q * dt;
            g[j] = a[j] * G;
          }
          du[r0 + t] = dt * d_x + D[c] * dyt;
          ddelta[r0 + t] = (ut * d_x + d_dt) * buf.slope[t];
          dD_acc += dyt * ut;
          dbias_acc += ddelta[r0 + t];
        }
        std::copy_n(g, n, carried);
        for (int64_t j = 0; j < n; ++j) dA[row * n + j] += dA_acc[j];
        dD[row] += dD_acc;
        dbias[row] += dbias_acc;
      }
    }
  }
}

// n = 16 (VMamba's d_state) gets a kernel with a fixed trip count; any other n the generic one.
template <class Fn> int dispatch(int64_t n, Fn&& fn) {
  if (n > kMaxState) return 1;
  if (n == 16) fn(std::integral_constant<int, 16>{});
  else fn(std::integral_constant<int, 0>{});
  return 0;
}

}  // namespace

// Layouts (all contiguous): u, delta (raw: before bias and softplus), y, dy, du, ddelta (b, d, l);
// A (d, n); B, C (b, g, l, n); D, bias (d); states (l / chunk rounded up, b, d, n);
// dA (b, d, n), dD, dbias (b, d) and dB, dC (slices, b, g, l, n) zeroed by the caller.
// Returns 0, or 1 if n is larger than the kernel supports.
#define SCAN_API(T, suffix)                                                                                    \
  extern "C" int scan_forward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,         \
                                       const T* D, const T* bias, T* y, T* states, int64_t b, int64_t d,       \
                                       int64_t n, int64_t l, int64_t g, int64_t chunk, int64_t slices,         \
                                       int softplus, int threads) {                                            \
    const Shape s{b, d, n, l, g, chunk, softplus != 0};                                                        \
    return dispatch(n, [&](auto N) {                                                                           \
      forward<T, decltype(N)::value>(u, delta, A, B, C, D, bias, y, states, s, slices, threads);               \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" int scan_backward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,        \
                                        const T* D, const T* bias, const T* states, const T* dy, T* du,        \
                                        T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dbias, int64_t b, int64_t d, \
                                        int64_t n, int64_t l, int64_t g, int64_t chunk, int64_t slices,        \
                                        int softplus, int threads) {                                           \
    const Shape s{b, d, n, l, g, chunk, softplus != 0};                                                        \
    return dispatch(n, [&](auto N) {                                                                           \
      backward<T, decltype(N)::value>(u, delta, A, B, C, D, bias, states, dy, du, ddelta, dA, dB, dC, dD,      \
                                      dbias, s, slices, threads);                                              \
    });                                                                                                        \
  }

SCAN_API(float, f32)
SCAN_API(double, f64)
"""
