// Train-mode BatchNorm followed by an activation (ELU or tanh) on CPUs, float32, NHWC, and its
// gradient, as XLA FFI handlers (flaxdepth/ops.py's batch_normalize_activation;
// flaxdepth/cpu_kernels.py builds and registers them).
//
// Why: with flaxdepth's own convolutions, XLA's CPU code for this chain is the largest part of an
// elu_bn training step (its ELU after the per-channel scale is not vectorized at some shapes, and
// 4-channel reductions are slow; see benchmarks/BENCHMARKS.md). Here each pass
// over the activations is one vectorized loop: SIMD vectors hold consecutive floats of an image,
// so the lanes' channels repeat with a period of max(C, lanes) floats (C = 1, 2, 4, 8, 16, 32;
// other channel counts take plain loops).
//
// The math is ops.batch_normalize's and the activation's: mean, then the biased variance in a
// second pass, y = act((x - mean) * inv_std * scale + bias), and torch's BatchNorm backward. The
// backward pass keeps only the input (and the statistics): it computes the activation's input u
// again and takes the slope there (ELU: exp(u); tanh: 1 - tanh(u)^2; ops.py takes them from the
// output, a rounding apart), so a scanned layer keeps two activation-sized arrays, its
// convolution's input and output. Sums are per image in float32 vectors, per chunk and over
// chunks (in order) in float64, so the bits do not depend on the number of threads.

#include <array>
#include <cmath>
#include <functional>
#include <iterator>
#include <tuple>
#include <utility>

#include "cpu_common.h"

namespace flaxdepth {
namespace {

constexpr int L = kMaxLanes;
typedef VecOf<L>::type V;
typedef VecOf<L>::mask M;

inline V Splat(float s) { return V{} + s; }
inline V Load(const float* p) { return *reinterpret_cast<const V*>(p); }
inline void Store(float* p, V v) { *reinterpret_cast<V*>(p) = v; }

// x clamped to [-88, 0] (a -0 stays -0): the range of the exponentials below. Lanes with x > 0 are
// computed at 0 and dropped by the callers; below -88 exp(x) underflows float32.
inline V ClampNonPositive(V x) {
  const V t = x > Splat(-88.f) ? x : Splat(-88.f);
  return t > Splat(0.f) ? Splat(0.f) : t;
}

// exp(t) for t in [-88, 0], within a few float32 roundings: t = k ln 2 + r, |r| <= ln 2 / 2
// (Cephes' expf polynomial for exp(r)), times 2^k. 0 at -88 (k = -127), where float32's is 6e-39.
inline V ExpClamped(V t) {
  // t <= 0, so truncating t / ln 2 - 0.5 rounds it to nearest
  const M k = __builtin_convertvector(t * 1.44269504f - 0.5f, M);
  const V kf = __builtin_convertvector(k, V);
  const V r = t - kf * 0.693359375f + kf * 2.12194440e-4f;
  V p = Splat(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  const V exp_r = r + r * r * p + 1.f;
  const M exponent = (k + 127) << 23;  // 2^k as float bits; k in [-127, 0]
  return exp_r * reinterpret_cast<const V&>(exponent);
}

// exp(x) - 1 for the lanes where x <= 0 (ELU's negative side, tanh), within a few float32
// roundings: a Taylor polynomial near 0, where exp(x) - 1 would cancel, else exp(x) - 1; -1 below -88.
inline V Expm1NonPositive(V x) {
  const V t = ClampNonPositive(x);
  V q = Splat(1.f / 40320);  // x + x^2 / 2! + ... + x^8 / 8!: the next term is below 2e-8 for |x| < 0.5
  for (float c : {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f}) q = q * t + c;
  const V small = t * (1.f + t * q);  // t * (...), so that -0 stays -0
  return t > Splat(-0.5f) ? small : ExpClamped(t) - 1.f;
}

// The activations after BatchNorm: the value at u, and the slope at u (the backward pass computes
// u again rather than keeping the output). A NaN stays NaN in both.
struct Elu {
  static V Apply(V u) {
    const V negative = Expm1NonPositive(u);
    return u > Splat(0.f) ? u : (u == u ? negative : u);
  }
  static float Apply(float u) { return u > 0.f ? u : std::expm1(u); }
  // 1 where u > 0, else exp(u), as torch's ELU backward takes it
  static V Slope(V u) { return u > Splat(0.f) ? Splat(1.f) : (u == u ? ExpClamped(ClampNonPositive(u)) : u); }
  static float Slope(float u) { return u > 0.f ? 1.f : std::exp(u); }
};

struct Tanh {
  // tanh(|u|) = -e / (e + 2) with e = exp(-2 |u|) - 1: no cancellation near 0, 1 for large |u|
  static V Apply(V u) {
    const V magnitude = u < Splat(0.f) ? -u : u;
    const V e = Expm1NonPositive(-2.f * magnitude);
    const V t = -e / (e + 2.f);
    return (u == u) & (u != Splat(0.f)) ? (u < Splat(0.f) ? -t : t) : u;  // NaN, -0 and +0 stay as they are
  }
  static float Apply(float u) { return std::tanh(u); }
  // 1 - tanh(u)^2, as torch's Tanh backward takes it (from the output)
  static V Slope(V u) {
    const V t = Apply(u);
    return 1.f - t * t;
  }
  static float Slope(float u) {
    const float t = std::tanh(u);
    return 1.f - t * t;
  }
};

// C's values repeated over a period of P = max(C, L) floats, as NV vectors: the per-channel
// operands of the vector loops (lane j of vector v holds channel (v * L + j) % C).
template <int C>
struct Pattern {
  static constexpr int P = C > L ? C : L, NV = P / L;
  V v[NV];
  explicit Pattern(const float* per_channel) {
    for (int i = 0; i < NV; ++i)
      for (int j = 0; j < L; ++j) v[i][j] = per_channel[(i * L + j) % C];
  }
};

// Per-channel sums of K terms over the floats [0, S) of one image (S a multiple of C), added to
// sums[k * C + c] in float64. `vector_terms(offset, v, terms)` writes the K vectors at `offset`,
// the v-th of its period; `scalar_terms(offset, terms)` the K floats at one offset (for the tail
// shorter than a period).
template <int C, int K, typename VectorTerms, typename ScalarTerms>
void AddImageSums(int64_t S, const VectorTerms& vector_terms, const ScalarTerms& scalar_terms, double* sums) {
  constexpr int P = Pattern<C>::P, NV = Pattern<C>::NV;
  V acc[K][NV] = {};
  int64_t i = 0;
  for (; i + P <= S; i += P)
    for (int v = 0; v < NV; ++v) {
      V terms[K];
      vector_terms(i + v * L, v, terms);
      for (int k = 0; k < K; ++k) acc[k][v] += terms[k];
    }
  float tail[K][C] = {};
  for (; i < S; ++i) {
    float terms[K];
    scalar_terms(i, terms);
    for (int k = 0; k < K; ++k) tail[k][i % C] += terms[k];
  }
  for (int k = 0; k < K; ++k) {
    for (int v = 0; v < NV; ++v)
      for (int j = 0; j < L; ++j) sums[k * C + (v * L + j) % C] += acc[k][v][j];
    for (int c = 0; c < C; ++c) sums[k * C + c] += tail[k][c];
  }
}

// The sums of `image_sums(n, chunk_sums)` over every image, per chunk then over chunks in order:
// sums[k * C + c] for K sums of each channel.
template <typename ImageSums>
std::vector<double> SumOverImages(ffi::ThreadPool& pool, int64_t N, int64_t C, int K, const ImageSums& image_sums) {
  const int64_t chunks = (N + kImagesPerChunk - 1) / kImagesPerChunk;
  std::vector<double> partial(chunks * K * C, 0.0), total(K * C, 0.0);
  ParallelFor(pool, chunks, [&](int64_t c) {
    for (int64_t n = c * kImagesPerChunk; n < std::min(N, (c + 1) * kImagesPerChunk); ++n)
      image_sums(n, partial.data() + c * K * C);
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < K * C; ++i) total[i] += partial[c * K * C + i];
  return total;
}

template <typename Body>
void ForEachImage(ffi::ThreadPool& pool, int64_t N, const Body& body) {
  const int64_t chunks = (N + kImagesPerChunk - 1) / kImagesPerChunk;
  ParallelFor(pool, chunks, [&](int64_t c) {
    for (int64_t n = c * kImagesPerChunk; n < std::min(N, (c + 1) * kImagesPerChunk); ++n) body(n);
  });
}

// The forward pass for C channels (C dividing the period; C = 0: any C, plain loops).
template <int C, typename Act>
void Forward(ffi::ThreadPool& pool, const float* x, const float* scale, const float* bias, float epsilon,
             int64_t N, int64_t S, int64_t channels, float* y, float* mean, float* var) {
  const int64_t count = N * (S / channels);
  std::vector<double> sums;
  if constexpr (C > 0) {
    sums = SumOverImages(pool, N, C, 1, [&](int64_t n, double* out) {
      const float* xn = x + n * S;
      AddImageSums<C, 1>(S, [&](int64_t i, int, V* t) { t[0] = Load(xn + i); }, [&](int64_t i, float* t) { t[0] = xn[i]; },
                         out);
    });
  } else {
    sums = SumOverImages(pool, N, channels, 1, [&](int64_t n, double* out) {
      for (int64_t i = 0; i < S; ++i) out[i % channels] += x[n * S + i];
    });
  }
  for (int64_t c = 0; c < channels; ++c) mean[c] = static_cast<float>(sums[c] / count);
  if constexpr (C > 0) {
    const Pattern<C> m(mean);
    sums = SumOverImages(pool, N, C, 1, [&](int64_t n, double* out) {
      const float* xn = x + n * S;
      AddImageSums<C, 1>(S, [&](int64_t i, int v, V* t) { const V d = Load(xn + i) - m.v[v]; t[0] = d * d; },
                         [&](int64_t i, float* t) { const float d = xn[i] - mean[i % C]; t[0] = d * d; }, out);
    });
  } else {
    sums = SumOverImages(pool, N, channels, 1, [&](int64_t n, double* out) {
      for (int64_t i = 0; i < S; ++i) {
        const float d = x[n * S + i] - mean[i % channels];
        out[i % channels] += d * d;
      }
    });
  }
  std::vector<float> a(channels);  // y = act((x - mean) * a + bias), a = inv_std * scale
  for (int64_t c = 0; c < channels; ++c) {
    var[c] = static_cast<float>(sums[c] / count);
    a[c] = 1.f / std::sqrt(var[c] + epsilon) * scale[c];
  }
  ForEachImage(pool, N, [&](int64_t n) {
    const float* xn = x + n * S;
    float* yn = y + n * S;
    int64_t i = 0;
    if constexpr (C > 0) {
      const Pattern<C> m(mean), s(a.data()), b(bias);
      for (; i + Pattern<C>::P <= S; i += Pattern<C>::P)
        for (int v = 0; v < Pattern<C>::NV; ++v)
          Store(yn + i + v * L, Act::Apply((Load(xn + i + v * L) - m.v[v]) * s.v[v] + b.v[v]));
    }
    for (; i < S; ++i) {
      const int64_t c = i % channels;
      yn[i] = Act::Apply((xn[i] - mean[c]) * a[c] + bias[c]);
    }
  });
}

// The backward pass: grad_x, grad_scale, grad_bias from the output's cotangent g, the input x,
// the statistics and their cotangents (zero when only running statistics use them).
template <int C, typename Act>
void Backward(ffi::ThreadPool& pool, const float* g, const float* x, const float* mean, const float* var,
              const float* scale, const float* bias, const float* grad_mean, const float* grad_var, float epsilon,
              int64_t N, int64_t S, int64_t channels, float* grad_x, float* grad_scale, float* grad_bias) {
  const int64_t count = N * (S / channels);
  std::vector<float> inv_std(channels), a(channels);  // the activation's input: (x - mean) * a + bias, as forward
  for (int64_t c = 0; c < channels; ++c) {
    inv_std[c] = 1.f / std::sqrt(var[c] + epsilon);
    a[c] = inv_std[c] * scale[c];
  }
  // gs = g * slope, the cotangent of the normalized output; sums[c] = sum of gs, sums[C + c] =
  // sum of gs * (x - mean)
  std::vector<double> sums;
  if constexpr (C > 0) {
    const Pattern<C> m(mean), s(a.data()), b(bias);
    sums = SumOverImages(pool, N, C, 2, [&](int64_t n, double* out) {
      const float *gn = g + n * S, *xn = x + n * S;
      AddImageSums<C, 2>(
          S,
          [&](int64_t i, int v, V* t) {
            const V d = Load(xn + i) - m.v[v];
            t[0] = Load(gn + i) * Act::Slope(d * s.v[v] + b.v[v]);
            t[1] = t[0] * d;
          },
          [&](int64_t i, float* t) {
            const float d = xn[i] - mean[i % C];
            t[0] = gn[i] * Act::Slope(d * a[i % C] + bias[i % C]);
            t[1] = t[0] * d;
          },
          out);
    });
  } else {
    sums = SumOverImages(pool, N, channels, 2, [&](int64_t n, double* out) {
      for (int64_t i = n * S; i < (n + 1) * S; ++i) {
        const int64_t c = i % channels;
        const float d = x[i] - mean[c], gs = g[i] * Act::Slope(d * a[c] + bias[c]);
        out[c] += gs;
        out[channels + c] += gs * d;
      }
    });
  }
  // grad_x = (gs - sum_gs / n - (x - mean) * k2) * a + grad_mean / n + (x - mean) * k5
  std::vector<float> k1(channels), k2(channels), k4(channels), k5(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const float sum_gs = static_cast<float>(sums[c]), sum_gsx = static_cast<float>(sums[channels + c]);
    grad_bias[c] = sum_gs;
    grad_scale[c] = sum_gsx * inv_std[c];
    k1[c] = sum_gs / count;
    k2[c] = sum_gsx * inv_std[c] * inv_std[c] / count;
    k4[c] = grad_mean[c] / count;
    k5[c] = grad_var[c] * 2 / count;
  }
  ForEachImage(pool, N, [&](int64_t n) {
    const float *gn = g + n * S, *xn = x + n * S;
    float* out = grad_x + n * S;
    int64_t i = 0;
    if constexpr (C > 0) {
      const Pattern<C> m(mean), s(a.data()), b(bias), p1(k1.data()), p2(k2.data()), p4(k4.data()), p5(k5.data());
      for (; i + Pattern<C>::P <= S; i += Pattern<C>::P)
        for (int v = 0; v < Pattern<C>::NV; ++v) {
          const int64_t o = i + v * L;
          const V d = Load(xn + o) - m.v[v];
          const V gs = Load(gn + o) * Act::Slope(d * s.v[v] + b.v[v]);
          Store(out + o, (gs - p1.v[v] - d * p2.v[v]) * s.v[v] + p4.v[v] + d * p5.v[v]);
        }
    }
    for (; i < S; ++i) {
      const int64_t c = i % channels;
      const float d = xn[i] - mean[c], gs = gn[i] * Act::Slope(d * a[c] + bias[c]);
      out[i] = (gs - k1[c] - d * k2[c]) * a[c] + k4[c] + d * k5[c];
    }
  });
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> other, const char* what) {
  if (other.size() != x.size() || !std::equal(x.begin(), x.end(), other.begin()))
    return ffi::Error::InvalidArgument(std::string(what) + " must have the input's shape");
  return ffi::Error::Success();
}

ffi::Error CheckChannels(ffi::Span<const int64_t> d, int64_t channels, const char* what) {
  if (d.size() != 1 || d[0] != channels)
    return ffi::Error::InvalidArgument(std::string(what) + " must have one value per channel");
  return ffi::Error::Success();
}

// The activation codes of cpu_kernels.ACTIVATIONS.
constexpr int32_t kElu = 0, kTanh = 1;

// The instantiations for the channel counts with vector loops (C divides the period), then the
// one with plain loops (C = 0, any count).
constexpr int kVectorChannels[] = {1, 2, 4, 8, 16, 32};

template <typename Act>
auto ForwardFunctions() {
  return std::array{&Forward<1, Act>, &Forward<2, Act>, &Forward<4, Act>, &Forward<8, Act>, &Forward<16, Act>,
                    &Forward<32, Act>, &Forward<0, Act>};
}

template <typename Act>
auto BackwardFunctions() {
  return std::array{&Backward<1, Act>, &Backward<2, Act>, &Backward<4, Act>, &Backward<8, Act>, &Backward<16, Act>,
                    &Backward<32, Act>, &Backward<0, Act>};
}

// Calls the instantiation for C channels (the last, plain loops, when C has no vector one) with `args`.
template <typename Functions, typename Args>
ffi::Error Dispatch(const Functions& functions, int64_t C, const Args& args) {
  const int* found = std::find_if(std::begin(kVectorChannels), std::end(kVectorChannels),
                                  [C](int c) { return c == C; });
  std::apply(functions[found - std::begin(kVectorChannels)], args);
  return ffi::Error::Success();
}

ffi::Error BatchNormActivation(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, float epsilon, int32_t activation, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
  auto d = x.dimensions();
  if (auto e = CheckNHWC("input", d); e.failure()) return e;
  const int64_t N = d[0], C = d[3], S = d[1] * d[2] * C;
  for (auto [dims, what] : {std::pair{scale.dimensions(), "scale"}, {bias.dimensions(), "bias"},
                            {mean->dimensions(), "mean"}, {var->dimensions(), "variance"}})
    if (auto e = CheckChannels(dims, C, what); e.failure()) return e;
  if (auto e = CheckShapes(d, y->dimensions(), "output"); e.failure()) return e;
  if (C == 0) return ffi::Error::Success();  // no channels (an empty batch gets 0 / 0 = NaN statistics, as from XLA)
  auto args = std::make_tuple(std::ref(pool), x.typed_data(), scale.typed_data(), bias.typed_data(), epsilon, N, S,
                              C, y->typed_data(), mean->typed_data(), var->typed_data());
  if (activation == kElu) return Dispatch(ForwardFunctions<Elu>(), C, args);
  if (activation == kTanh) return Dispatch(ForwardFunctions<Tanh>(), C, args);
  return ffi::Error::InvalidArgument("unknown activation code " + std::to_string(activation));
}

ffi::Error BatchNormActivationGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad_y, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> grad_mean,
                            ffi::Buffer<ffi::F32> grad_var, float epsilon, int32_t activation,
                            ffi::ResultBuffer<ffi::F32> grad_x,
                            ffi::ResultBuffer<ffi::F32> grad_scale, ffi::ResultBuffer<ffi::F32> grad_bias) {
  auto d = x.dimensions();
  if (auto e = CheckNHWC("input", d); e.failure()) return e;
  const int64_t N = d[0], C = d[3], S = d[1] * d[2] * C;
  for (auto [dims, what] : {std::pair{grad_y.dimensions(), "output gradient"}, {grad_x->dimensions(), "input gradient"}})
    if (auto e = CheckShapes(d, dims, what); e.failure()) return e;
  for (auto [dims, what] : {std::pair{mean.dimensions(), "mean"}, {var.dimensions(), "variance"},
                            {scale.dimensions(), "scale"}, {bias.dimensions(), "bias"},
                            {grad_mean.dimensions(), "mean gradient"}, {grad_var.dimensions(), "variance gradient"},
                            {grad_scale->dimensions(), "scale gradient"}, {grad_bias->dimensions(), "bias gradient"}})
    if (auto e = CheckChannels(dims, C, what); e.failure()) return e;
  if (C == 0) return ffi::Error::Success();  // no channels (an empty batch gets 0 / 0 = NaN statistics, as from XLA)
  auto args = std::make_tuple(std::ref(pool), grad_y.typed_data(), x.typed_data(), mean.typed_data(), var.typed_data(),
                              scale.typed_data(), bias.typed_data(), grad_mean.typed_data(), grad_var.typed_data(),
                              epsilon, N, S, C, grad_x->typed_data(), grad_scale->typed_data(),
                              grad_bias->typed_data());
  if (activation == kElu) return Dispatch(BackwardFunctions<Elu>(), C, args);
  if (activation == kTanh) return Dispatch(BackwardFunctions<Tanh>(), C, args);
  return ffi::Error::InvalidArgument("unknown activation code " + std::to_string(activation));
}

}  // namespace
}  // namespace flaxdepth

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdepthBatchNormActivation, flaxdepth::BatchNormActivation,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("activation")  // kElu, kTanh
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // variance (biased)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdepthBatchNormActivationGrad, flaxdepth::BatchNormActivationGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // variance
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_var
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("activation")  // kElu, kTanh
                                  .Ret<ffi::Buffer<ffi::F32>>()   // grad_x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // grad_scale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // grad_bias
