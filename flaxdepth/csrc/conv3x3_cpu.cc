// The models' 3x3, pad-1 convolution on CPUs, float32, NHWC input, HWIO kernel: forward (which is
// also the input gradient, with the kernel flipped and transposed) and kernel gradient, as XLA FFI
// handlers (flaxdepth/cpu_kernels.py compiles this file and registers them).
//
// Why: XLA's CPU convolutions run 4-16-channel convolutions far below the machine's speed (Eigen,
// or YNNPACK only above 16 channels), and with them convolutions are most of a training step
// (benchmarks/BENCHMARKS.md).
// Here, up to 8 output channels, the SIMD lanes hold adjacent pixels of one channel (from a
// channel-planar copy of each image); at 16, they hold a pixel's channels, and a block of pixels
// stays in registers while the kernel streams through. Images are split over XLA's own intra-op
// thread pool.
//
// Work is cut into fixed chunks of images, whatever the number of threads, and the kernel
// gradient sums per image, then per chunk, then over chunks in order: the same inputs give the
// same bits on any number of threads (the engine's determinism tests rely on it).

#include "cpu_common.h"

namespace flaxdepth {
namespace {

// Image n of x (H x W x C) into P ((H + 2) x (W + 2) x C) with a zero border.
void PadImage(const float* x, int64_t H, int64_t W, int64_t C, float* P) {
  const int64_t Wp = W + 2;
  std::fill(P, P + (H + 2) * Wp * C, 0.f);
  for (int64_t h = 0; h < H; ++h) std::memcpy(P + ((h + 1) * Wp + 1) * C, x + h * W * C, sizeof(float) * W * C);
}

// BW output pixels (row h, columns w..w+BW-1) of one image: CI x 9 kernel rows stream through
// BW x CO accumulators held in registers.
template <int CI, int CO, int BW>
inline void ConvPixels(const float* P, int64_t Wp, const float* k, float* out, int64_t h, int64_t w) {
  constexpr int L = Lanes<CO>(), NV = CO / L;
  typedef typename VecOf<L>::type V;
  V acc[BW][NV];
  for (int p = 0; p < BW; ++p)
    for (int j = 0; j < NV; ++j) acc[p][j] = V{};
  for (int dy = 0; dy < 3; ++dy) {
    for (int dx = 0; dx < 3; ++dx) {
      const float* xs = P + ((h + dy) * Wp + w + dx) * CI;
      const float* ks = k + (dy * 3 + dx) * CI * CO;
      for (int ci = 0; ci < CI; ++ci) {
        V kv[NV];
        for (int j = 0; j < NV; ++j) kv[j] = *reinterpret_cast<const V*>(ks + ci * CO + j * L);
        for (int p = 0; p < BW; ++p) {
          const float xv = xs[p * CI + ci];
          for (int j = 0; j < NV; ++j) acc[p][j] += xv * kv[j];
        }
      }
    }
  }
  for (int p = 0; p < BW; ++p)
    for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(out + (p * CO) + j * L) = acc[p][j];
}

// The last pixels of a row, fewer than a block: one call of ConvPixels with their number.
template <int CI, int CO, int R>
inline void ConvTail(int64_t remaining, const float* P, int64_t Wp, const float* k, float* out, int64_t h, int64_t w) {
  if constexpr (R > 0) {
    if (remaining == R) return ConvPixels<CI, CO, R>(P, Wp, k, out, h, w);
    ConvTail<CI, CO, R - 1>(remaining, P, Wp, k, out, h, w);
  }
}

template <int CI, int CO>
void ConvChunk(const float* x, const float* k, float* y, int64_t n0, int64_t n1, int64_t H, int64_t W) {
  constexpr int BW = Lanes<CO>() == 8 && CO >= 16 ? 4 : 8;  // BW x CO / lanes accumulators: 8 registers
  const int64_t Wp = W + 2;
  std::vector<float> P((H + 2) * Wp * CI);
  for (int64_t n = n0; n < n1; ++n) {
    PadImage(x + n * H * W * CI, H, W, CI, P.data());
    float* yn = y + n * H * W * CO;
    for (int64_t h = 0; h < H; ++h) {
      int64_t w = 0;
      for (; w + BW <= W; w += BW) ConvPixels<CI, CO, BW>(P.data(), Wp, k, yn + (h * W + w) * CO, h, w);
      if (w < W) ConvTail<CI, CO, BW - 1>(W - w, P.data(), Wp, k, yn + (h * W + w) * CO, h, w);
    }
  }
}


// Few output channels (up to 8): vectors of one channel's PB adjacent
// pixels instead, from a channel-planar copy of the image whose rows are padded to whole blocks
// (zeros, so a block past the last column reads and adds zeros).
template <int C>
void PlanarImage(const float* x, int64_t H, int64_t W, int64_t Wq, float* Q) {
  const int64_t Hp = H + 2;
  std::fill(Q, Q + C * Hp * Wq, 0.f);
  for (int64_t h = 0; h < H; ++h)
    for (int c = 0; c < C; ++c) {
      float* row = Q + (c * Hp + h + 1) * Wq + 1;
      const float* xs = x + h * W * C + c;
      for (int64_t w = 0; w < W; ++w) row[w] = xs[w * C];  // constant stride: vectorized with shuffles
    }
}

constexpr int64_t WholeBlocks(int64_t W, int64_t PB) { return (W + PB - 1) / PB * PB; }

template <int CI, int CO, int PB>
void ConvChunkPlanar(const float* x, const float* k, float* y, int64_t n0, int64_t n1, int64_t H, int64_t W) {
  typedef typename VecOf<PB>::type V;
  const int64_t Hp = H + 2, Wq = WholeBlocks(W, PB) + 2;
  std::vector<float> Q(CI * Hp * Wq);
  alignas(64) float block[CO][PB];
  for (int64_t n = n0; n < n1; ++n) {
    PlanarImage<CI>(x + n * H * W * CI, H, W, Wq, Q.data());
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w0 = 0; w0 < W; w0 += PB) {
        V acc[CO];
        for (int co = 0; co < CO; ++co) acc[co] = V{};
        for (int dy = 0; dy < 3; ++dy)
          for (int dx = 0; dx < 3; ++dx)
            for (int ci = 0; ci < CI; ++ci) {
              const V xv = *reinterpret_cast<const V*>(Q.data() + (ci * Hp + h + dy) * Wq + w0 + dx);
              const float* ks = k + ((dy * 3 + dx) * CI + ci) * CO;
              for (int co = 0; co < CO; ++co) acc[co] += ks[co] * xv;
            }
        for (int co = 0; co < CO; ++co) *reinterpret_cast<V*>(block[co]) = acc[co];
        float* out = y + ((n * H + h) * W + w0) * CO;
        for (int64_t p = 0; p < std::min<int64_t>(PB, W - w0); ++p)
          for (int co = 0; co < CO; ++co) out[p * CO + co] = block[co][p];
      }
    }
  }
}

// The kernel gradient the same way: per tap, CI x CO vectors of pixel-wise products summed along
// the rows, then over their lanes.
template <int CI, int CO, int PB>
void KernelGradImagePlanar(const float* x, const float* g, float* dk, int64_t H, int64_t W, float* Q, float* G) {
  typedef typename VecOf<PB>::type V;
  typedef typename VecOf<PB>::mask M;
  M lanes;
  for (int p = 0; p < PB; ++p) lanes[p] = p;
  const int64_t Hp = H + 2, Wq = WholeBlocks(W, PB) + 2;
  PlanarImage<CI>(x, H, W, Wq, Q);
  PlanarImage<CO>(g, H, W, Wq, G);  // the same layout: the gradient at (h, w) is G[co][h + 1][w + 1]
  for (int dy = 0; dy < 3; ++dy)
    for (int dx = 0; dx < 3; ++dx) {
      V acc[CI][CO];
      for (int ci = 0; ci < CI; ++ci)
        for (int co = 0; co < CO; ++co) acc[ci][co] = V{};
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w0 = 0; w0 < W; w0 += PB) {
          V gv[CO];
          for (int co = 0; co < CO; ++co) gv[co] = *reinterpret_cast<const V*>(G + (co * Hp + h + 1) * Wq + w0 + 1);
          const M valid = w0 + PB <= W ? ~M{} : lanes < static_cast<int32_t>(W - w0);
          for (int ci = 0; ci < CI; ++ci) {
            // lanes past the row's end read real pixels (the next taps'); zeroed, not multiplied
            // by G's zeros, so that 0 * inf = NaN cannot reach taps that never see the pixel
            const V xv = (V)((M)*reinterpret_cast<const V*>(Q + (ci * Hp + h + dy) * Wq + w0 + dx) & valid);
            for (int co = 0; co < CO; ++co) acc[ci][co] += xv * gv[co];
          }
        }
      float* dks = dk + (dy * 3 + dx) * CI * CO;
      for (int ci = 0; ci < CI; ++ci)
        for (int co = 0; co < CO; ++co) {
          float sum = 0.f;
          for (int p = 0; p < PB; ++p) sum += acc[ci][co][p];
          dks[ci * CO + co] += sum;
        }
    }
}

// Any channel counts, plain loops: shapes the models do not use (tests, other callers).
void ConvChunkAny(const float* x, const float* k, float* y, int64_t n0, int64_t n1, int64_t H, int64_t W,
                  int64_t CI, int64_t CO) {
  const int64_t Wp = W + 2;
  std::vector<float> P((H + 2) * Wp * CI);
  for (int64_t n = n0; n < n1; ++n) {
    PadImage(x + n * H * W * CI, H, W, CI, P.data());
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        float* out = y + ((n * H + h) * W + w) * CO;
        std::fill(out, out + CO, 0.f);
        for (int dy = 0; dy < 3; ++dy)
          for (int dx = 0; dx < 3; ++dx)
            for (int64_t ci = 0; ci < CI; ++ci) {
              const float xv = P[((h + dy) * Wp + w + dx) * CI + ci];
              const float* ks = k + ((dy * 3 + dx) * CI + ci) * CO;
              for (int64_t co = 0; co < CO; ++co) out[co] += xv * ks[co];
            }
      }
    }
  }
}

// Adds image n's kernel gradient, sum over pixels of patch (x) outer grad_out, into dk (3x3xCIxCO):
// for each tap and block of B input channels, B x CO accumulators in registers run along a row.
template <int CI, int CO>
void KernelGradImage(const float* P, const float* g, float* dk, int64_t H, int64_t W) {
  constexpr int L = Lanes<CO>(), NV = CO / L;
  constexpr int B = CI < 8 / NV ? CI : 8 / NV;
  static_assert(CI % B == 0, "input channels must be a multiple of the block");
  typedef typename VecOf<L>::type V;
  const int64_t Wp = W + 2;
  for (int64_t h = 0; h < H; ++h) {
    const float* gs = g + h * W * CO;
    for (int dy = 0; dy < 3; ++dy) {
      for (int dx = 0; dx < 3; ++dx) {
        const float* xs = P + ((h + dy) * Wp + dx) * CI;
        float* dks = dk + (dy * 3 + dx) * CI * CO;
        for (int c0 = 0; c0 < CI; c0 += B) {
          V acc[B][NV];
          for (int b = 0; b < B; ++b)
            for (int j = 0; j < NV; ++j) acc[b][j] = V{};
          for (int64_t w = 0; w < W; ++w) {
            V gv[NV];
            for (int j = 0; j < NV; ++j) gv[j] = *reinterpret_cast<const V*>(gs + w * CO + j * L);
            for (int b = 0; b < B; ++b) {
              const float xv = xs[w * CI + c0 + b];
              for (int j = 0; j < NV; ++j) acc[b][j] += xv * gv[j];
            }
          }
          for (int b = 0; b < B; ++b)
            for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(dks + (c0 + b) * CO + j * L) += acc[b][j];
        }
      }
    }
  }
}

void KernelGradImageAny(const float* P, const float* g, float* dk, int64_t H, int64_t W, int64_t CI, int64_t CO) {
  const int64_t Wp = W + 2;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w)
      for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx)
          for (int64_t ci = 0; ci < CI; ++ci) {
            const float xv = P[((h + dy) * Wp + w + dx) * CI + ci];
            float* dks = dk + ((dy * 3 + dx) * CI + ci) * CO;
            const float* gs = g + (h * W + w) * CO;
            for (int64_t co = 0; co < CO; ++co) dks[co] += xv * gs[co];
          }
}

// Adds image n's kernel gradient into dk, with `scratch` for the padded copies.
template <int CI, int CO>
void KernelGradChannels(const float* x, const float* g, float* dk, int64_t H, int64_t W, std::vector<float>& scratch) {
  scratch.resize((H + 2) * (W + 2) * CI);
  PadImage(x, H, W, CI, scratch.data());
  KernelGradImage<CI, CO>(scratch.data(), g, dk, H, W);
}

template <int CI, int CO, int PB>
void KernelGradPlanar(const float* x, const float* g, float* dk, int64_t H, int64_t W, std::vector<float>& scratch) {
  const int64_t plane = (H + 2) * (WholeBlocks(W, PB) + 2);
  scratch.resize((CI + CO) * plane);
  KernelGradImagePlanar<CI, CO, PB>(x, g, dk, H, W, scratch.data(), scratch.data() + CI * plane);
}

typedef void (*ConvFn)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
typedef void (*KernelGradFn)(const float*, const float*, float*, int64_t, int64_t, std::vector<float>&);

// Pixels per vector of the planar kernels: 16 where a row has more than 8 and the processor has
// the lanes, else 8.
constexpr bool WidePixels(int64_t W) { return kMaxLanes == 16 && W > 8; }

// The channel pairs of the models' layers (forward C_in -> C_out and the input gradients'
// reverse), each with the faster of the two layouts measured on an AVX-512 CPU (BENCHMARKS.md):
// pixels in the vectors up to 8 output channels, channels at 16. Other pairs take plain loops.
#define FLAXDEPTH_CONV_PLANAR(X) X(1, 4) X(4, 1) X(4, 4) X(8, 4) X(4, 8) X(8, 8) X(16, 8)
#define FLAXDEPTH_CONV_CHANNELS(X) X(8, 16) X(16, 16)
#define FLAXDEPTH_KERNEL_GRAD_PLANAR(X) X(1, 4) X(4, 4)
#define FLAXDEPTH_KERNEL_GRAD_CHANNELS(X) X(4, 8) X(8, 8) X(8, 16) X(16, 16)

ConvFn FindConv(int64_t ci, int64_t co, int64_t W) {
#define PLANAR(a, b) \
  if (ci == a && co == b) return WidePixels(W) ? &ConvChunkPlanar<a, b, 16> : &ConvChunkPlanar<a, b, 8>;
#define CHANNELS(a, b) \
  if (ci == a && co == b) return &ConvChunk<a, b>;
  FLAXDEPTH_CONV_PLANAR(PLANAR)
  FLAXDEPTH_CONV_CHANNELS(CHANNELS)
#undef PLANAR
#undef CHANNELS
  return nullptr;
}

KernelGradFn FindKernelGrad(int64_t ci, int64_t co, int64_t W) {
#define PLANAR(a, b) \
  if (ci == a && co == b) return WidePixels(W) ? &KernelGradPlanar<a, b, 16> : &KernelGradPlanar<a, b, 8>;
#define CHANNELS(a, b) \
  if (ci == a && co == b) return &KernelGradChannels<a, b>;
  FLAXDEPTH_KERNEL_GRAD_PLANAR(PLANAR)
  FLAXDEPTH_KERNEL_GRAD_CHANNELS(CHANNELS)
#undef PLANAR
#undef CHANNELS
  return nullptr;
}

ffi::Error Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), kd = kernel.dimensions();
  if (auto e = CheckNHWC("input", xd); e.failure()) return e;
  if (kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3])
    return ffi::Error::InvalidArgument("kernel must be 3 x 3 x C_in x C_out (HWIO)");
  const int64_t N = xd[0], H = xd[1], W = xd[2], CI = xd[3], CO = kd[3];
  auto yd = y->dimensions();
  if (yd.size() != 4 || yd[0] != N || yd[1] != H || yd[2] != W || yd[3] != CO)
    return ffi::Error::InvalidArgument("output must be N x H x W x C_out");
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* yp = y->typed_data();
  const ConvFn fn = FindConv(CI, CO, W);
  const int64_t chunks = (N + kImagesPerChunk - 1) / kImagesPerChunk;
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t n0 = c * kImagesPerChunk, n1 = std::min(N, n0 + kImagesPerChunk);
    if (fn) fn(xp, kp, yp, n0, n1, H, W);
    else ConvChunkAny(xp, kp, yp, n0, n1, H, W, CI, CO);
  });
  return ffi::Error::Success();
}

ffi::Error Conv3x3KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grad_out,
                             ffi::ResultBuffer<ffi::F32> grad_kernel) {
  auto xd = x.dimensions(), gd = grad_out.dimensions();
  if (auto e = CheckNHWC("input", xd); e.failure()) return e;
  if (auto e = CheckNHWC("output gradient", gd); e.failure()) return e;
  if (gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2])
    return ffi::Error::InvalidArgument("input and output gradient must have the same N, H, W");
  const int64_t N = xd[0], H = xd[1], W = xd[2], CI = xd[3], CO = gd[3], taps = 9 * CI * CO;
  auto kd = grad_kernel->dimensions();
  if (kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != CI || kd[3] != CO)
    return ffi::Error::InvalidArgument("kernel gradient must be 3 x 3 x C_in x C_out");
  const float *xp = x.typed_data(), *gp = grad_out.typed_data();
  const KernelGradFn fn = FindKernelGrad(CI, CO, W);
  const int64_t chunks = (N + kImagesPerChunk - 1) / kImagesPerChunk;
  std::vector<float> partial(chunks * taps, 0.f);
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t n0 = c * kImagesPerChunk, n1 = std::min(N, n0 + kImagesPerChunk);
    std::vector<float> scratch, image(taps);
    float* chunk_sum = partial.data() + c * taps;
    for (int64_t n = n0; n < n1; ++n) {
      const float *xn = xp + n * H * W * CI, *gn = gp + n * H * W * CO;
      std::fill(image.begin(), image.end(), 0.f);
      if (fn) {
        fn(xn, gn, image.data(), H, W, scratch);
      } else {
        scratch.resize((H + 2) * (W + 2) * CI);
        PadImage(xn, H, W, CI, scratch.data());
        KernelGradImageAny(scratch.data(), gn, image.data(), H, W, CI, CO);
      }
      for (int64_t i = 0; i < taps; ++i) chunk_sum[i] += image[i];
    }
  });
  float* out = grad_kernel->typed_data();
  std::fill(out, out + taps, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < taps; ++i) out[i] += partial[c * taps + i];
  return ffi::Error::Success();
}

}  // namespace
}  // namespace flaxdepth

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdepthConv3x3, flaxdepth::Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdepthConv3x3KernelGrad, flaxdepth::Conv3x3KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
