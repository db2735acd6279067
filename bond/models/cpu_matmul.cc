// bf16 x bf16 -> f32 matmul for decode-shaped problems (few rows, weights streamed from memory) on
// x86 CPUs with AVX512-BF16, called from JAX through the XLA FFI (see cpu_matmul.py).
//
//   y[M, N] (f32) = x[M, K] (bf16) @ W[K, N] (bf16), with W pre-packed as [N/32, K/2, 32, 2]:
//   for each block of 32 output columns, the K rows come as k-pairs, each pair one contiguous 128
//   bytes (two zmm loads, already in the (k, k+1) interleave `vdpbf16ps` wants). One pass over
//   W is one sequential stream, and the blocks are split across XLA's intra-op thread pool.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCols = 32;   // output columns per block
constexpr int kRows = 8;        // rows of x per register tile (2 * 8 accumulators)

template <int R>
inline void Tile(const uint16_t* x, int64_t k, const uint16_t* w, float* y, int64_t n) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 2, w += 2 * kCols) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + kCols);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * k + j, 4);
      __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      a0[r] = _mm512_dpbf16_ps(a0[r], xv, w0);
      a1[r] = _mm512_dpbf16_ps(a1[r], xv, w1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * n, a0[r]);
    _mm512_storeu_ps(y + r * n + 16, a1[r]);
  }
}

// Output columns [32 b, 32 b + 32) for all m rows.
void Block(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t k, int64_t n,
           int64_t b) {
  const uint16_t* wb = w + b * k * kCols;
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const uint16_t* xr = x + r0 * k;
    float* yr = y + r0 * n + b * kCols;
    switch (m - r0 >= kRows ? kRows : m - r0) {
      case 8: Tile<8>(xr, k, wb, yr, n); break;
      case 7: Tile<7>(xr, k, wb, yr, n); break;
      case 6: Tile<6>(xr, k, wb, yr, n); break;
      case 5: Tile<5>(xr, k, wb, yr, n); break;
      case 4: Tile<4>(xr, k, wb, yr, n); break;
      case 3: Tile<3>(xr, k, wb, yr, n); break;
      case 2: Tile<2>(xr, k, wb, yr, n); break;
      default: Tile<1>(xr, k, wb, yr, n); break;
    }
  }
}

// Packs columns [32 b, 32 b + 32) of w [K, N] into out block b: [K/2, 32, 2].
void PackBlock(const uint16_t* w, uint16_t* out, int64_t k, int64_t n, int64_t b) {
  // Interleave two rows' 32 columns: (r0[c], r1[c]) for c = 0..15, then c = 16..31.
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                      40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                      32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  uint16_t* ob = out + b * k * kCols;
  for (int64_t j = 0; j < k; j += 2) {
    __m512i r0 = _mm512_loadu_si512(w + j * n + b * kCols);
    __m512i r1 = _mm512_loadu_si512(w + (j + 1) * n + b * kCols);
    _mm512_storeu_si512(ob + j * kCols, _mm512_permutex2var_epi16(r0, lo, r1));
    _mm512_storeu_si512(ob + j * kCols + kCols, _mm512_permutex2var_epi16(r0, hi, r1));
  }
}

// Blocks are claimed `grain` at a time from a shared counter by the calling thread and by the
// helpers it schedules. The caller waits only for blocks a helper has claimed (and is running),
// so a helper that never gets a thread cannot deadlock the call; a late helper finds no work.
struct Work {
  const uint16_t* x;   // null: pack w into out instead of multiplying
  const uint16_t* w;
  float* y;
  uint16_t* out;
  int64_t m, k, n, blocks, grain;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (;;) {
      int64_t start = next.fetch_add(grain, std::memory_order_relaxed);
      if (start >= blocks) return;
      int64_t stop = start + grain < blocks ? start + grain : blocks;
      for (int64_t b = start; b < stop; ++b) {
        if (x) {
          Block(x, w, y, m, k, n, b);
        } else {
          PackBlock(w, out, k, n, b);
        }
      }
      done.fetch_add(stop - start, std::memory_order_release);
    }
  }
};

// Runs `work` on the calling thread and on the other threads of XLA's intra-op pool.
void RunParallel(ffi::ThreadPool& pool, std::shared_ptr<Work> work) {
  if (work->blocks == 0) return;
  // The caller works too: with the pool's other threads that is one thread per pool thread.
  int64_t helpers = pool.num_threads() > 1 ? pool.num_threads() - 1 : 0;
  int64_t parts = 4 * (helpers + 1);
  work->grain = work->blocks / parts > 0 ? work->blocks / parts : 1;
  for (int64_t i = 0; i < helpers && i + 1 < work->blocks; ++i) {
    pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->blocks) _mm_pause();
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != kCols || wd[3] != 2 ||
      xd[1] != 2 * wd[1]) {
    return ffi::Error::InvalidArgument("bond_bf16_matmul: want x [M, K] and w [N/32, K/2, 32, 2]");
  }
  auto work = std::make_shared<Work>();
  work->x = reinterpret_cast<const uint16_t*>(x.typed_data());
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->y = y->typed_data();
  work->m = xd[0];
  work->k = xd[1];
  work->n = wd[0] * kCols;
  work->blocks = xd[0] > 0 ? wd[0] : 0;
  RunParallel(pool, work);
  return ffi::Error::Success();
}

ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::BF16> out) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || wd[0] % 2 || wd[1] % kCols) {
    return ffi::Error::InvalidArgument("bond_bf16_pack: want w [K, N], K even, N % 32 == 0");
  }
  auto work = std::make_shared<Work>();
  work->x = nullptr;
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->out = reinterpret_cast<uint16_t*>(out->typed_data());
  work->k = wd[0];
  work->n = wd[1];
  work->blocks = wd[1] / kCols;
  RunParallel(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16Matmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16Pack, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
