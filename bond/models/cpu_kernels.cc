// Decode-loop kernels for x86 CPUs with AVX512-BF16 (the matmuls on AMX tiles where the CPU has
// them), called from JAX through the XLA FFI (see cpu_kernels.py): a bf16 matmul over pre-packed
// weights, the same matmul with a GeGLU epilogue,
// the packing (from bf16 or, rounding on the way, f32 weights), decode attention, the token
// lookup of a bf16 table and greedy decoding's choice over the logits.
//
//   y[M, N] (f32) = x[M, K] (bf16) @ W[K, N] (bf16), with W pre-packed as [N/32, K/2, 32, 2]:
//   for each block of 32 output columns, the K rows come as k-pairs, each pair one contiguous 128
//   bytes (two zmm loads, already in the (k, k+1) interleave `vdpbf16ps` wants). One pass over
//   W is one sequential stream, and the blocks are split across XLA's intra-op thread pool.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCols = 32;   // output columns per block
constexpr int kRows = 8;        // rows of x per register tile (2 * 8 accumulators)

// exp(x) to about 1e-6 relative (2^f by its Taylor series on |f| <= 1/2); 0 below -100.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Rounds f32 to bf16 (nearest even) and back, like XLA's convert.
inline __m512 RoundBf16(__m512 x) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// jax.nn.gelu(x, approximate=True) = x / 2 * (1 + tanh(z)), z = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x / (1 + exp(-2 z)): the same function without the cancellation in 1 + tanh(z)
// for negative x, where it would lose most of f32's digits.
inline __m512 GeluTanh(__m512 x) {
  __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  __m512 z = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f),          // -2 sqrt(2 / pi)
                           _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), Exp(z)));
}

// 16 f32 -> their bf16 bits exactly as XLA's convert rounds them: to nearest even, subnormals
// kept (`vcvtneps2bf16`, as in `RoundBf16`, flushes them to zero), NaNs quieted.
inline __m256i ToBf16Bits(__m512 x) {
  __m512i b = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x00400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// What a matmul writes: y = x @ W in f32, the same rounded to bf16 (as XLA's convert), or the
// GeGLU of each block's 16 gate and 16 up columns in bf16.
enum Out { kF32, kBf16, kGeglu };

// Writes row r of a block from its 32 f32 sums a0 (columns 0-15), a1 (16-31): y in f32 or bf16
// (row stride n), or with kGeglu 16 columns of h (row stride n / 2).
template <int kOut>
inline void StoreRow(__m512 a0, __m512 a1, void* out, int64_t r, int64_t n) {
  if constexpr (kOut == kGeglu) {
    // As gemma.MLP: gate and up rounded to bf16, gelu(gate) * up rounded to bf16.
    __m512 h = _mm512_mul_ps(GeluTanh(RoundBf16(a0)), RoundBf16(a1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + r * (n / 2)),
                        (__m256i)_mm512_cvtneps_pbh(h));
  } else if constexpr (kOut == kBf16) {
    uint16_t* y = static_cast<uint16_t*>(out) + r * n;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), ToBf16Bits(a0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 16), ToBf16Bits(a1));
  } else {
    float* y = static_cast<float*>(out);
    _mm512_storeu_ps(y + r * n, a0);
    _mm512_storeu_ps(y + r * n + 16, a1);
  }
}

// Rows [0, R) of one block: y = x @ W (32 columns, row stride n), or with kGeglu 16 columns of
// h (row stride n / 2).
template <int R, int kOut>
inline void Tile(const uint16_t* x, int64_t k, const uint16_t* w, void* out, int64_t n) {
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
  for (int r = 0; r < R; ++r) StoreRow<kOut>(a0[r], a1[r], out, r, n);
}

// Where row r0 of block b is written (with kGeglu: columns [16 b, 16 b + 16) of h).
template <int kOut>
inline void* BlockOut(void* out, int64_t r0, int64_t n, int64_t b) {
  auto* o16 = static_cast<uint16_t*>(out);
  return kOut == kGeglu ? static_cast<void*>(o16 + r0 * (n / 2) + b * 16)
         : kOut == kBf16 ? static_cast<void*>(o16 + r0 * n + b * kCols)
                         : static_cast<void*>(static_cast<float*>(out) + r0 * n + b * kCols);
}

// ---- AMX-BF16 tiles (Intel Sapphire Rapids and later), where the CPU and the OS allow ---------
// The same block on the tile unit: per 32 k values, a tile of up to 16 rows of x (64 bytes a
// row, straight from x) times two tiles of the packed block (16 k-pairs x 16 columns each: the
// packed rows are 128 bytes, so each tile reads one half of them with a 128-byte stride; the
// packed layout is already the tile unit's (k, k+1) interleave), summed into two 16 x 16 f32
// tiles. Two row groups at a time (8 tiles). The products of bf16 values are exact in f32 on
// both units; the tile unit sums them in its own order, so the f32 results agree with `Tile`'s
// to f32 rounding, not bit for bit (both are as close to the float64 sums: tests). The sums then
// go through `StoreRow` as in `Tile`. 2-4x `Tile`'s GFLOP/s at 8-32 rows (benchmarks/matmul.py).

// -1 not yet known, 0 off (no AMX, the OS refused it, or BOND_AMX=0), 1 on.
std::atomic<int> amx_state{-1};

bool AmxUsable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;      // AMX-BF16, AMX-TILE
  // Linux hands out the tile registers' state per process, on request (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); without it the first tile instruction faults.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool UseAmx() {
  int state = amx_state.load(std::memory_order_relaxed);
  if (state < 0) {
    const char* env = std::getenv("BOND_AMX");
    state = (env != nullptr && env[0] == '0') ? 0 : AmxUsable() ? 1 : 0;
    amx_state.store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 5 rows of x (top, bottom group); 1, 4 the block's two column halves; 2, 3 and 6, 7
// the sums of the top and bottom groups. Set on every block: other code on this thread (XLA's
// own AMX matmuls) may have configured the tiles differently in between.
__attribute__((target("amx-tile"))) void ConfigureTiles(int top, int bottom) {
  TileConfig cfg;
  for (int t : {1, 4}) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  for (int t : {0, 2, 3}) cfg.colsb[t] = 64, cfg.rows[t] = top;
  if (bottom) for (int t : {5, 6, 7}) cfg.colsb[t] = 64, cfg.rows[t] = bottom;
  asm volatile("" ::: "memory");   // the whole struct written before ldtilecfg reads it
  _tile_loadconfig(&cfg);
}

// `Block` on tiles; k a multiple of 32.
template <int kOut>
__attribute__((target("amx-tile,amx-bf16"))) void BlockAmx(const uint16_t* x, const uint16_t* w,
                                                             void* out, int64_t m, int64_t k,
                                                             int64_t n, int64_t b) {
  const uint16_t* wb = w + b * k * kCols;
  alignas(64) float sums[32 * kCols];
  void* o = BlockOut<kOut>(out, 0, n, b);
  int configured = -1;
  for (int64_t r0 = 0; r0 < m;) {
    int rows = static_cast<int>(std::min<int64_t>(m - r0, 32));
    int top = std::min(rows, 16), bottom = rows - top;
    if (top * 32 + bottom != configured) {
      ConfigureTiles(top, bottom);
      configured = top * 32 + bottom;
    }
    const uint16_t* xr = x + r0 * k;
    _tile_zero(2);
    _tile_zero(3);
    if (bottom) {
      _tile_zero(6);
      _tile_zero(7);
    }
    for (int64_t j = 0; j < k; j += 32) {
      const uint16_t* wj = wb + j * kCols;   // k-pairs j/2 .. j/2 + 15
      _tile_loadd(1, wj, 2 * kCols * 2);
      _tile_loadd(4, wj + kCols, 2 * kCols * 2);
      _tile_loadd(0, xr + j, k * 2);
      _tile_dpbf16ps(2, 0, 1);
      _tile_dpbf16ps(3, 0, 4);
      if (bottom) {
        _tile_loadd(5, xr + 16 * k + j, k * 2);
        _tile_dpbf16ps(6, 5, 1);
        _tile_dpbf16ps(7, 5, 4);
      }
    }
    _tile_stored(2, sums, kCols * 4);
    _tile_stored(3, sums + 16, kCols * 4);
    if (bottom) {
      _tile_stored(6, sums + 16 * kCols, kCols * 4);
      _tile_stored(7, sums + 16 * kCols + 16, kCols * 4);
    }
    for (int r = 0; r < rows; ++r) {
      StoreRow<kOut>(_mm512_load_ps(sums + r * kCols), _mm512_load_ps(sums + r * kCols + 16), o,
                     r0 + r, n);
    }
    r0 += rows;
  }
  _tile_release();
}

// Output columns [32 b, 32 b + 32) for all m rows (with kGeglu: columns [16 b, 16 b + 16) of h).
template <int kOut>
void Block(const uint16_t* x, const uint16_t* w, void* out, int64_t m, int64_t k, int64_t n,
           int64_t b) {
  if (k % 32 == 0 && UseAmx()) return BlockAmx<kOut>(x, w, out, m, k, n, b);
  const uint16_t* wb = w + b * k * kCols;
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const uint16_t* xr = x + r0 * k;
    void* o = BlockOut<kOut>(out, r0, n, b);
    switch (m - r0 >= kRows ? kRows : m - r0) {
      case 8: Tile<8, kOut>(xr, k, wb, o, n); break;
      case 7: Tile<7, kOut>(xr, k, wb, o, n); break;
      case 6: Tile<6, kOut>(xr, k, wb, o, n); break;
      case 5: Tile<5, kOut>(xr, k, wb, o, n); break;
      case 4: Tile<4, kOut>(xr, k, wb, o, n); break;
      case 3: Tile<3, kOut>(xr, k, wb, o, n); break;
      case 2: Tile<2, kOut>(xr, k, wb, o, n); break;
      default: Tile<1, kOut>(xr, k, wb, o, n); break;
    }
  }
}

// 32 consecutive f32 -> their 32 bf16 bits in one zmm (`ToBf16Bits`); `count` (< 32) loads
// only the first `count` (the rest are 0).
inline __m512i Load32Bf16(const float* p, int count = 32) {
  __mmask16 m0 = count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
  __mmask16 m1 = count >= 32 ? 0xFFFF : count <= 16 ? 0 : (__mmask16)((1u << (count - 16)) - 1);
  __m256i lo = ToBf16Bits(_mm512_maskz_loadu_ps(m0, p));
  __m256i hi = ToBf16Bits(_mm512_maskz_loadu_ps(m1, p + 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

constexpr int64_t kPackRows = 16;   // rows of w per packing task

// 32 consecutive weights as bf16 bits: bf16 as they are, f32 rounded (`Load32Bf16`).
inline __m512i Load32(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline __m512i Load32(const float* p) { return Load32Bf16(p); }

// Packs rows [j0, j1) of w [K, N] (j0, j1 even) into every block: block b is [K/2, 32, 2] and
// holds columns [32 b, 32 b + 32). A task reads whole rows in order and writes (j1 - j0) * 64
// contiguous bytes per block. From f32, each weight is rounded to bf16 on the way.
template <typename T>
void PackRows(const T* w, uint16_t* out, int64_t k, int64_t n, int64_t j0, int64_t j1) {
  // Interleave two rows' 32 columns: (r0[c], r1[c]) for c = 0..15, then c = 16..31.
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                      40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                      32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t b = 0; b < n / kCols; ++b) {
    uint16_t* ob = out + b * k * kCols;
    for (int64_t j = j0; j < j1; j += 2) {
      __m512i r0 = Load32(w + j * n + b * kCols);
      __m512i r1 = Load32(w + (j + 1) * n + b * kCols);
      _mm512_storeu_si512(ob + j * kCols, _mm512_permutex2var_epi16(r0, lo, r1));
      _mm512_storeu_si512(ob + j * kCols + kCols, _mm512_permutex2var_epi16(r0, hi, r1));
    }
  }
}

// 16 x 16 transpose of 32-bit lanes in registers: afterwards lane y of r[x] is what lane x of
// r[y] was (unpack 32-bit, unpack 64-bit, then two 128-bit lane shuffles).
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
  }
}

// `count` (<= 16) consecutive (k, k+1) pairs of a row as 32-bit lanes: f32 rounded to bf16
// (`Load32Bf16`), bf16 as they are.
inline __m512i LoadPairs(const float* p, int count) { return Load32Bf16(p, 2 * count); }
inline __m512i LoadPairs(const uint16_t* p, int count) {
  return _mm512_maskz_loadu_epi32(count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1), p);
}

// Block b of the packing of w.T for a w [N, K] (a [V, D] embedding packed as the [D, V]
// weight of the logits), f32 rounded to bf16 or bf16: rows 32 b .. 32 b + 31 of w, each a run
// of K/2 (k, k+1) pairs (one 32-bit lane each), become the 32 columns of the block; pair i of
// row c lands at [i, c]. 16 rows x 16 pairs at a time are transposed in registers, so every
// store writes 16 consecutive columns (a scatter per row ran at a third of the memory
// bandwidth).
template <typename T>
void PackBlockTransposed(const T* w, uint32_t* out, int64_t k, int64_t b) {
  const int64_t pairs = k / 2;
  uint32_t* ob = out + b * pairs * kCols;
  const T* block = w + b * kCols * k;
  for (int64_t i = 0; i < pairs; i += 16) {
    const int count = static_cast<int>(pairs - i < 16 ? pairs - i : 16);
    for (int64_t half = 0; half < kCols; half += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = LoadPairs(block + (half + c) * k + 2 * i, count);
      Transpose16x16(r);
      for (int j = 0; j < count; ++j) _mm512_storeu_si512(ob + (i + j) * kCols + half, r[j]);
    }
  }
}

// Blocks are claimed `grain` at a time from a shared counter by the calling thread and by the
// helpers it schedules. The caller waits only for blocks a helper has claimed (and is running),
// so a helper that never gets a thread cannot deadlock the call; a late helper finds no work.
struct Work {
  std::function<void(int64_t)> block;
  int64_t blocks = 0, grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (;;) {
      int64_t start = next.fetch_add(grain, std::memory_order_relaxed);
      if (start >= blocks) return;
      int64_t stop = start + grain < blocks ? start + grain : blocks;
      for (int64_t b = start; b < stop; ++b) block(b);
      done.fetch_add(stop - start, std::memory_order_release);
    }
  }
};

// Runs block(0 .. blocks-1) on the calling thread and on the other threads of XLA's pool.
void RunParallel(ffi::ThreadPool& pool, int64_t blocks, std::function<void(int64_t)> block) {
  if (blocks <= 0) return;
  auto work = std::make_shared<Work>();
  work->block = std::move(block);
  work->blocks = blocks;
  // The caller works too: with the pool's other threads that is one thread per pool thread.
  int64_t helpers = pool.num_threads() > 1 ? pool.num_threads() - 1 : 0;
  int64_t parts = 4 * (helpers + 1);
  work->grain = blocks / parts > 0 ? blocks / parts : 1;
  for (int64_t i = 0; i < helpers && i + 1 < blocks; ++i) {
    pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < blocks) _mm_pause();
}

// Packs all of w [K, N] (bf16, or f32 rounded on the way), kPackRows rows per task.
template <typename T>
void PackAllRows(ffi::ThreadPool& pool, const T* w, uint16_t* out, int64_t k, int64_t n) {
  RunParallel(pool, (k + kPackRows - 1) / kPackRows, [=](int64_t t) {
    PackRows(w, out, k, n, t * kPackRows, (t + 1) * kPackRows < k ? (t + 1) * kPackRows : k);
  });
}

// y = x @ W ([M, N], f32 or bf16) or, with kGeglu, h = GeGLU (bf16 [M, N / 2]); W packed
// [N/32, K/2, 32, 2].
template <int kOut>
ffi::Error RunMatmul(ffi::ThreadPool& pool, const ffi::Buffer<ffi::BF16>& x,
                     const ffi::Buffer<ffi::BF16>& w, void* out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != kCols || wd[3] != 2 ||
      xd[1] != 2 * wd[1]) {
    return ffi::Error::InvalidArgument(
        "bond matmul: want x [M, K] and a packed w [blocks, K/2, 32, 2]");
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  int64_t m = xd[0], k = xd[1], n = wd[0] * kCols;
  RunParallel(pool, m > 0 ? wd[0] : 0,
              [=](int64_t b) { Block<kOut>(xp, wp, out, m, k, n, b); });
  return ffi::Error::Success();
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                ffi::ResultBuffer<ffi::F32> y) {
  return RunMatmul<kF32>(pool, x, w, y->typed_data());
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::BF16> y) {
  return RunMatmul<kBf16>(pool, x, w, y->typed_data());
}

// h [M, F] (bf16) = gelu_tanh(x @ W_gate) * (x @ W_up), W packed so that block b holds gate
// columns [16 b, 16 b + 16) then the same up columns (cpu_kernels.pack_geglu).
ffi::Error GegluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                     ffi::ResultBuffer<ffi::BF16> h) {
  return RunMatmul<kGeglu>(pool, x, w, h->typed_data());
}

// A large output is fresh memory: each 4 KiB page faults on its first write (82k faults, about
// half the time of packing the 262,144 x 640 embedding). Ask for 2 MiB pages where the OS grants
// them on request (transparent_hugepage=madvise); a refused hint changes nothing.
void PreferHugePages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
}

// out = the packing of w [K, N] (or, transposed, of w.T for w [N, K]), bf16.
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> w, bool transposed,
                    ffi::ResultBuffer<ffi::BF16> out) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("bond_bf16_pack: want a 2-d w");
  int64_t k = transposed ? wd[1] : wd[0], n = transposed ? wd[0] : wd[1];
  if (k % 2 || n % kCols) {
    return ffi::Error::InvalidArgument("bond_bf16_pack: want K even and N % 32 == 0");
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  auto* op = reinterpret_cast<uint16_t*>(out->typed_data());
  PreferHugePages(op, static_cast<size_t>(k * n) * sizeof(uint16_t));
  if (transposed) {
    RunParallel(pool, n / kCols, [=](int64_t b) {
      PackBlockTransposed(wp, reinterpret_cast<uint32_t*>(op), k, b);
    });
  } else {
    PackAllRows(pool, wp, op, k, n);
  }
  return ffi::Error::Success();
}

// out = the packing of w [K, N] (or, transposed, of w.T for w [N, K]) with every f32 weight
// rounded to bf16: the cast and the packing in one pass.
ffi::Error PackF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, bool transposed,
                       ffi::ResultBuffer<ffi::BF16> out) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("bond_f32_pack: want a 2-d w");
  int64_t k = transposed ? wd[1] : wd[0], n = transposed ? wd[0] : wd[1];
  if (k % 2 || n % kCols) {
    return ffi::Error::InvalidArgument("bond_f32_pack: want K even and N % 32 == 0");
  }
  const float* wp = w.typed_data();
  auto* op = reinterpret_cast<uint16_t*>(out->typed_data());
  PreferHugePages(op, static_cast<size_t>(k * n) * sizeof(uint16_t));
  if (transposed) {
    RunParallel(pool, n / kCols, [=](int64_t b) {
      PackBlockTransposed(wp, reinterpret_cast<uint32_t*>(op), k, b);
    });
  } else {
    PackAllRows(pool, wp, op, k, n);
  }
  return ffi::Error::Success();
}

// out [R, D] = rows ids [R] of the bf16 table [V, D] (ids clipped into [0, V)): the token
// lookup. XLA:CPU has no bf16 gather and turns a bf16 table into a uint16 copy of all of it
// (335 MB for Gemma 3's embedding) to gather a few rows.
ffi::Error TakeRowsImpl(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids,
                        ffi::ResultBuffer<ffi::BF16> out) {
  auto td = table.dimensions();
  if (td.size() != 2 || td[0] < 1) {
    return ffi::Error::InvalidArgument("bond_take_rows: want a table [V, D] with V >= 1");
  }
  const int64_t v = td[0], d = td[1], r = static_cast<int64_t>(ids.element_count());
  const auto* tp = reinterpret_cast<const uint16_t*>(table.typed_data());
  auto* op = reinterpret_cast<uint16_t*>(out->typed_data());
  const int32_t* ip = ids.typed_data();
  for (int64_t i = 0; i < r; ++i) {
    int64_t id = ip[i] < 0 ? 0 : (ip[i] >= v ? v - 1 : ip[i]);
    std::memcpy(op + i * d, tp + id * d, static_cast<size_t>(d) * sizeof(uint16_t));
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Decode attention over a bf16 KV cache held as uint16 bits (bond.models.gemma.init_cache):
// one query token per row, logits and softmax in f32, probabilities rounded to bf16 before
// the value product, as the XLA path (gemma.Attention) computes it.

constexpr float kMask = -2.3819763e38f;   // gemma.K_MASK

// Element j = the sum of a[j]'s 16 lanes: a transpose-and-add tree, 15 adds and 31 shuffles
// for 16 sums (one _mm512_reduce_add_ps costs about as much as 8 of them).
__attribute__((always_inline)) inline __m512 Reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {   // 256-bit halves: b[i] = (a[2i] partials, a[2i+1] partials)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {   // 128-bit lane m of c[i]: partials of a[4i + m]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 f = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Element 4m + t of f is the sum of a[4t + m].
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, f);
}

inline __mmask32 Prefix32(int64_t n) {
  return n >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << n) - 1);
}

inline __mmask16 Prefix16(int64_t n) {
  return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
}

// Asks for the cache lines of [p, p + bytes) ahead of their use.
inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);
}

// Element j < 16 of the result: the dot over n bf16 values of a[j / C] with b[j % C], where
// a[i] = a0 + i * astride (i < 16 / C) and b[c] = b0 + c * bstride (c < C, columns at or past
// `count` read column 0 instead, their results unused): 16 dot products sharing 16 / C + C loads
// per 32 values, so that G query heads read each key (and each value row) once, not G times.
// Inlined, so that the 16 accumulators stay in registers (not inlined, GCC spilled them).
template <int C>
__attribute__((always_inline)) inline __m512 DotTile(const uint16_t* a0, int64_t astride,
                                                     const uint16_t* b0, int64_t bstride,
                                                     int64_t count, int64_t n) {
  constexpr int A = 16 / C;
  __m512 acc[16];
  const uint16_t* b[C];
  for (int c = 0; c < C; ++c) b[c] = b0 + (c < count ? c : 0) * bstride;
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 32) {
    __mmask32 valid = Prefix32(n - i);
    __m512bh bv[C];
    for (int c = 0; c < C; ++c) bv[c] = (__m512bh)_mm512_maskz_loadu_epi16(valid, b[c] + i);
    for (int r = 0; r < A; ++r) {
      __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(valid, a0 + r * astride + i);
      for (int c = 0; c < C; ++c) acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], av, bv[c]);
    }
  }
  return Reduce16(acc);
}

// One (row, kv head) for GT query heads at a time (GT divides G; 16 / GT keys or value rows per
// tile): q [G, Hd] bf16, keys at k + s * kstride [Hd], values v [Hd, S].
template <int GT>
void AttendOne(const uint16_t* q, const uint16_t* k, int64_t kstride, const uint16_t* v,
               const bool* mask, float softcap, int64_t g_count, int64_t hd, int64_t s_len,
               float* out, float* scratch) {
  constexpr int C = 16 / GT;          // keys (then value rows) per tile
  int64_t s16 = (s_len + 15) / 16 * 16, s32 = (s_len + 31) / 32 * 32;
  float* p = scratch;                                           // [G, s16] f32
  auto* pb = reinterpret_cast<uint16_t*>(scratch + g_count * s16);   // [G, s32] bf16 bits
  bool any = false;
  for (int64_t s = 0; s < s_len; ++s) any |= mask[s];
  for (int64_t g0 = 0; g0 < g_count; g0 += GT) {
    alignas(64) float l[16];
    for (int64_t s0 = 0; s0 < s_len; s0 += C) {
      int64_t count = s_len - s0 < C ? s_len - s0 : C;
      // The cache streams from memory (a step's weights evict it): fetch two tiles ahead.
      for (int64_t s = s0 + 2 * C; s < s0 + 3 * C && s < s_len; ++s) {
        Prefetch(k + s * kstride, hd * 2);
      }
      _mm512_store_ps(l, DotTile<C>(q + g0 * hd, hd, k + s0 * kstride, kstride, count, hd));
      for (int gi = 0; gi < GT; ++gi) {
        for (int c = 0; c < count; ++c) {
          float x = l[gi * C + c];
          if (softcap > 0) x = std::tanh(x / softcap) * softcap;
          p[(g0 + gi) * s16 + s0 + c] = mask[s0 + c] ? x : kMask;
        }
      }
    }
    for (int64_t h = 0; h < 2 * C && h < hd; ++h) Prefetch(v + h * s_len, s_len * 2);
    for (int64_t g = g0; g < g0 + GT; ++g) {
      float* pg = p + g * s16;
      for (int64_t s = s_len; s < s16; ++s) pg[s] = kMask;
      float top = kMask;
      for (int64_t s = 0; s < s_len; ++s) top = pg[s] > top ? pg[s] : top;
      __m512 total = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < s16; s0 += 16) {
        __m512 x = _mm512_loadu_ps(pg + s0);
        __mmask16 keep = Prefix16(s_len - s0);
        if (any) keep &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMask), _CMP_NEQ_OQ);
        __m512 e = _mm512_maskz_mov_ps(keep, Exp(_mm512_sub_ps(x, _mm512_set1_ps(top))));
        _mm512_storeu_ps(pg + s0, e);
        total = _mm512_add_ps(total, e);
      }
      __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
      uint16_t* pbg = pb + g * s32;
      for (int64_t s0 = 0; s0 < s32; s0 += 16) {
        __m512 e = s0 < s16 ? _mm512_loadu_ps(pg + s0) : _mm512_setzero_ps();
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pbg + s0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(e, inv)));
      }
    }
    for (int64_t h0 = 0; h0 < hd; h0 += C) {
      int64_t count = hd - h0 < C ? hd - h0 : C;
      for (int64_t h = h0 + 2 * C; h < h0 + 3 * C && h < hd; ++h) {
        Prefetch(v + h * s_len, s_len * 2);
      }
      _mm512_store_ps(l, DotTile<C>(pb + g0 * s32, s32, v + h0 * s_len, s_len, count, s_len));
      for (int gi = 0; gi < GT; ++gi) {
        for (int c = 0; c < count; ++c) out[(g0 + gi) * hd + h0 + c] = l[gi * C + c];
      }
    }
  }
}

// `AttendOne` with the widest tile of query heads that divides g, and its scratch (floats).
auto AttendFor(int64_t g) {
  return g % 8 == 0 ? AttendOne<8> : g % 4 == 0 ? AttendOne<4> : g % 2 == 0 ? AttendOne<2>
                                                                           : AttendOne<1>;
}

int64_t AttendScratch(int64_t g, int64_t s_len) {
  return g * ((s_len + 15) / 16 * 16 + (s_len + 31) / 32 * 16);
}

ffi::Error AttnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U16> k,
                    ffi::Buffer<ffi::U16> v, ffi::Buffer<ffi::PRED> mask, float softcap,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2) {
    return ffi::Error::InvalidArgument("bond_decode_attention: want q [R, K, G, Hd], "
                                       "k [R, S, K, Hd], v [R, K, Hd, S], mask [R, S]");
  }
  int64_t r = qd[0], kh = qd[1], g = qd[2], hd = qd[3], s_len = kd[1];
  if (kd[0] != r || kd[2] != kh || kd[3] != hd || vd[0] != r || vd[1] != kh || vd[2] != hd ||
      vd[3] != s_len || md[0] != r || md[1] != s_len) {
    return ffi::Error::InvalidArgument("bond_decode_attention: inconsistent shapes");
  }
  const auto* qp = reinterpret_cast<const uint16_t*>(q.typed_data());
  const uint16_t* kp = k.typed_data();
  const uint16_t* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t scratch = AttendScratch(g, s_len);
  const auto attend = AttendFor(g);
  RunParallel(pool, r * kh, [=](int64_t task) {
    int64_t row = task / kh, head = task % kh;
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(scratch)) buf.resize(scratch);
    attend(qp + task * g * hd, kp + (row * s_len * kh + head) * hd, kh * hd,
           vp + task * hd * s_len, mp + row * s_len, softcap, g, hd, s_len,
           op + task * g * hd, buf.data());
  });
  return ffi::Error::Success();
}

// A bf16 value held in an f32 lane, rounded as XLA's convert rounds (`ToBf16Bits`).
inline __m512 RoundExact(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ToBf16Bits(x)), 16));
}

// n (<= 16) bf16 bits at p, as f32 lanes (0 past n).
inline __m512 LoadBf16(const uint16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(Prefix16(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void StoreBf16(uint16_t* p, __m512 x, int64_t n) {
  _mm256_mask_storeu_epi16(p, Prefix16(n), ToBf16Bits(x));
}

// The split-half RoPE of x [Hd] by (cos, sin) [Hd / 2] into y, then (scale != 1) y * scale, in
// bf16 as `gemma.rotate` computes it on XLA:CPU: each product, sum and the scaling rounded.
void Rotate(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t hd, float scale,
            uint16_t* y) {
  const int64_t half = hd / 2;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < half; j += 16) {
    int64_t n = half - j < 16 ? half - j : 16;
    __m512 x1 = LoadBf16(x + j, n), x2 = LoadBf16(x + half + j, n);
    __m512 c = LoadBf16(cos + j, n), s = LoadBf16(sin + j, n);
    __m512 y1 = RoundExact(_mm512_sub_ps(RoundExact(_mm512_mul_ps(x1, c)),
                                         RoundExact(_mm512_mul_ps(x2, s))));
    __m512 y2 = RoundExact(_mm512_add_ps(RoundExact(_mm512_mul_ps(x2, c)),
                                         RoundExact(_mm512_mul_ps(x1, s))));
    if (scale != 1.0f) {
      y1 = _mm512_mul_ps(y1, sc);
      y2 = _mm512_mul_ps(y2, sc);
    }
    StoreBf16(y + j, y1, n);
    StoreBf16(y + half + j, y2, n);
  }
}

// One decode step of `gemma.Backend.attention` on a bf16 cache: RoPE on the new key and the
// queries, the key and value written into the cache at slot `index` (in place: the caches are
// aliased to the outputs), then `AttendOne` as `bond_decode_attention`.
ffi::Error UpdateAttnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                          ffi::Buffer<ffi::BF16> key, ffi::Buffer<ffi::BF16> value,
                          ffi::Buffer<ffi::BF16> cos, ffi::Buffer<ffi::BF16> sin,
                          ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::U16> k,
                          ffi::Buffer<ffi::U16> v, ffi::Buffer<ffi::PRED> mask, float softcap,
                          float query_scale, ffi::ResultBuffer<ffi::BF16> out,
                          ffi::ResultBuffer<ffi::U16> k_out, ffi::ResultBuffer<ffi::U16> v_out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  auto nk = key.dimensions(), nv = value.dimensions(), cd = cos.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || nk.size() != 3 ||
      nv.size() != 3 || cd.size() != 2 || sin.dimensions().size() != 2 ||
      index.dimensions().size() != 0) {
    return ffi::Error::InvalidArgument(
        "bond_decode_attention_update: want q [R, K, G, Hd], key and value [R, K, Hd], cos and "
        "sin [R, Hd/2], index [], k [R, S, K, Hd], v [R, K, Hd, S], mask [R, S]");
  }
  int64_t r = qd[0], kh = qd[1], g = qd[2], hd = qd[3], s_len = kd[1];
  if (kd[0] != r || kd[2] != kh || kd[3] != hd || vd[0] != r || vd[1] != kh || vd[2] != hd ||
      vd[3] != s_len || md[0] != r || md[1] != s_len || nk[0] != r || nk[1] != kh ||
      nk[2] != hd || nv[0] != r || nv[1] != kh || nv[2] != hd || hd % 2 || cd[0] != r ||
      cd[1] != hd / 2 || sin.dimensions()[0] != r || sin.dimensions()[1] != hd / 2 || s_len < 1) {
    return ffi::Error::InvalidArgument("bond_decode_attention_update: inconsistent shapes");
  }
  uint16_t* kp = k_out->typed_data();
  uint16_t* vp = v_out->typed_data();
  // Where XLA did not alias a cache to its output, start from a copy of it.
  if (kp != k.typed_data()) std::memcpy(kp, k.typed_data(), k.size_bytes());
  if (vp != v.typed_data()) std::memcpy(vp, v.typed_data(), v.size_bytes());
  // As XLA's dynamic-update-slice: the start index clamped into the buffer.
  const int64_t at = std::clamp<int64_t>(*index.typed_data(), 0, s_len - 1);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.typed_data());
  const auto* kn = reinterpret_cast<const uint16_t*>(key.typed_data());
  const auto* vn = reinterpret_cast<const uint16_t*>(value.typed_data());
  const auto* cp = reinterpret_cast<const uint16_t*>(cos.typed_data());
  const auto* sp = reinterpret_cast<const uint16_t*>(sin.typed_data());
  const bool* mp = mask.typed_data();
  auto* op = reinterpret_cast<uint16_t*>(out->typed_data());
  const int64_t scratch = AttendScratch(g, s_len);
  const auto attend = AttendFor(g);
  RunParallel(pool, r * kh, [=](int64_t task) {
    int64_t row = task / kh, head = task % kh;
    const uint16_t* c = cp + row * (hd / 2);
    const uint16_t* s = sp + row * (hd / 2);
    Rotate(kn + task * hd, c, s, hd, 1.0f, kp + ((row * s_len + at) * kh + head) * hd);
    uint16_t* vcol = vp + task * hd * s_len + at;
    for (int64_t h = 0; h < hd; ++h) vcol[h * s_len] = vn[task * hd + h];
    thread_local std::vector<float> buf;
    thread_local std::vector<uint16_t> qbuf;
    thread_local std::vector<float> obuf;
    if (buf.size() < static_cast<size_t>(scratch)) buf.resize(scratch);
    if (qbuf.size() < static_cast<size_t>(g * hd)) qbuf.resize(g * hd);
    if (obuf.size() < static_cast<size_t>(g * hd)) obuf.resize(g * hd);
    for (int64_t i = 0; i < g; ++i) {
      Rotate(qp + (task * g + i) * hd, c, s, hd, query_scale, qbuf.data() + i * hd);
    }
    attend(qbuf.data(), kp + (row * s_len * kh + head) * hd, kh * hd, vp + task * hd * s_len,
           mp + row * s_len, softcap, g, hd, s_len, obuf.data(), buf.data());
    for (int64_t i = 0; i < g * hd; i += 16) {   // rounded to bf16 as the model's cast
      StoreBf16(op + task * g * hd + i, _mm512_loadu_ps(obuf.data() + i), g * hd - i);
    }
  });
  return ffi::Error::Success();
}

// Greedy decoding's choice in one kernel: for each row of f32 logits [R, V], the first index of
// its maximum and log softmax there, -log(sum exp(x - max)). Two passes over a row (the second
// from cache) where XLA runs a max, a select, a min and an exp-sum over the whole [R, V].
void GreedyRow(const float* x, int64_t v, int32_t* token, float* logprob) {
  constexpr int kChains = 4;                   // independent (max, index) pairs per lane
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 best[kChains];
  __m512i at[kChains], idx[kChains];
  for (int c = 0; c < kChains; ++c) {
    best[c] = neg_inf;
    at[c] = _mm512_setzero_si512();
    idx[c] = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * c));
  }
  const __m512i stride = _mm512_set1_epi32(16 * kChains);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 * kChains <= v; i += 16 * kChains) {
    for (int c = 0; c < kChains; ++c) {   // strict >: each lane keeps its first maximum
      __m512 a = _mm512_loadu_ps(x + i + 16 * c);
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
      __mmask16 gt = _mm512_cmp_ps_mask(a, best[c], _CMP_GT_OQ);
      best[c] = _mm512_mask_mov_ps(best[c], gt, a);
      at[c] = _mm512_mask_mov_epi32(at[c], gt, idx[c]);
      idx[c] = _mm512_add_epi32(idx[c], stride);
    }
  }
  for (int c = 0; i < v; i += 16, c = (c + 1) % kChains) {   // the tail, 16 at a time
    __m512 a = _mm512_mask_loadu_ps(neg_inf, Prefix16(v - i), x + i);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    __m512i id = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(i)));
    __mmask16 gt = _mm512_cmp_ps_mask(a, best[c], _CMP_GT_OQ);
    best[c] = _mm512_mask_mov_ps(best[c], gt, a);
    at[c] = _mm512_mask_mov_epi32(at[c], gt, id);
  }
  float top = -INFINITY;
  for (int c = 0; c < kChains; ++c) top = std::max(top, _mm512_reduce_max_ps(best[c]));
  int32_t first = static_cast<int32_t>(v - 1);
  for (int c = 0; c < kChains; ++c) {
    __mmask16 hit = _mm512_cmp_ps_mask(best[c], _mm512_set1_ps(top), _CMP_EQ_OQ);
    if (hit) first = std::min(first, _mm512_mask_reduce_min_epi32(hit, at[c]));
  }
  __m512 shift = _mm512_set1_ps(top);
  __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (i = 0; i + 32 <= v; i += 32) {
    sum[0] = _mm512_add_ps(sum[0], Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift)));
    sum[1] = _mm512_add_ps(sum[1], Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), shift)));
  }
  for (; i < v; i += 16) {
    __mmask16 valid = Prefix16(v - i);
    sum[0] = _mm512_add_ps(sum[0], _mm512_maskz_mov_ps(
        valid, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + i), shift))));
  }
  *token = top == -INFINITY ? 0 : first;
  // A row with a NaN or an infinite maximum: NaN, as XLA's x - logsumexp(x) gives there.
  *logprob = nan || std::isinf(top)
                 ? NAN : -std::log(_mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1])));
}

ffi::Error GreedyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                      ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logprobs) {
  auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1) {
    return ffi::Error::InvalidArgument("bond_greedy: want f32 logits [R, V] with V >= 1");
  }
  const int64_t v = d[1];
  const float* x = logits.typed_data();
  int32_t* t = tokens->typed_data();
  float* lp = logprobs->typed_data();
  RunParallel(pool, d[0], [=](int64_t r) { GreedyRow(x + r * v, v, t + r, lp + r); });
  return ffi::Error::Success();
}

}  // namespace

// Whether the matmuls run on AMX tiles (1) or AVX512-BF16 (0); BondSetAmx(0) forces the latter,
// BondSetAmx(1) the former where the CPU and the OS allow it (tests compare the two).
extern "C" int BondAmx() { return UseAmx() ? 1 : 0; }
extern "C" void BondSetAmx(int on) { amx_state.store(on && AmxUsable() ? 1 : 0); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16Matmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16MatmulBf16, Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16Pack, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("transposed")
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondF32Pack, PackF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed")
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondGreedy, GreedyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondTakeRows, TakeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondDecodeAttention, AttnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondBf16Geglu, GegluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BondDecodeAttentionUpdate, UpdateAttnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("softcap")
                                  .Attr<float>("query_scale")
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::U16>>());
