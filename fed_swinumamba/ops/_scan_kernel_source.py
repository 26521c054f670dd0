"""C++ source of the native CPU selective scan (built by ``native_scan``).

It lives in a .py string because Flower's app packages (FABs) keep only Python and config files.
C++20 + OpenMP with GCC/Clang vector extensions (16-byte vectors, so any x86-64 or ARM compiler of either
family builds it), no torch headers. The arithmetic matches the PyTorch path (``selective_scan._torch_forward`` /
``_torch_backward``); ``native_scan`` calls it.

Where the time goes (swin_umamba_d's scans, n = 16, one core of an AMD EPYC Zen 1, about 55 ns per (b, d, l)
step): about half is the 16 exp(delta A) of every step, computed in the forward and again when the backward
recomputes its chunk; softplus(delta) and its slope about a tenth. Keeping a channel's state in registers,
summing the dot products' lanes once per chunk, a division-free log1p and skipping exp's overflow clamp where
delta * A <= 0 took the rest down (benchmarks/RESULTS.md).
"""

SOURCE = r"""
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxState = 256;  // mamba-ssm's largest d_state

// 16-byte vectors (GCC/Clang vector extensions): 4 floats or 2 doubles. The state dimension n is a multiple of 4
// (the caller pads it), so a time step's n values are n / kLanes whole vectors.
template <class T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  using Bits = uint32_t;
  using Signed = int32_t;
  static constexpr int mantissa = 23, exponent_bias = 127, min_exponent = -125, exp2_degree = 5;
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t I __attribute__((vector_size(16)));
  using Bits = uint64_t;
  using Signed = int64_t;
  static constexpr int mantissa = 52, exponent_bias = 1023, min_exponent = -1021, exp2_degree = 12, atanh_terms = 11;
};
template <class T> using Vec = typename Simd<T>::V;
template <class T> constexpr int64_t kLanes = 16 / sizeof(T);

template <class T> inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T> inline void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }

constexpr double kLn2 = 0.6931471805599453, kLog2e = 1.4426950408889634, kSqrt2 = 1.4142135623730951;

// The polynomial for 2^f on |f| <= 1/2: for float a degree-5 fit at Chebyshev nodes (2.6e-7 relative, one
// multiply-add fewer than Taylor at that accuracy), for double ln(2)^k / k! (Taylor) to degree 12.
constexpr float kExp2Float[] = {1.0000001192092896f, 0.6931471824645996f, 0.2402210682630539f,
                                0.05550327152013779f, 0.009676037356257439f, 0.0013400432653725147f};
template <class T> constexpr T exp2_coefficient(int k) {
  if constexpr (std::is_same_v<T, float>) return kExp2Float[k];
  else return k == 0 ? T(1) : exp2_coefficient<T>(k - 1) * T(kLn2 / k);
}

// 2^x within 3 ulp (measured) for a scalar or a Vec: 2^k * 2^f with k = round(x) (adding 1.5 * 2^mantissa
// leaves k in the low bits) and the polynomial for |f| <= 1/2. x is clamped to [min_exponent, exponent_bias]:
// exp(delta * A) of a very large step is about 1e-38 (fp32), never a subnormal or inf. kNonPositive: the caller
// guarantees x <= 0, and the upper clamp (one of the dozen operations) is skipped.
template <class T, bool kNonPositive = false, class X> inline X exp2_poly(X x) {
  using S = Simd<T>;
  // The bits as integers: unsigned for a scalar; for a Vec signed lanes, to which the signed bias is added.
  using Int = std::conditional_t<std::is_same_v<X, T>, typename S::Bits, typename S::I>;
  constexpr T shift = T(3 * (typename S::Bits(1) << (S::mantissa - 1)));
  constexpr auto bias = typename S::Bits(S::exponent_bias) - std::bit_cast<typename S::Bits>(shift);
  x = x < T(S::min_exponent) ? T(S::min_exponent) : x;
  if constexpr (!kNonPositive) x = x > T(S::exponent_bias) ? T(S::exponent_bias) : x;
  const X s = x + shift;
  const X f = x - (s - shift);
  X p = f * exp2_coefficient<T>(S::exp2_degree) + exp2_coefficient<T>(S::exp2_degree - 1);
  for (int k = S::exp2_degree - 2; k >= 0; --k) p = p * f + exp2_coefficient<T>(k);
  return p * std::bit_cast<X>((std::bit_cast<Int>(s) + std::bit_cast<typename S::Signed>(bias)) << S::mantissa);
}

// log(1 + e) for 0 <= e <= 1, vectorisable. For float e q(e), q of degree 8 fitted at Chebyshev nodes for relative
// error (2.2e-7 measured, no division). For double: w = 1 + e = 2^j m with m in [sqrt(1/2), sqrt(2)],
// log(m) = 2 atanh((m - 1) / (m + 1)) by its series; the last term restores what rounding 1 + e lost
// (to within half an ulp: it should be divided by w, in [1, 2]).
constexpr float kLog1pFloat[] = {0.9999998807907104f, -0.49999162554740906f, 0.3331443667411804f,
                                 -0.24814373254776f,  0.19014495611190796f,  -0.13499100506305695f,
                                 0.07656408846378326f, -0.028619538992643356f, 0.005039820913225412f};
template <class T> inline T log1p_unit(T e) {
  if constexpr (std::is_same_v<T, float>) {
    T q = kLog1pFloat[8];
    for (int k = 7; k >= 0; --k) q = q * e + kLog1pFloat[k];
    return e * q;
  } else {
    constexpr int terms = Simd<T>::atanh_terms;
    const T w = 1 + e;
    const T m = w > T(kSqrt2) ? w * T(0.5) : w;
    const T s = (m - 1) / (m + 1), s2 = s * s;
    T p = T(1) / (2 * terms - 1);
    for (int k = terms - 2; k >= 0; --k) p = p * s2 + T(1) / (2 * k + 1);
    return (w > T(kSqrt2) ? T(kLn2) : T(0)) + 2 * s * p + (e - (w - 1));
  }
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
    const T e = exp2_poly<T, true>((z < 0 ? z : -z) * T(kLog2e));
    delta[t] = (z > 0 ? z : T(0)) + log1p_unit(e);
    if constexpr (kSlope) slope[t] = (z < 0 ? e : T(1)) * (T(1) / (1 + e));
  }
}

// The state dimension as whole vectors: fixed at compile time for n = 16 (VMamba's d_state), so that a
// channel's state lives in registers; any other n at run time.
template <class T, int kN> struct StateVectors {
  static constexpr int64_t size = kN / kLanes<T>;
  StateVectors(int64_t) {}
};
template <class T> struct StateVectors<T, 0> {
  int64_t size;
  StateVectors(int64_t n) : size(n / kLanes<T>) {}
};
template <class T, int kN> using StateArray = Vec<T>[kN ? kN / kLanes<T> : kMaxState / kLanes<T>];

// Runs task(i) for every i < tasks on `threads` OpenMP threads, one task at a time per thread.
struct OpenMpTasks {
  int threads;
  template <class Fn> void operator()(int64_t tasks, Fn&& task) const {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) task(i);
  }
};

// `run(tasks, task)` runs the tasks, in parallel as it sees fit: OpenMP here, an ONNX Runtime thread pool there.
template <class T, int kN, bool kDecays, class Run>
void forward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* bias, T* y,
             T* states, Shape s, int64_t slices, Run&& run) {
  constexpr int64_t W = kLanes<T>;
  const int64_t n = s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
  const StateVectors<T, kN> nv(n);
  run(tasks, [&](int64_t i) {
    const Task w(s, slices, i);
    const int64_t plane = (w.batch * s.groups + w.group) * s.length * n;
    std::vector<T> dt(s.chunk), partial(s.chunk * W);
    // Chunk by chunk over all the slice's channels: the chunk's B and C rows stay in L1.
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t t0 = k * s.chunk, m = std::min(s.chunk, s.length - t0);
      const T *Bk = B + plane + t0 * n, *Ck = C + plane + t0 * n;
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t r0 = (w.batch * s.channels + c) * s.length + t0;
        T* entering = states + (k * s.batch * s.channels + w.batch * s.channels + c) * n;
        if (k == 0) std::fill_n(entering, n, T(0));
        chunk_deltas<T, false>(delta + r0, bias[c], s.softplus, m, dt.data(), nullptr);
        StateArray<T, kN> h, A2;  // exp(delta A) = 2^(delta A log2(e))
        for (int64_t v = 0; v < nv.size; ++v) {
          h[v] = load(entering + v * W);
          A2[v] = load(A + c * n + v * W) * T(kLog2e);
        }
        // h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t; y_t = <C_t, h_t> + D u_t, its lanes summed after the loop.
        for (int64_t t = 0; t < m; ++t) {
          const T dtt = dt[t], x = dtt * u[r0 + t];
          const T *Bt = Bk + t * n, *Ct = Ck + t * n;
          Vec<T> acc = {};
          for (int64_t v = 0; v < nv.size; ++v) {
            h[v] = exp2_poly<T, kDecays>(dtt * A2[v]) * h[v] + x * load(Bt + v * W);
            acc += load(Ct + v * W) * h[v];
          }
          store(partial.data() + t * W, acc);
        }
#pragma omp simd
        for (int64_t t = 0; t < m; ++t) {
          T sum = D[c] * u[r0 + t];
          for (int64_t j = 0; j < W; ++j) sum += partial[t * W + j];
          y[r0 + t] = sum;
        }
        if (k + 1 < chunks)
          for (int64_t v = 0; v < nv.size; ++v) store(entering + s.batch * s.channels * n + v * W, h[v]);
      }
    }
  });
}

// Reverse-time pass. With G_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) G_{t+1}:
// dC_t += dy_t h_t, dB_t += delta_t u_t G_t, d(delta_t u_t) = <G_t, B_t>,
// q_t = G_t h_{t-1} exp(delta_t A): ddelta_t += <q_t, A>, dA += delta_t q_t; and the D term.
// Each chunk's delta, exp(delta A) and h are recomputed from the raw delta and the state saved at its start.
template <class T, int kN, bool kDecays>
void backward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* bias,
              const T* states, const T* dy, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dbias, Shape s,
              int64_t slices, int threads) {
  constexpr int64_t W = kLanes<T>;
  const int64_t n = s.state, chunks = s.chunks(), tasks = s.batch * s.groups * slices;
  const StateVectors<T, kN> nv(n);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; ++i) {
    const Task w(s, slices, i);
    const int64_t plane = (w.batch * s.groups + w.group) * s.length * n;
    const int64_t partial_plane = (w.slice * s.batch * s.groups + w.batch * s.groups + w.group) * s.length * n;
    std::vector<T> dt(s.chunk), slope(s.chunk), a(s.chunk * n), h(s.chunk * n), d_x(s.chunk * W), d_dt(s.chunk * W);
    std::vector<T> carry((w.c1 - w.c0) * n, T(0));  // exp(delta A) G at the start of the chunk after this one
    for (int64_t k = chunks - 1; k >= 0; --k) {
      const int64_t t0 = k * s.chunk, m = std::min(s.chunk, s.length - t0);
      const T *Bk = B + plane + t0 * n, *Ck = C + plane + t0 * n;
      T *dBk = dB + partial_plane + t0 * n, *dCk = dC + partial_plane + t0 * n;
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t row = w.batch * s.channels + c, r0 = row * s.length + t0;
        const T* h0 = states + (k * s.batch * s.channels + row) * n;
        chunk_deltas<T, true>(delta + r0, bias[c], s.softplus, m, dt.data(), slope.data());
        StateArray<T, kN> hv, Av, A2, g, dA_acc;
        for (int64_t v = 0; v < nv.size; ++v) {
          hv[v] = load(h0 + v * W), Av[v] = load(A + c * n + v * W), A2[v] = Av[v] * T(kLog2e);
          g[v] = load(carry.data() + (c - w.c0) * n + v * W), dA_acc[v] = Vec<T>{};
        }
        for (int64_t t = 0; t < m; ++t) {
          const T dtt = dt[t], x = dtt * u[r0 + t];
          for (int64_t v = 0; v < nv.size; ++v) {
            const Vec<T> at = exp2_poly<T, kDecays>(dtt * A2[v]);
            hv[v] = at * hv[v] + x * load(Bk + t * n + v * W);
            store(a.data() + t * n + v * W, at);
            store(h.data() + t * n + v * W, hv[v]);
          }
        }
        for (int64_t t = m - 1; t >= 0; --t) {
          const T dyt = dy[r0 + t], dtt = dt[t], x = dtt * u[r0 + t];
          const T *ht = h.data() + t * n, *h_prev = t > 0 ? ht - n : h0, *at = a.data() + t * n;
          const T *Bt = Bk + t * n, *Ct = Ck + t * n;
          T *dBt = dBk + t * n, *dCt = dCk + t * n;
          Vec<T> px = {}, pd = {};
          for (int64_t v = 0; v < nv.size; ++v) {
            const int64_t o = v * W;
            const Vec<T> G = dyt * load(Ct + o) + g[v], Bv = load(Bt + o);
            store(dCt + o, load(dCt + o) + dyt * load(ht + o));
            store(dBt + o, load(dBt + o) + x * G);
            px += G * Bv;
            const Vec<T> q = G * load(h_prev + o) * load(at + o);
            pd += q * Av[v];
            dA_acc[v] += q * dtt;
            g[v] = load(at + o) * G;
          }
          store(d_x.data() + t * W, px);
          store(d_dt.data() + t * W, pd);
        }
        T dD_acc = 0, dbias_acc = 0;
#pragma omp simd reduction(+ : dD_acc, dbias_acc)
        for (int64_t t = 0; t < m; ++t) {
          T dxt = 0, ddt = 0;
          for (int64_t j = 0; j < W; ++j) dxt += d_x[t * W + j], ddt += d_dt[t * W + j];
          const T dyt = dy[r0 + t], ut = u[r0 + t];
          du[r0 + t] = dt[t] * dxt + D[c] * dyt;
          ddelta[r0 + t] = (ut * dxt + ddt) * slope[t];
          dD_acc += dyt * ut;
          dbias_acc += ddelta[r0 + t];
        }
        for (int64_t v = 0; v < nv.size; ++v) {
          store(carry.data() + (c - w.c0) * n + v * W, g[v]);
          for (int64_t j = 0; j < W; ++j) dA[row * n + v * W + j] += dA_acc[v][j];
        }
        dD[row] += dD_acc;
        dbias[row] += dbias_acc;
      }
    }
  }
}

// n = 16 (VMamba's d_state) gets a kernel with a fixed state size; any other n (a multiple of 4) the generic one.
// With softplus (delta >= 0) and A <= 0 (as in Mamba, A = -exp(A_log)) every delta * A is <= 0: kDecays.
template <class T, class Fn> int dispatch(const T* A, int64_t d, int64_t n, bool softplus, Fn&& fn) {
  if (n > kMaxState || n % 4) return 1;
  const bool decays = softplus && std::all_of(A, A + d * n, [](T a) { return a <= 0; });
  const auto with_state = [&](auto decay) {
    if (n == 16) fn(std::integral_constant<int, 16>{}, decay);
    else fn(std::integral_constant<int, 0>{}, decay);
  };
  if (decays) with_state(std::true_type{});
  else with_state(std::false_type{});
  return 0;
}

}  // namespace

// Layouts (all contiguous): u, delta (raw: before bias and softplus), y, dy, du, ddelta (b, d, l);
// A (d, n); B, C (b, g, l, n); D, bias (d); states (l / chunk rounded up, b, d, n);
// dA (b, d, n), dD, dbias (b, d) and dB, dC (slices, b, g, l, n) zeroed by the caller.
// Returns 0, or 1 if n is larger than the kernel supports or not a multiple of 4.
#define SCAN_API(T, suffix)                                                                                    \
  extern "C" int scan_forward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,         \
                                       const T* D, const T* bias, T* y, T* states, int64_t b, int64_t d,       \
                                       int64_t n, int64_t l, int64_t g, int64_t chunk, int64_t slices,         \
                                       int softplus, int threads) {                                            \
    const Shape s{b, d, n, l, g, chunk, softplus != 0};                                                        \
    return dispatch(A, d, n, s.softplus, [&](auto N, auto decays) {                                           \
      forward<T, decltype(N)::value, decltype(decays)::value>(u, delta, A, B, C, D, bias, y, states, s, slices, \
                                                              OpenMpTasks{threads});                           \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" int scan_backward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,        \
                                        const T* D, const T* bias, const T* states, const T* dy, T* du,        \
                                        T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dbias, int64_t b, int64_t d, \
                                        int64_t n, int64_t l, int64_t g, int64_t chunk, int64_t slices,        \
                                        int softplus, int threads) {                                           \
    const Shape s{b, d, n, l, g, chunk, softplus != 0};                                                        \
    return dispatch(A, d, n, s.softplus, [&](auto N, auto decays) {                                           \
      backward<T, decltype(N)::value, decltype(decays)::value>(u, delta, A, B, C, D, bias, states, dy, du,     \
                                                               ddelta, dA, dB, dC, dD, dbias, s, slices,       \
                                                               threads);                                       \
    });                                                                                                        \
  }

SCAN_API(float, f32)
SCAN_API(double, f64)
"""
