// y[m, n] = sum_k x[m, k] * w[k, n] for few rows m (a decode step's batch), float32, with the weight stored in
// column tiles: tiles[t, k, c] = w[k, 32 t + c]. Each tile is one contiguous block that a core streams once from
// memory while it accumulates every row of x against it in registers: the weight is read once per call, at the
// memory's pace, whatever the number of rows up to ROWS (more rows take one more pass each ROWS). XLA:CPU's own
// dot reads a [8, K] x [K, N] product's weights at half the rate of a one-row product (see jaxlora/cpu_matmul.py).
//
// Portable C++ (GCC/Clang vector extensions), built on the user's machine for its own vector width
// (-march=native) by jaxlora/cpu_matmul.py, and called as an XLA FFI custom call on the CPU, its tiles split over
// XLA's intra-op thread pool.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;
typedef float Vec16 __attribute__((vector_size(64)));
#if defined(__AVX512F__)
constexpr int kRows = 8;  // 8 rows x 2 vectors: 16 of the 32 vector registers hold the sums
#else
constexpr int kRows = 2;  // 16 registers of 8 floats: 8 hold the sums, 4 the weight's tile row
#endif
// How far ahead of its sums a tile product asks for the weight (in tile rows of 128 bytes: 16 KB). With 8 rows the
// sums take as long as the memory does, and the core's own prefetchers then fall behind: SmolLM2's weight chain at 8
// rows, best of 15 on a Sapphire Rapids host, 33.6-35.0 ms without, 25.0-25.7 ms with 64 to 256 rows ahead (8 ahead
// 29.7, 16 26.1); one row unchanged (21-22 ms). Past a tile's end it asks for the next tile, which the same thread
// usually takes next; a prefetch never faults, wherever it points. Decode (generate, 64-token prompts, 128 new tokens,
// fresh processes, alternated, three each): batch 8 186-197 -> 241-245 tok/s, batch 1 44-45 -> 45-48.
constexpr int64_t kPrefetchRows = 128;

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

// Rows [0, R) of x [R, K] against one tile [K, 32], into y's 32 columns (row stride n).
template <int R>
void tile_product(const float* x, int64_t k_len, const float* tile, float* y, int64_t n) {
  Vec16 low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = Vec16{};
  for (int64_t k = 0; k < k_len; ++k) {
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(tile + k * kTile) + kPrefetchRows * kTile * sizeof(float);
    __builtin_prefetch(reinterpret_cast<const void*>(ahead), 0, 1);
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + 64), 0, 1);
    const Vec16 w_low = load16(tile + k * kTile), w_high = load16(tile + k * kTile + 16);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * k_len + k];
      low[r] += xs * w_low;
      high[r] += xs * w_high;
    }
  }
  for (int r = 0; r < R; ++r) {
    store16(y + r * n, low[r]);
    store16(y + r * n + 16, high[r]);
  }
}

template <int R>
void rows_product(int rows, const float* x, int64_t k_len, const float* tile, float* y, int64_t n) {
  if constexpr (R > 1) {
    if (rows < R) return rows_product<R - 1>(rows, x, k_len, tile, y, n);
  }
  tile_product<R>(x, k_len, tile, y, n);
}

void tiles_product(int64_t first, int64_t last, const float* x, int64_t m, int64_t k_len, const float* tiles,
                   float* y, int64_t n) {
  for (int64_t t = first; t < last; ++t) {
    for (int64_t r = 0; r < m; r += kRows) {
      const int rows = static_cast<int>(m - r < kRows ? m - r : kRows);
      rows_product<kRows>(rows, x + r * k_len, k_len, tiles + t * k_len * kTile, y + r * n + t * kTile, n);
    }
  }
}

// One call's work, split in parts of whole tiles. The calling thread and the tasks it hands XLA's pool claim parts
// until none is left, so a call finishes even when the pool's threads are all busy (with other custom calls of
// the same program, say) and its tasks start late or after it returned: they then find nothing to claim. The
// tasks share this state, never the caller's stack.
struct Split {
  const float* x;
  const float* tiles;
  float* y;
  int64_t m, k_len, count, parts;
  std::atomic<int64_t> next{0}, finished{0};

  bool run_one() {
    const int64_t part = next.fetch_add(1, std::memory_order_relaxed);
    if (part >= parts) return false;
    tiles_product(count * part / parts, count * (part + 1) / parts, x, m, k_len, tiles, y, count * kTile);
    finished.fetch_add(1, std::memory_order_release);
    return true;
  }
};

ffi::Error TiledMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> tiles,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto tile_dims = tiles.dimensions();
  if (x_dims.size() != 2 || tile_dims.size() != 3 || tile_dims[2] != kTile || tile_dims[1] != x_dims[1]) {
    return ffi::Error::InvalidArgument("tiled_matmul: x [m, k] and tiles [n / 32, k, 32] expected");
  }
  auto split = std::make_shared<Split>();
  split->x = x.typed_data();
  split->tiles = tiles.typed_data();
  split->y = y->typed_data();
  split->m = x_dims[0];
  split->k_len = x_dims[1];
  split->count = tile_dims[0];
  int64_t threads = pool.num_threads();
  split->parts = threads < 1 ? 1 : (threads > split->count ? split->count : threads);
  for (int64_t p = 1; p < split->parts; ++p) {
    pool.Schedule([split]() {
      while (split->run_one()) {
      }
    });
  }
  while (split->run_one()) {
  }
  while (split->finished.load(std::memory_order_acquire) < split->parts) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraTiledMatmul, TiledMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
