"""C++ source of the native CPU selective scan (built by ``native_scan``).

It lives in a .py string because Flower's app packages (FABs) keep only Python and config files.
Plain C++20 + OpenMP, no torch headers. The arithmetic matches
``selective_scan._torch_scan_forward`` / ``_torch_scan_backward``; see ``native_scan`` for the tensor layouts.
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
  static constexpr int mantissa = 23, exponent_bias = 127, min_exponent = -125, degree = 6;
};
template <> struct Float<double> {
  using Bits = uint64_t;
  static constexpr int mantissa = 52, exponent_bias = 1023, min_exponent = -1021, degree = 12;
};

constexpr double kLn2 = 0.6931471805599453, kLog2e = 1.4426950408889634;

// ln(2)^k / k!: the Taylor coefficients of 2^f.
template <class T> constexpr T exp2_coefficient(int k) { return k == 0 ? T(1) : exp2_coefficient<T>(k - 1) * T(kLn2 / k); }

// 2^x to about 1.5 ulp, written so that loops over it vectorise (std::exp2 does not): 2^k * 2^f with
// k = round(x) (adding 1.5 * 2^mantissa leaves k in the low bits) and a Taylor polynomial for
// |f| <= 1/2. x is clamped to [min_exponent, exponent_bias]: exp(delta * A) of a very large step
// is about 1e-38 (fp32), never a subnormal, inf or NaN.
template <class T> inline T exp2_vec(T x) {
  using F = Float<T>;
  using Bits = typename F::Bits;
  constexpr T shift = T(3 * (Bits(1) << (F::mantissa - 1)));
  constexpr Bits bias = Bits(F::exponent_bias) - std::bit_cast<Bits>(shift);
  x = x < T(F::min_exponent) ? T(F::min_exponent) : x;  // maxps / minps with -ffinite-math-only
  x = x > T(F::exponent_bias) ? T(F::exponent_bias) : x;
  const T s = x + shift;
  const T f = x - (s - shift);
  T p = exp2_coefficient<T>(F::degree);
  for (int k = F::degree - 1; k >= 0; --k) p = p * f + exp2_coefficient<T>(k);
  return p * std::bit_cast<T>((std::bit_cast<Bits>(s) + bias) << F::mantissa);
}

struct Shape {
  int64_t batch, channels, state, length, groups, chunk;
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

// exp(delta A) = 2^(delta A log2(e)): A scaled once per chunk.
template <class T, int kN> struct Log2A {
  T v[kN ? kN : kMaxState];
  Log2A(const T* A, int64_t n) {
    for (int64_t i = 0; i < n; ++i) v[i] = A[i] * T(kLog2e);
  }
};

// One chunk of the recurrence from the state h0 entering it: a_t = exp(delta_t A) and
// h_t = a_t h_{t-1} + delta_t u_t B_t for t in [t0, t1), stored at a[(t - t0) * n], h[(t - t0) * n].
template <class T, int kN>
inline void chunk_states(const T* __restrict u, const T* __restrict delta, const T* __restrict A,
                         const T* __restrict B, const T* __restrict h0, int64_t n_, int64_t t0, int64_t t1,
                         T* __restrict a, T* __restrict h) {
  const int64_t n = kN ? kN : n_;
  const Log2A<T, kN> A2(A, n);
  for (int64_t t = t0; t < t1; ++t, a += n, h += n) {
    const T dt = delta[t], x = dt * u[t];
    const T* Bt = B + t * n;
    const T* h_prev = t > t0 ? h - n : h0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      a[i] = exp2_vec(dt * A2.v[i]);
      h[i] = a[i] * h_prev[i] + x * Bt[i];
    }
  }
}

template <class T, int kN>
void forward(const T* u, const T* delta, const T* A, const T* B, const T* C, T* y, T* states,
             Shape s, int64_t slices, int threads) {
  const int64_t n = kN ? kN : s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; ++i) {
    const Task w(s, slices, i);
    const T *Bg = B + (w.batch * s.groups + w.group) * s.length * n, *Cg = C + (Bg - B);
    // Chunk by chunk over all the slice's channels: the chunk's B and C rows stay in L1.
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t t0 = k * s.chunk, t1 = std::min(t0 + s.chunk, s.length);
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t row = w.batch * s.channels + c, r0 = row * s.length;
        T* entering = states + (k * s.batch * s.channels + row) * n;
        if (k == 0) std::fill_n(entering, n, T(0));
        T h[kN ? kN : kMaxState];
        std::copy_n(entering, n, h);
        const Log2A<T, kN> A2(A + c * n, n);
        for (int64_t t = t0; t < t1; ++t) {
          const T dt = delta[r0 + t], x = dt * u[r0 + t];
          const T *Bt = Bg + t * n, *Ct = Cg + t * n;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < n; ++j) {
            h[j] = exp2_vec(dt * A2.v[j]) * h[j] + x * Bt[j];
            acc += h[j] * Ct[j];
          }
          y[r0 + t] = acc;
        }
        if (k + 1 < chunks) std::copy_n(h, n, entering + s.batch * s.channels * n);
      }
    }
  }
}

// Reverse-time pass. With G_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) G_{t+1}:
// dC_t += dy_t h_t, dB_t += delta_t u_t G_t, d(delta_t u_t) = <G_t, B_t>,
// q_t = G_t h_{t-1} exp(delta_t A): ddelta_t += <q_t, A>, dA += delta_t q_t.
// Each chunk's a and h are recomputed from the state saved at its start.
template <class T, int kN>
void backward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* states, const T* dy,
              T* du, T* ddelta, T* dA, T* dB, T* dC, Shape s, int64_t slices, int threads) {
  const int64_t n = kN ? kN : s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; ++i) {
    const Task w(s, slices, i);
    const int64_t plane = (w.batch * s.groups + w.group) * s.length * n;
    const int64_t partial = (w.slice * s.batch * s.groups + w.batch * s.groups + w.group) * s.length * n;
    const T *Bg = B + plane, *Cg = C + plane;
    T *dBg = dB + partial, *dCg = dC + partial;
    std::vector<T> a_buf(s.chunk * n), h_buf(s.chunk * n), carry((w.c1 - w.c0) * n, T(0));
    T dA_acc[kN ? kN : kMaxState];
    for (int64_t k = chunks - 1; k >= 0; --k) {
      const int64_t t0 = k * s.chunk, t1 = std::min(t0 + s.chunk, s.length);
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t row = w.batch * s.channels + c, r0 = row * s.length;
        const T* h0 = states + (k * s.batch * s.channels + row) * n;
        const T* Ac = A + c * n;
        chunk_states<T, kN>(u + r0, delta + r0, Ac, Bg, h0, n, t0, t1, a_buf.data(), h_buf.data());
        T g[kN ? kN : kMaxState];  // exp(delta_{t+1} A) G_{t+1}
        T* carried = carry.data() + (c - w.c0) * n;
        std::copy_n(carried, n, g);
        std::fill_n(dA_acc, n, T(0));
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const T* a = a_buf.data() + (t - t0) * n;
          const T* ht = h_buf.data() + (t - t0) * n;
          const T* h_prev = t > t0 ? ht - n : h0;
          const T *Bt = Bg + t * n, *Ct = Cg + t * n;
          T *dBt = dBg + t * n, *dCt = dCg + t * n;
          const T dyt = dy[r0 + t], dt = delta[r0 + t], x = dt * u[r0 + t];
          T d_x = 0, d_dt = 0;
#pragma omp simd reduction(+ : d_x, d_dt)
          for (int64_t i = 0; i < n; ++i) {
            const T G = dyt * Ct[i] + g[i];
            dCt[i] += dyt * ht[i];
            dBt[i] += x * G;
            d_x += G * Bt[i];
            const T q = G * h_prev[i] * a[i];
            d_dt += q * Ac[i];
            dA_acc[i] += q * dt;
            g[i] = a[i] * G;
          }
          du[r0 + t] = dt * d_x;
          ddelta[r0 + t] = u[r0 + t] * d_x + d_dt;
        }
        std::copy_n(g, n, carried);
        for (int64_t i = 0; i < n; ++i) dA[row * n + i] += dA_acc[i];
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

// Layouts (all contiguous): u, delta, y, dy, du, ddelta (b, d, l); A (d, n); B, C (b, g, l, n);
// states (l / chunk rounded up, b, d, n); dA (b, d, n), zeroed; dB, dC (slices, b, g, l, n), zeroed.
// Returns 0, or 1 if n is larger than the kernel supports.
#define SCAN_API(T, suffix)                                                                                   \
  extern "C" int scan_forward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C, T* y,  \
                                       T* states, int64_t b, int64_t d, int64_t n, int64_t l, int64_t g,      \
                                       int64_t chunk, int64_t slices, int threads) {                          \
    return dispatch(n, [&](auto N) {                                                                       \
      forward<T, decltype(N)::value>(u, delta, A, B, C, y, states, Shape{b, d, n, l, g, chunk}, slices, threads);              \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" int scan_backward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,       \
                                        const T* states, const T* dy, T* du, T* ddelta, T* dA, T* dB, T* dC,  \
                                        int64_t b, int64_t d, int64_t n, int64_t l, int64_t g, int64_t chunk, \
                                        int64_t slices, int threads) {                                        \
    return dispatch(n, [&](auto N) {                                                                       \
      backward<T, decltype(N)::value>(u, delta, A, B, C, states, dy, du, ddelta, dA, dB, dC, Shape{b, d, n, l, g, chunk},      \
                     slices, threads);                                                                        \
    });                                                                                                       \
  }

SCAN_API(float, f32)
SCAN_API(double, f64)
"""
