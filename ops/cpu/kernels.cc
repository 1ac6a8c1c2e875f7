// Native CPU kernels for xlaserve, called from jitted JAX code through jax.ffi (ops/native.py).
//
// One source, compiled once per ISA: with AVX-512 (F/BW/VL/DQ) the vectors are 16 floats, on
// AVX2+FMA+F16C they are 8. The Python side picks the build the CPU runs (ops/native.py), so no
// instruction here runs on a CPU without it.
//
// Kernels (each an XLA FFI handler; work is split over XLA's intra-op thread pool, the calling
// thread taking part, so a busy pool cannot deadlock a call):
// - xlaserve_linear_{f32,f16}: y[M, N] = x[M, K] @ W, f32 accumulate, W packed once at load as
//   [N/16, K, 16] panels (16 output columns, K-major) of f32 or f16 (F16C conversion in the loop).
// - xlaserve_linear_q8: the same product over Q8_0 panels (int8 weights, an f32 scale per 32 K
//   rows and output column; see "Q8_0 GEMM" below).
// - xlaserve_paged_attention_{f32,f16}: the ragged paged attention of ops/attention.py over the
//   CPU backend's cache layout (key pages dimension-major [H, B], value pages token-major [B, H]),
//   the cache stored as f32 or f16 (--kv-cache-dtype; F16C conversion as keys and values are
//   loaded), q, scores, softmax and accumulation in f32 either way.
// - xlaserve_top_k: lax.top_k's values and indices, bit for bit (the sampler's candidates).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // output columns per packed weight panel

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kVL = 16;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Load(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec Bcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
constexpr int kTilePanels = 2;  // a micro-tile is 2 panels (2 zmm) wide
constexpr int kTallPanels = 4;  // 4 (24 zmm accumulators) on a tall x's whole micro-rows
#else
using Vec = __m256;
constexpr int kVL = 8;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Load(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec Bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
constexpr int kTilePanels = 1;  // a micro-tile is 1 panel (2 ymm) wide
constexpr int kTallPanels = 1;  // 12 ymm accumulators already: no wider tile for a tall x
#endif
constexpr int kPanelVecs = kPanel / kVL;
constexpr int kMR = 6;  // rows per micro-tile: 6 x 2 vector accumulators

// ---- work splitting over XLA's pool -------------------------------------------------------

struct WorkCounter {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs body(i) for i in [0, n): the caller and up to workers-1 pool tasks claim items from an
// atomic counter; the caller returns once every item is done. A pool task that starts late finds
// no item left and touches nothing but the shared counter (kept alive by its shared_ptr).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t workers, const Body& body) {
  if (n <= 0) return;
  workers = std::min<int64_t>(workers, n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto counter = std::make_shared<WorkCounter>();
  const Body* fn = &body;
  auto run = [counter, n, fn]() {
    for (;;) {
      int64_t i = counter->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      (*fn)(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule(decltype(run)(run));
  run();
  for (int spins = 0; counter->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 2000) {
      _mm_pause();
    } else {
      std::this_thread::yield();  // a shared, loaded machine: let the worker run
    }
  }
}

int64_t PoolWorkers(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// ---- GEMM ---------------------------------------------------------------------------------

// Element (r, k) of a micro-tile's x rows: row-major with stride K, or packed k-major
// (``PackRows``: the kMR rows of one k side by side, so the tile's broadcasts read one stream).
template <bool Packed>
inline const float* XAt(const float* x, int r, int64_t k, int64_t K) {
  return Packed ? x + k * kMR + r : x + r * K + k;
}

// y[0:MR, cols of panels p..p+NP) (+)= x[0:MR, k0:k1] @ W[k0:k1, those cols]; x rows have
// stride K (or are packed, ``XAt``), y rows stride N; the first K block stores, later ones add
// (``accumulate``). U independent accumulator sets over k keep enough FMA chains in flight when
// MR is small (decode).
template <int MR, int NP, int U, typename WT, bool Packed = false>
inline void MicroTile(const float* x, int64_t K, int64_t k0, int64_t k1, const WT* w, int64_t p,
                      float* y, int64_t N, bool accumulate) {
  constexpr int C = NP * kPanelVecs;
  Vec acc[U][MR][C];
#pragma GCC unroll 64
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 64
      for (int c = 0; c < C; ++c) acc[u][r][c] = Zero();
  const WT* wp[NP];
#pragma GCC unroll 8
  for (int j = 0; j < NP; ++j) wp[j] = w + (p + j) * K * kPanel;
  int64_t k = k0;
  for (; k + U <= k1; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      Vec wv[C];
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
        for (int v = 0; v < kPanelVecs; ++v)
          wv[j * kPanelVecs + v] = Load(wp[j] + (k + u) * kPanel + v * kVL);
#pragma GCC unroll 64
      for (int r = 0; r < MR; ++r) {
        Vec xb = Bcast(XAt<Packed>(x, r, k + u, K));
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[u][r][c] = Fma(xb, wv[c], acc[u][r][c]);
      }
    }
  }
  for (; k < k1; ++k) {
    Vec wv[C];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
      for (int v = 0; v < kPanelVecs; ++v)
        wv[j * kPanelVecs + v] = Load(wp[j] + k * kPanel + v * kVL);
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r) {
      Vec xb = Bcast(XAt<Packed>(x, r, k, K));
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[0][r][c] = Fma(xb, wv[c], acc[0][r][c]);
    }
  }
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      Vec s = acc[0][r][c];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) s = Add(s, acc[u][r][c]);
      float* out = y + r * N + p * kPanel + c * kVL;
      Store(out, accumulate ? Add(s, Load(out)) : s);
    }
}

template <int NP, typename WT>
void RowsTile(const float* x, int64_t m, int64_t K, int64_t k0, int64_t k1, const WT* w,
              int64_t p, float* y, int64_t N, bool acc) {
  switch (m) {
    case 1: MicroTile<1, NP, (NP * kPanelVecs >= 2 ? 4 : 8), WT>(x, K, k0, k1, w, p, y, N, acc);
      break;
    case 2: MicroTile<2, NP, 2, WT>(x, K, k0, k1, w, p, y, N, acc); break;
    case 3: MicroTile<3, NP, 2, WT>(x, K, k0, k1, w, p, y, N, acc); break;
    case 4: MicroTile<4, NP, 1, WT>(x, K, k0, k1, w, p, y, N, acc); break;
    case 5: MicroTile<5, NP, 1, WT>(x, K, k0, k1, w, p, y, N, acc); break;
    default: MicroTile<kMR, NP, 1, WT>(x, K, k0, k1, w, p, y, N, acc); break;
  }
}

// Weight rows per K block when several row blocks reuse a tile: its slab of weights
// (kKBlock x tile columns, about 16 KB in f32) stays in L1 across the row blocks.
constexpr int64_t kKBlock = 256 / kTilePanels;

// The whole micro-rows (kMR rows each) of x[0:M, K] packed k-major into out: micro-row b at
// out + b * kMR * K, its element (r, k) at k * kMR + r (XAt<true>). A tall x's rows are K
// floats apart; read in place, a micro-tile's broadcasts walked kMR streams that could share
// L1 sets (K = 1536: 6 KB apart), 2-3x slower than XLA's dot. Rows past the last whole
// micro-row are not packed (they run in place).
void PackRows(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m + kMR <= M; m += kMR) {
    float* o = out + m * K;
    for (int64_t k = 0; k < K; ++k)
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) o[k * kMR + r] = x[(m + r) * K + k];
  }
}

// Bytes of y per panel group (GemmPanels): kept in L2 across the K blocks.
constexpr int64_t kYBlockBytes = 256 * 1024;

// Columns of panels [p0, p1) for all M rows.
template <typename WT>
void GemmPanels(const float* x, int64_t M, int64_t K, const WT* w, int64_t p0, int64_t p1,
                float* y, int64_t N) {
  const int64_t kb = M > kMR ? kKBlock : K;
  std::vector<float> packed;
  if (M >= kMR) {
    packed.resize(M / kMR * kMR * K);
    PackRows(x, M, K, packed.data());
  }
  // Panel groups, then K blocks: a group's y (M x group columns) stays in L2 across the K
  // blocks, the weights are read once per row block and each tile's slab stays in L1 across
  // the micro-rows, while the row block's x (M x kb, packed) stays in L2 across the tiles.
  const int64_t group = std::max<int64_t>(
      kTallPanels, kYBlockBytes / (M * kPanel * 4) / kTallPanels * kTallPanels);
  for (int64_t g0 = p0; g0 < p1; g0 += group) {
  const int64_t g1 = std::min(p1, g0 + group);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t k1 = std::min(K, k0 + kb);
    for (int64_t p = g0; p < g1;) {
      // Panels per tile: wider on a tall x (more FMAs per broadcast).
      const int np = M >= kMR && p + kTallPanels <= g1 ? kTallPanels
                     : p + kTilePanels <= g1           ? kTilePanels
                                                       : 1;
      for (int64_t m = 0; m < M; m += kMR) {
        const int64_t rows = std::min<int64_t>(kMR, M - m);
        const float* xm = rows == kMR ? packed.data() + m * K : x + m * K;
        if (np == kTallPanels && kTallPanels != kTilePanels && rows == kMR)
          MicroTile<kMR, kTallPanels, 1, WT, true>(xm, K, k0, k1, w, p, y + m * N, N, k0 > 0);
        else if (np == kTallPanels && kTallPanels != kTilePanels)  // the last rows: 2 tiles
          for (int h = 0; h < kTallPanels; h += kTilePanels)
            RowsTile<kTilePanels, WT>(xm, rows, K, k0, k1, w, p + h, y + m * N, N, k0 > 0);
        else if (np >= kTilePanels && rows == kMR)  // packed (PackRows)
          MicroTile<kMR, kTilePanels, 1, WT, true>(xm, K, k0, k1, w, p, y + m * N, N, k0 > 0);
        else if (np >= kTilePanels)
          RowsTile<kTilePanels, WT>(xm, rows, K, k0, k1, w, p, y + m * N, N, k0 > 0);
        else if (rows == kMR)
          MicroTile<kMR, 1, 1, WT, true>(xm, K, k0, k1, w, p, y + m * N, N, k0 > 0);
        else
          RowsTile<1, WT>(xm, rows, K, k0, k1, w, p, y + m * N, N, k0 > 0);
      }
      p += np;
    }
  }
  }
}

// Rows per row block of a tall x: the block's x (rows x kKBlock, packed) stays in L2 while
// every panel streams past it, and the weights are read once per block; without row blocks
// each micro-tile column re-read the whole of x from memory (8192 x 384 f32, 12 MB, for
// MiniLM at batch 256). A multiple of the micro-tile's rows.
constexpr int64_t kRowBlockBytes = 128 * 1024;
inline int64_t RowBlock(int64_t M, int64_t K) {
  const int64_t kb = std::min(K, kKBlock);
  const int64_t rows = std::max<int64_t>(kMR, kRowBlockBytes / (4 * kb) / kMR * kMR);
  return std::min(M, rows);
}

// Below this many multiply-adds a call runs on the calling thread only (a pool hand-off costs
// a few microseconds).
constexpr int64_t kParallelMacs = 1 << 18;

template <typename WT>
ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, const WT* w,
                  ffi::Span<const int64_t> wdims, ffi::ResultBuffer<ffi::F32, 2> y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t panels = wdims[0];
  const int64_t N = y->dimensions()[1];
  if (wdims[1] != K || wdims[2] != kPanel || N != panels * kPanel || y->dimensions()[0] != M)
    return ffi::Error::InvalidArgument("xlaserve_linear: shapes do not match the packing");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t workers = M * K * N < kParallelMacs ? 1 : PoolWorkers(pool);
  // Work items are (row block, panel chunk): row blocks keep a tall x (prefill, encoders) in L2
  // across the panels; panel chunks of whole micro-tiles make about 4 items per worker so that
  // a slow worker is evened out (decode: one row block, panel chunks only).
  const int64_t mc = RowBlock(M, K);
  const int64_t row_blocks = (M + mc - 1) / mc;
  const int64_t want = std::max<int64_t>(1, (4 * workers + row_blocks - 1) / row_blocks);
  int64_t chunk = std::max<int64_t>(kTilePanels, panels / want);
  chunk = (chunk + kTilePanels - 1) / kTilePanels * kTilePanels;
  const int64_t n = (panels + chunk - 1) / chunk;
  ParallelFor(pool, row_blocks * n, workers, [&](int64_t i) {
    const int64_t m0 = i / n * mc, c = i % n;
    GemmPanels<WT>(xp + m0 * K, std::min(mc, M - m0), K, w, c * chunk,
                   std::min(panels, (c + 1) * chunk), yp + m0 * N, N);
  });
  return ffi::Error::Success();
}

ffi::Error LinearF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                     ffi::Buffer<ffi::F32, 3> w, ffi::ResultBuffer<ffi::F32, 2> y) {
  return Linear<float>(pool, x, w.typed_data(), w.dimensions(), y);
}

ffi::Error LinearF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                     ffi::Buffer<ffi::F16, 3> w, ffi::ResultBuffer<ffi::F32, 2> y) {
  return Linear<uint16_t>(pool, x, w.typed_data(), w.dimensions(), y);
}

// ---- Q8_0 GEMM (weight-only int8) ---------------------------------------------------------
//
// W packed as [N/16, ceil(K/32), kQ8Block] int8: per panel of 16 output columns, one block per 32
// rows of K (the last block zero-padded), each block the 32 x 16 int8 weights (K-major) followed
// by the 16 columns' f32 scales (Q8_0 semantics: W[k, n] ~= q[k, n] * scale[block, n]). The int8
// values are widened to f32 in registers and multiplied by the block's scales, then FMA'd with
// f32 activations (f32 accumulate). Same tiling and threading as the f16/f32 GEMM above.

constexpr int64_t kQ8Rows = 32;                                  // K rows per block
constexpr int64_t kQ8Block = kQ8Rows * kPanel + kPanel * 4;      // bytes: weights, then scales

#if defined(__AVX512F__)
inline Vec LoadQ8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
inline Vec LoadQ8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// y[0:MR, cols of panels p..p+NP) = x[0:MR, :] @ W over Q8_0 panels, each weight read once:
// per block, U independent accumulator sets of x . q (the int8 widened, unscaled), then one FMA
// by the block's scales into the running sums. MR is 1 or 2 (registers: (U + 1) x MR x C).
template <int MR, int NP, int U>
inline void MicroTileQ8(const float* x, int64_t K, const int8_t* w, int64_t blocks, int64_t p,
                        float* y, int64_t N) {
  constexpr int C = NP * kPanelVecs;
  Vec acc[MR][C];
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 64
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* blk[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) blk[j] = w + ((p + j) * blocks + b) * kQ8Block;
    Vec bacc[U][MR][C];
#pragma GCC unroll 64
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 64
        for (int c = 0; c < C; ++c) bacc[u][r][c] = Zero();
    const int64_t kb = b * kQ8Rows, n = std::min(K - kb, kQ8Rows);
    const float* xk = x + kb;
    int64_t i = 0;
    for (; i + U <= n; i += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        Vec wv[C];
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
          for (int v = 0; v < kPanelVecs; ++v)
            wv[j * kPanelVecs + v] = LoadQ8(blk[j] + (i + u) * kPanel + v * kVL);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          Vec xb = Bcast(xk + r * K + i + u);
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) bacc[u][r][c] = Fma(xb, wv[c], bacc[u][r][c]);
        }
      }
    }
    for (; i < n; ++i) {
      Vec wv[C];
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
        for (int v = 0; v < kPanelVecs; ++v)
          wv[j * kPanelVecs + v] = LoadQ8(blk[j] + i * kPanel + v * kVL);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        Vec xb = Bcast(xk + r * K + i);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) bacc[0][r][c] = Fma(xb, wv[c], bacc[0][r][c]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      const float* scale = reinterpret_cast<const float*>(blk[j] + kQ8Rows * kPanel);
#pragma GCC unroll 8
      for (int v = 0; v < kPanelVecs; ++v) {
        const int c = j * kPanelVecs + v;
        const Vec sv = Load(scale + v * kVL);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          Vec t = bacc[0][r][c];
#pragma GCC unroll 8
          for (int u = 1; u < U; ++u) t = Add(t, bacc[u][r][c]);
          acc[r][c] = Fma(t, sv, acc[r][c]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) Store(y + r * N + p * kPanel + c * kVL, acc[r][c]);
}

template <int NP>
void RowsTileQ8(const float* x, int64_t m, int64_t K, const int8_t* w, int64_t blocks, int64_t p,
                float* y, int64_t N) {
  if (m == 1)
    MicroTileQ8<1, NP, 4>(x, K, w, blocks, p, y, N);
  else
    MicroTileQ8<2, NP, 2>(x, K, w, blocks, p, y, N);
}

// Panels [p, p + np) rows [k0, k1) widened to f32 into buf, laid out as f32 panels of K rows
// (panel j at buf + j * K * kPanel), so that the f32 micro-tiles read them as they are.
void DequantizeQ8(const int8_t* w, int64_t blocks, int64_t p, int64_t np, int64_t K, int64_t k0,
                  int64_t k1, float* buf) {
  for (int64_t j = 0; j < np; ++j)
    for (int64_t b = k0 / kQ8Rows; b * kQ8Rows < k1; ++b) {
      const int8_t* blk = w + ((p + j) * blocks + b) * kQ8Block;
      const float* scale = reinterpret_cast<const float*>(blk + kQ8Rows * kPanel);
      const int64_t kb = b * kQ8Rows, n = std::min(k1 - kb, kQ8Rows);
      for (int v = 0; v < kPanelVecs; ++v) {
        const Vec sv = Load(scale + v * kVL);
        for (int64_t i = 0; i < n; ++i)
          Store(buf + (j * K + kb + i) * kPanel + v * kVL,
                Mul(LoadQ8(blk + i * kPanel + v * kVL), sv));
      }
    }
}

// One or two rows (decode) use the fused micro-tiles, each weight read once from memory. More
// rows widen each tile's K block once into an L1-resident f32 slab that all row blocks then
// reuse through the f32 micro-tiles (widening in the inner loop would cost more than the FMAs).
constexpr int64_t kQ8FusedRows = 2;

void GemmPanelsQ8(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t blocks,
                  int64_t p0, int64_t p1, float* y, int64_t N) {
  if (M <= kQ8FusedRows) {
    for (int64_t p = p0; p < p1;) {
      if (p + kTilePanels <= p1) {
        RowsTileQ8<kTilePanels>(x, M, K, w, blocks, p, y, N);
        p += kTilePanels;
      } else {
        RowsTileQ8<1>(x, M, K, w, blocks, p, y, N);
        p += 1;
      }
    }
    return;
  }
  thread_local std::vector<float> slab;
  slab.resize(kTilePanels * K * kPanel);
  for (int64_t p = p0; p < p1;) {
    const bool full = p + kTilePanels <= p1;
    for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {  // kKBlock is a multiple of kQ8Rows
      const int64_t k1 = std::min(K, k0 + kKBlock);
      DequantizeQ8(w, blocks, p, full ? kTilePanels : 1, K, k0, k1, slab.data());
      for (int64_t m = 0; m < M; m += kMR) {
        const int64_t rows = std::min<int64_t>(kMR, M - m);
        float* out = y + m * N + p * kPanel;
        if (full)
          RowsTile<kTilePanels, float>(x + m * K, rows, K, k0, k1, slab.data(), 0, out, N,
                                       k0 > 0);
        else
          RowsTile<1, float>(x + m * K, rows, K, k0, k1, slab.data(), 0, out, N, k0 > 0);
      }
    }
    p += full ? kTilePanels : 1;
  }
}

ffi::Error LinearQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                    ffi::Buffer<ffi::S8, 3> w, ffi::ResultBuffer<ffi::F32, 2> y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t panels = w.dimensions()[0], blocks = w.dimensions()[1];
  const int64_t N = y->dimensions()[1];
  if (blocks != (K + kQ8Rows - 1) / kQ8Rows || w.dimensions()[2] != kQ8Block ||
      N != panels * kPanel || y->dimensions()[0] != M)
    return ffi::Error::InvalidArgument("xlaserve_linear_q8: shapes do not match the packing");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t workers = M * K * N < kParallelMacs ? 1 : PoolWorkers(pool);
  int64_t chunk = std::max<int64_t>(kTilePanels, panels / (4 * workers));
  chunk = (chunk + kTilePanels - 1) / kTilePanels * kTilePanels;
  const int64_t n = (panels + chunk - 1) / chunk;
  ParallelFor(pool, n, workers, [&](int64_t i) {
    GemmPanelsQ8(xp, M, K, wp, blocks, i * chunk, std::min(panels, (i + 1) * chunk), yp, N);
  });
  return ffi::Error::Success();
}

// ---- paged attention ----------------------------------------------------------------------

// s[i] = exp(s[i] - m) in place, returns the sum. Range reduction to 2^n * exp(r), |r| <= ln2/2,
// and a degree-6 polynomial (relative error ~2e-7); written so that the compiler vectorises it.
float ExpSub(float* s, int64_t n, float m) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = std::max(s[i] - m, -87.0f);
    float t = v * 1.44269504088896341f;
    float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = v - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float poly = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (
        1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    float e = poly * scale;
    s[i] = e;
    total += e;
  }
  return total;
}

// A cache element as f32: KT is the cache's storage type (float, or uint16_t holding f16).
inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t x) { return _cvtsh_ss(x); }

template <typename KT>
struct AttnArgs {
  const float* q;   // [T, N, H]
  const KT* kc;     // [K, P, H, B] (each key page dimension-major)
  const KT* vc;     // [K, P, B, H]
  const int32_t* page_table;  // [S, W]
  float* out;       // [T, N, H]
  int64_t T, N, H, K, P, B, S, W, G;
  float scale, soft_cap;
  int32_t window;
};

// ---- vector paths (pages of 16 keys, head dim a multiple of 2 vectors) ---------------------

constexpr int kGroupRows = 4;  // query heads handled together (accumulators in registers)

// Scores of GN query rows (scaled, row stride H) against one whole dimension-major key page of
// 16 keys: out[g * 16 + b]. Slots past the sequence's length are computed and then dropped by
// the caller (they lie inside the page, so the read is in bounds; NaN there stays in its lane).
template <int GN, typename KT>
inline void PageScores16(const float* qs, int64_t H, const KT* kp, float* out) {
  Vec s[2][GN][kPanelVecs];
#pragma GCC unroll 8
  for (int u = 0; u < 2; ++u)
#pragma GCC unroll 8
    for (int g = 0; g < GN; ++g)
#pragma GCC unroll 4
      for (int v = 0; v < kPanelVecs; ++v) s[u][g][v] = Zero();
  for (int64_t h = 0; h < H; h += 2) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      Vec kv[kPanelVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kPanelVecs; ++v) kv[v] = Load(kp + (h + u) * kPanel + v * kVL);
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) {
        Vec qb = Bcast(qs + g * H + h + u);
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVecs; ++v) s[u][g][v] = Fma(qb, kv[v], s[u][g][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g)
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVecs; ++v) Store(out + g * kPanel + v * kVL, Add(s[0][g][v], s[1][g][v]));
}

// out[g, hc:hc+2*kVL] = sum_j p[g, j] * V[j, hc:hc+2*kVL] over the keys [lo, hi) for GN rows.
template <int GN, typename KT>
inline void ValueChunk(const float* p, int64_t len, const KT* const* rows, int64_t hc,
                       const float* inv, float* out, int64_t H) {
  Vec acc[GN][2];
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) acc[g][0] = acc[g][1] = Zero();
  for (int64_t j = 0; j < len; ++j) {
    const KT* vr = rows[j];
    if (vr == nullptr) continue;  // a key of an invalid page (its weight is 0)
    const Vec v0 = Load(vr + hc), v1 = Load(vr + hc + kVL);
#pragma GCC unroll 8
    for (int g = 0; g < GN; ++g) {
      const Vec pb = Bcast(p + g * len + j);
      acc[g][0] = Fma(pb, v0, acc[g][0]);
      acc[g][1] = Fma(pb, v1, acc[g][1]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    const Vec s = Bcast(inv + g);
    Store(out + g * H + hc, Mul(acc[g][0], s));
    Store(out + g * H + hc + kVL, Mul(acc[g][1], s));
  }
}

template <typename F>
inline void ForGroups(int64_t G, const F& f) {
  for (int64_t g0 = 0; g0 < G; g0 += kGroupRows) {
    switch (std::min<int64_t>(kGroupRows, G - g0)) {
      case 1: f(g0, std::integral_constant<int, 1>()); break;
      case 2: f(g0, std::integral_constant<int, 2>()); break;
      case 3: f(g0, std::integral_constant<int, 3>()); break;
      default: f(g0, std::integral_constant<int, 4>()); break;
    }
  }
}

// One (token, kv head): its G query heads over the keys [lo, hi) of its own sequence.
template <typename KT>
void AttendOne(const AttnArgs<KT>& a, int64_t t, int64_t kh, int64_t seq, int64_t pos,
               std::vector<float>& scores, std::vector<const KT*>& rows) {
  const int64_t G = a.G, H = a.H, B = a.B;
  float* out = a.out + (t * a.N + kh * G) * H;
  int64_t hi = std::min<int64_t>(pos + 1, a.W * B);
  int64_t lo = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
  if (pos < 0 || hi <= lo) {
    std::fill(out, out + G * H, 0.0f);
    return;
  }
  const bool vec = B == kPanel && H % (2 * kVL) == 0;
  const int64_t len = hi - lo;
  scores.resize(G * len);
  rows.resize(len);
  float* sc = scores.data();
  const float* q = a.q + (t * a.N + kh * G) * H;
  const int32_t* pages = a.page_table + seq * a.W;
  float qs[16 * 512];  // G * H scaled query values (G <= 16, H <= 512 checked by the caller)
  for (int64_t i = 0; i < G * H; ++i) qs[i] = q[i] * a.scale;
  for (int64_t pi = lo / B; pi * B < hi; ++pi) {
    const int64_t b0 = std::max(lo, pi * B) - pi * B, b1 = std::min(hi, (pi + 1) * B) - pi * B;
    const int64_t page = pages[pi];
    const int64_t j0 = pi * B + b0 - lo;
    const bool valid = page >= 0 && page < a.P;  // never read outside the cache
    for (int64_t b = b0; b < b1; ++b)
      rows[j0 + b - b0] = valid ? a.vc + ((kh * a.P + page) * B + b) * H : nullptr;
    if (!valid) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t b = 0; b < b1 - b0; ++b) sc[g * len + j0 + b] = -INFINITY;
      continue;
    }
    const KT* kp = a.kc + ((kh * a.P + page) * H) * B;
    if (vec) {
      float page_scores[16 * kPanel];
      ForGroups(G, [&](int64_t g0, auto gn) {
        PageScores16<decltype(gn)::value, KT>(qs + g0 * H, H, kp, page_scores + g0 * kPanel);
      });
      for (int64_t g = 0; g < G; ++g)
        for (int64_t b = b0; b < b1; ++b) sc[g * len + j0 + b - b0] = page_scores[g * kPanel + b];
    } else {
      for (int64_t g = 0; g < G; ++g) {
        float* srow = sc + g * len + j0;
        const float* qg = qs + g * H;
        for (int64_t b = 0; b < b1 - b0; ++b) srow[b] = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          const float qv = qg[h];
          const KT* kr = kp + h * B + b0;
          for (int64_t b = 0; b < b1 - b0; ++b) srow[b] += qv * ToF32(kr[b]);
        }
      }
    }
    if (a.soft_cap > 0.0f)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t b = 0; b < b1 - b0; ++b) {
          float& x = sc[g * len + j0 + b];
          x = a.soft_cap * std::tanh(x / a.soft_cap);
        }
  }
  float inv[16];
  for (int64_t g = 0; g < G; ++g) {
    float* srow = sc + g * len;
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) m = std::max(m, srow[j]);
    const float denom = std::isfinite(m) ? ExpSub(srow, len, m) : 0.0f;
    if (!std::isfinite(m)) std::fill(srow, srow + len, 0.0f);
    inv[g] = denom > 0.0f ? 1.0f / denom : 0.0f;
  }
  if (vec) {
    for (int64_t hc = 0; hc < H; hc += 2 * kVL)
      ForGroups(G, [&](int64_t g0, auto gn) {
        ValueChunk<decltype(gn)::value, KT>(sc + g0 * len, len, rows.data(), hc, inv + g0,
                                            out + g0 * H, H);
      });
    return;
  }
  float acc[16 * 512];
  std::fill(acc, acc + G * H, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    const KT* vr = rows[j];
    if (vr == nullptr) continue;
    for (int64_t g = 0; g < G; ++g) {
      const float p = sc[g * len + j];
      float* ag = acc + g * H;
      for (int64_t h = 0; h < H; ++h) ag[h] += p * ToF32(vr[h]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < H; ++h) out[g * H + h] = acc[g * H + h] * inv[g];
}

// DT: the cache's dtype (F32 or F16); q and the output are f32 either way.
template <ffi::DataType DT>
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> q,
                          ffi::Buffer<DT, 4> k_cache, ffi::Buffer<DT, 4> v_cache,
                          ffi::Buffer<ffi::S32, 2> page_table, ffi::Buffer<ffi::S32, 1> kv_lens,
                          ffi::Buffer<ffi::S32, 1> cu_q_lens, ffi::ResultBuffer<ffi::F32, 3> out,
                          float sm_scale, int32_t window, float soft_cap) {
  using KT = ffi::NativeType<DT>;
  AttnArgs<KT> a;
  a.T = q.dimensions()[0];
  a.N = q.dimensions()[1];
  a.H = q.dimensions()[2];
  a.K = k_cache.dimensions()[0];
  a.P = k_cache.dimensions()[1];
  a.B = k_cache.dimensions()[2];
  a.S = page_table.dimensions()[0];
  a.W = page_table.dimensions()[1];
  if (a.N % a.K != 0 || k_cache.dimensions()[3] != a.H || a.N / a.K > 16 || a.H > 512 ||
      kv_lens.dimensions()[0] != a.S || cu_q_lens.dimensions()[0] != a.S + 1)
    return ffi::Error::InvalidArgument("xlaserve_paged_attention: unsupported shapes");
  a.G = a.N / a.K;
  a.q = q.typed_data();
  a.kc = k_cache.typed_data();
  a.vc = v_cache.typed_data();
  a.page_table = page_table.typed_data();
  a.out = out->typed_data();
  a.scale = sm_scale;
  a.soft_cap = soft_cap;
  a.window = window;
  const int32_t* cu = cu_q_lens.typed_data();
  const int32_t* lens = kv_lens.typed_data();
  // Each token's sequence and absolute position (as ops.attention.token_layout).
  const int64_t real = std::clamp<int64_t>(cu[a.S], 0, a.T);
  std::vector<int64_t> seq_of(real), pos_of(real);
  for (int64_t s = 0, t = 0; s < a.S && t < real; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s];
    for (; t < std::min<int64_t>(cu[s + 1], real); ++t) {
      seq_of[t] = s;
      pos_of[t] = lens[s] - q_len + (t - cu[s]);
    }
  }
  std::fill(a.out + real * a.N * a.H, a.out + a.T * a.N * a.H, 0.0f);
  const int64_t tasks = real * a.K;
  ParallelFor(pool, tasks, PoolWorkers(pool), [&](int64_t i) {
    thread_local std::vector<float> scores;
    thread_local std::vector<const KT*> rows;
    const int64_t t = i / a.K, kh = i % a.K;
    AttendOne<KT>(a, t, kh, seq_of[t], pos_of[t], scores, rows);
  });
  return ffi::Error::Success();
}


// ---- top-k selection (the sampler's candidates) ---------------------------------------------
// lax.top_k's results on XLA:CPU, bit for bit: values descending in the total order of their
// bits that XLA's TopK uses (-0.0 below 0.0; NaN above +inf, or below -inf with the sign bit
// set), ties by ascending index. XLA runs one sort-based selection per row on one thread; this is
// a threshold scan (a vector compare of 8 or 16 keys against the k-th best key so far skips
// almost every value) over the rows split across the pool.

inline int32_t TopKKey(float v) {
  uint32_t x;
  std::memcpy(&x, &v, sizeof x);
  return static_cast<int32_t>(x) < 0 ? static_cast<int32_t>(0x7FFFFFFFu - x)
                                     : static_cast<int32_t>(x);
}

// Whether any of the kVL values at p has a key above thresh.
inline bool AnyKeyAbove(const float* p, int32_t thresh) {
#if defined(__AVX512F__)
  __m512i x = _mm512_loadu_si512(p);
  __mmask16 neg = _mm512_cmplt_epi32_mask(x, _mm512_setzero_si512());
  __m512i key = _mm512_mask_sub_epi32(x, neg, _mm512_set1_epi32(0x7FFFFFFF), x);
  return _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(thresh)) != 0;
#else
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m256i flipped = _mm256_sub_epi32(_mm256_set1_epi32(0x7FFFFFFF), x);
  __m256i key = _mm256_blendv_epi8(x, flipped, _mm256_srai_epi32(x, 31));
  return !_mm256_testz_si256(_mm256_cmpgt_epi32(key, _mm256_set1_epi32(thresh)),
                             _mm256_set1_epi32(-1));
#endif
}

struct KeyIndex {
  int32_t key;
  int32_t index;
};

inline bool Before(const KeyIndex& a, const KeyIndex& b) {
  return a.key != b.key ? a.key > b.key : a.index < b.index;
}

// The k best of one row of n values (k <= n) into vals[k], ids[k]; buf holds 2k entries.
void TopKRow(const float* x, int64_t n, int64_t k, float* vals, int32_t* ids, KeyIndex* buf) {
  int64_t size = 0;
  bool full = false;  // buf holds the k best so far; thresh is the k-th one's key
  int32_t thresh = 0;
  auto push = [&](int64_t i) {
    buf[size++] = {TopKKey(x[i]), static_cast<int32_t>(i)};
    if (size == 2 * k) {  // keep the k best: a later value enters only above the k-th key
      std::nth_element(buf, buf + k - 1, buf + size, Before);
      size = k;
      thresh = buf[k - 1].key;
      full = true;
    }
  };
  int64_t i = 0;
  for (; i < n && !full; ++i) push(i);
  for (; i + kVL <= n; i += kVL) {
    if (!AnyKeyAbove(x + i, thresh)) continue;
    for (int64_t j = i; j < i + kVL; ++j) {
      // a key equal to the k-th one has a larger index, so it ranks below all k
      if (!full || TopKKey(x[j]) > thresh) push(j);
    }
  }
  for (; i < n; ++i) {
    if (!full || TopKKey(x[i]) > thresh) push(i);
  }
  std::sort(buf, buf + size, Before);
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = buf[j].index;
    vals[j] = x[buf[j].index];
  }
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                ffi::ResultBuffer<ffi::F32, 2> vals, ffi::ResultBuffer<ffi::S32, 2> ids) {
  const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
  const int64_t k = vals->dimensions()[1];
  if (k < 1 || k > n || ids->dimensions()[1] != k || n > INT32_MAX) {
    return ffi::Error::InvalidArgument("top_k: need 1 <= k <= row length < 2**31");
  }
  const float* xp = x.typed_data();
  float* vp = vals->typed_data();
  int32_t* ip = ids->typed_data();
  ParallelFor(pool, rows, PoolWorkers(pool), [&](int64_t r) {
    std::vector<KeyIndex> buf(2 * k);
    TopKRow(xp + r * n, n, k, vp + r * k, ip + r * k, buf.data());
  });
  return ffi::Error::Success();
}

}  // namespace

// Buffer types as aliases: a comma inside a template argument list would split the macro's
// arguments below.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32Panels = ffi::Buffer<ffi::F32, 3>;
using F16Panels = ffi::Buffer<ffi::F16, 3>;
using F32Rank3 = ffi::Buffer<ffi::F32, 3>;
using F32Rank4 = ffi::Buffer<ffi::F32, 4>;
using F16Rank4 = ffi::Buffer<ffi::F16, 4>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;
using S32Vector = ffi::Buffer<ffi::S32, 1>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveLinearF32, LinearF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Panels>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveLinearF16, LinearF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F16Panels>()
                                  .Ret<F32Matrix>());

using Q8Panels = ffi::Buffer<ffi::S8, 3>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveLinearQ8, LinearQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<Q8Panels>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePagedAttention, PagedAttention<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Rank3>()
                                  .Arg<F32Rank4>()
                                  .Arg<F32Rank4>()
                                  .Arg<S32Matrix>()
                                  .Arg<S32Vector>()
                                  .Arg<S32Vector>()
                                  .Ret<F32Rank3>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("window")
                                  .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Ret<S32Matrix>());

// The same kernel over an f16 cache (--kv-cache-dtype float16).
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePagedAttentionF16, PagedAttention<ffi::F16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Rank3>()
                                  .Arg<F16Rank4>()
                                  .Arg<F16Rank4>()
                                  .Arg<S32Matrix>()
                                  .Arg<S32Vector>()
                                  .Arg<S32Vector>()
                                  .Ret<F32Rank3>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("window")
                                  .Attr<float>("soft_cap"));

// The ISA this build was compiled for; ops/native.py checks it after loading.
extern "C" const char* xlaserve_isa() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}
