// Causal grouped-query attention on the CPU, float32, forward: out and the logsumexp of every query row; and its
// backward pass, dq, dk and dv from them (CausalAttentionBackward, below).
//
//   q [b, t, h, d], k [b, s, kvh, d], v [b, s, kvh, dv], q_slots [t], k_slots [s] int32, key_valid [b, s] uint8,
//   q_segments [b, t], k_segments [b, s] int32 (all zero when the call has none)
//   -> out [b, t, h, dv], lse [b, kvh, h / kvh, t] float32 (+inf for a row that sees no key; its out is zero).
//
// Key j is visible to query i when it holds a token (key_valid), k_slots[j] <= q_slots[i], q_slots[i] - k_slots[j]
// < window (window 0: none), and both lie in the same segment; scores are scale * q.k, softmaxed over the visible
// keys in float32. The same numbers as jaxlora/attention.py's chunked and xla cores up to float32 rounding.
//
// XLA:CPU runs a flash-style loop of small batched dots, masks and exps as separate passes over each score block.
// Here one work item takes one kv head of one row and a chunk of query positions (all the query heads that share
// the kv head), packs the keys it can see transposed ([d, keys], contiguous), and for every 8 query rows computes
// their scores in registers, their exact softmax over the scores kept in the core's cache, and their weighted sum
// of values, 4 rows x 64 value columns at a time in registers. With contiguous key slots (0..s-1: no ring buffer)
// a chunk reads only the keys its causal (and windowed) rows can see. An item of at most 8 query rows (a decode
// step: one position's query heads) computes its scores straight from the cache's key rows instead, one dot product
// per key and row, as packing would cost it more than its scores do; it asks for keys and values a few rows ahead.
// SmolLM2 at batch 8, one query per row over 129 keys, per layer: 193-220 us packed, 72-78 us so; generate's
// batch-8 decode 236-245 -> 269-271 tok/s (Sapphire Rapids host, fresh processes, alternated, three each).
//
// Portable C++ (GCC/Clang vector extensions), built on the user's machine for its own vector width by
// jaxlora/native.py, and called as an XLA FFI custom call, its items split over XLA's intra-op thread pool.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));

constexpr int kRows = 8;        // query rows whose scores one pass computes
constexpr int kValueRows = 4;   // rows whose weighted values one pass sums (4 rows x 4 vectors of sums)
constexpr int kChunk = 32;      // query positions per work item
constexpr float kFloor = -std::numeric_limits<float>::max();
constexpr int32_t kNever = std::numeric_limits<int32_t>::max();  // the slot of a key no query sees

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Int16 load16i(const int32_t* p) {
  Int16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

// The sum of a vector's lanes as a tree of halves (four dependent adds, where lane by lane takes sixteen).
inline float horizontal_sum(Vec16 v) {
  Vec8 low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  low += high;
  Vec4 a, b;
  std::memcpy(&a, &low, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&low) + sizeof a, sizeof b);
  a += b;
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// Keys and values are rows of the cache, far apart: ask for the one kAhead rows on while working on this one.
constexpr int64_t kAhead = 8;
inline void prefetch_row(const float* row, int64_t ahead, int64_t floats) {
  // `ahead` floats on may lie past the buffer (the last rows): an address, never a pointer; a prefetch never faults.
  const uintptr_t at = reinterpret_cast<uintptr_t>(row) + ahead * sizeof(float);
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(reinterpret_cast<const void*>(at + 4 * i));
}

inline Vec16 splat(float x) { return Vec16{} + x; }

// exp(x) for x <= 0, to float32's precision: 2^n * e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial for
// e^r. Inputs below -87 give e^-87 (a normal float, nothing in a softmax's sum).
inline Vec16 exp16(Vec16 x) {
  const Vec16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const Vec16 shifted = x * splat(1.44269504088896341f) + magic;
  const Vec16 n = shifted - magic;
  Vec16 r = x - n * splat(0.693145751953125f);
  r = r - n * splat(1.42860682030941723212e-6f);
  Vec16 p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const Int16 exponent = ((Int16)shifted - (Int16)magic) << 23;
  return (Vec16)((Int16)p + exponent);
}

struct Shapes {
  int64_t b, t, h, d, s, kvh, dv, groups;
  float scale;
  int64_t window;
  bool contiguous;
};

constexpr const char* kShapeRule =
    "q [b, t, h, d], k [b, s, kvh, d], v [b, s, kvh, dv] with kvh dividing h expected";

// A call's shapes from its q, k, v dimensions; false where they break kShapeRule.
template <class Dims>
bool shapes_of(const Dims& qd, const Dims& kd, const Dims& vd, float scale, int64_t window, int64_t contiguous,
               Shapes* sh) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || vd[0] != qd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || kd[3] != qd[3] || kd[2] < 1 || qd[2] % kd[2] != 0) {
    return false;
  }
  *sh = Shapes{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], vd[3], qd[2] / kd[2], scale, window, contiguous != 0};
  return true;
}

struct Inputs {
  const float *q, *k, *v;
  const int32_t *q_slots, *k_slots, *q_segments, *k_segments;
  const uint8_t* key_valid;
  float *out, *lse;
};

// One query row: where its vector and outputs are, and what it may see.
struct Row {
  const float* q;
  float* out;
  float* lse;
  int32_t slot, segment;
};

// A work item's scratch, kept per thread and grown as needed.
struct Scratch {
  std::vector<float> keys_t;      // [d, width]: the item's keys, transposed
  std::vector<int32_t> slots;     // [width]: each key's slot, kNever for a key without a token or past the range
  std::vector<int32_t> segments;  // [width]
  std::vector<float> scores;      // [kRows, width]: scores, then probabilities
};

// Scores of R rows against `width` packed keys from column `first` (a multiple of 16): scores[r][j - first].
template <int R>
void row_scores(const Row* rows, int64_t d, const float* keys_t, int64_t stride, int64_t first, int64_t last,
                float* scores, int64_t width) {
  const float* q[R];
  for (int r = 0; r < R; ++r) q[r] = rows[r].q;
  int64_t j = first;
  for (; j + 32 <= last; j += 32) {
    Vec16 low[R], high[R];
    for (int r = 0; r < R; ++r) low[r] = high[r] = Vec16{};
    for (int64_t c = 0; c < d; ++c) {
      const Vec16 k_low = load16(keys_t + c * stride + j), k_high = load16(keys_t + c * stride + j + 16);
      for (int r = 0; r < R; ++r) {
        const float qc = q[r][c];
        low[r] += qc * k_low;
        high[r] += qc * k_high;
      }
    }
    for (int r = 0; r < R; ++r) {
      store16(scores + r * width + j - first, low[r]);
      store16(scores + r * width + j - first + 16, high[r]);
    }
  }
  for (; j < last; j += 16) {
    Vec16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec16{};
    for (int64_t c = 0; c < d; ++c) {
      const Vec16 kc = load16(keys_t + c * stride + j);
      for (int r = 0; r < R; ++r) acc[r] += q[r][c] * kc;
    }
    for (int r = 0; r < R; ++r) store16(scores + r * width + j - first, acc[r]);
  }
}

// f(std::integral_constant<int, R>) for R = rows (1 to kRows): a block's products for just its real rows, as a
// decode step's block holds only the query heads of one kv head (3 for SmolLM2) and costs what its rows do.
template <int R = kRows, class F>
void with_rows(int rows, F&& f) {
  if constexpr (R > 1) {
    if (rows < R) return with_rows<R - 1>(rows, f);
  }
  f(std::integral_constant<int, R>{});
}

// Scores of R rows against keys [0, count) read where they lie (key j at keys + j * key_stride), zeros up to `padded`:
// for an item with one block of rows (a decode step), which cannot repay packing its keys transposed.
template <int R>
void direct_scores(const Row* rows, int64_t d, const float* keys, int64_t key_stride, int64_t count, int64_t padded,
                   float* scores, int64_t width) {
  const int64_t whole = d / 16 * 16;
  for (int64_t j = 0; j < count; ++j) {
    const float* key = keys + j * key_stride;
    prefetch_row(key, kAhead * key_stride, d);
    for (int r = 0; r < R; ++r) {
      Vec16 acc{};
      for (int64_t c = 0; c < whole; c += 16) acc += load16(rows[r].q + c) * load16(key + c);
      float sum = horizontal_sum(acc);
      for (int64_t c = whole; c < d; ++c) sum += rows[r].q[c] * key[c];
      scores[r * width + j] = sum;
    }
  }
  for (int r = 0; r < R; ++r) std::memset(scores + r * width + count, 0, (padded - count) * sizeof(float));
}

// One row's scores -> probabilities (unnormalized, masked keys 0) in place; returns their sum and sets the max.
float row_softmax(const Shapes& sh, const Row& row, const int32_t* slots, const int32_t* segments, float* scores,
                  int64_t count, float* max_out) {
  const Int16 slot = Int16{} + row.slot, segment = Int16{} + row.segment;
  const Int16 window = Int16{} + static_cast<int32_t>(sh.window > 0 ? sh.window : 0);
  const Vec16 floor = splat(kFloor);
  Vec16 high = floor;
  for (int64_t j = 0; j < count; j += 16) {
    const Int16 key_slot = load16i(slots + j);
    Int16 visible = (key_slot <= slot) & (load16i(segments + j) == segment);
    if (sh.window > 0) visible &= (slot - key_slot) < window;
    const Vec16 s = visible ? load16(scores + j) * sh.scale : floor;
    store16(scores + j, s);
    high = high > s ? high : s;
  }
  float m = kFloor;
  for (int i = 0; i < 16; ++i) m = m > high[i] ? m : high[i];
  *max_out = m;
  if (m == kFloor) {  // no key to see: zero probabilities (the value sums read them)
    std::memset(scores, 0, count * sizeof(float));
    return 0.0f;
  }
  Vec16 total{};
  for (int64_t j = 0; j < count; j += 16) {
    const Vec16 s = load16(scores + j);
    const Vec16 p = s == floor ? Vec16{} : exp16(s - m);
    store16(scores + j, p);
    total += p;
  }
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += total[i];
  return sum;
}

// out[r][c0, c0 + 16 V) = sum_j p[r][j] v[j][c0, ...] / totals[r] for 4 rows, V vectors of value columns.
template <int V>
void row_values(const float* const* probs, int64_t count, const float* values, int64_t v_stride, float* const* outs,
                const float* inverse) {
  Vec16 acc[kValueRows][V];
  for (int r = 0; r < kValueRows; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = Vec16{};
  for (int64_t j = 0; j < count; ++j) {
    prefetch_row(values + j * v_stride, kAhead * v_stride, 16 * V);
    Vec16 vj[V];
    for (int c = 0; c < V; ++c) vj[c] = load16(values + j * v_stride + 16 * c);
    for (int r = 0; r < kValueRows; ++r) {
      const float p = probs[r][j];
      for (int c = 0; c < V; ++c) acc[r][c] += p * vj[c];
    }
  }
  for (int r = 0; r < kValueRows; ++r)
    for (int c = 0; c < V; ++c) store16(outs[r] + 16 * c, acc[r][c] * inverse[r]);
}

// The same for value columns past the last multiple of 16 (small heads: tiny test models), one at a time.
void row_values_tail(const float* const* probs, int64_t count, const float* values, int64_t v_stride,
                     float* const* outs, const float* inverse, int64_t first, int64_t dv) {
  for (int r = 0; r < kValueRows; ++r) {
    for (int64_t c = first; c < dv; ++c) {
      float sum = 0.0f;
      for (int64_t j = 0; j < count; ++j) sum += probs[r][j] * values[j * v_stride + c];
      outs[r][c] = sum * inverse[r];
    }
  }
}

void values_for(const float* const* probs, int64_t count, const float* values, int64_t v_stride, float* const* outs,
                const float* inverse, int64_t dv) {
  const int64_t whole = dv / 16 * 16;
  if (whole < dv) row_values_tail(probs, count, values, v_stride, outs, inverse, whole, dv);
  for (int64_t c = 0; c < whole; c += 64) {
    float* at[kValueRows];
    for (int r = 0; r < kValueRows; ++r) at[r] = outs[r] + c;
    const float* v = values + c;
    switch ((whole - c >= 64 ? 64 : whole - c) / 16) {
      case 4: row_values<4>(probs, count, v, v_stride, at, inverse); break;
      case 3: row_values<3>(probs, count, v, v_stride, at, inverse); break;
      case 2: row_values<2>(probs, count, v, v_stride, at, inverse); break;
      default: row_values<1>(probs, count, v, v_stride, at, inverse); break;
    }
  }
}

// The keys [lo, hi) the query slots [first, last) of one chunk can see (all keys when slots are not contiguous).
void key_range(const Shapes& sh, const int32_t* q_slots, int64_t first, int64_t last, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = sh.s;
  if (!sh.contiguous) return;
  int32_t low = q_slots[first], high = q_slots[first];
  for (int64_t i = first; i < last; ++i) {
    low = q_slots[i] < low ? q_slots[i] : low;
    high = q_slots[i] > high ? q_slots[i] : high;
  }
  *hi = high + 1 < sh.s ? (high + 1 > 0 ? high + 1 : 0) : sh.s;
  if (sh.window > 0) {
    const int64_t start = static_cast<int64_t>(low) - sh.window + 1;
    *lo = start > 0 ? (start < *hi ? start : *hi) : 0;
  }
}

void run_item(const Shapes& sh, const Inputs& in, int64_t item, Scratch& scratch) {
  const int64_t chunks = (sh.t + kChunk - 1) / kChunk;
  const int64_t chunk = item % chunks, head = (item / chunks) % sh.kvh, row = item / (chunks * sh.kvh);
  const int64_t first = chunk * kChunk, last = first + kChunk < sh.t ? first + kChunk : sh.t;
  int64_t lo, hi;
  key_range(sh, in.q_slots, first, last, &lo, &hi);
  const int64_t count = hi - lo, width = (count + 15) / 16 * 16;

  // The chunk's rows: each position's query heads that share this kv head.
  const int64_t rows = (last - first) * sh.groups;
  std::vector<Row> chunk_rows(rows);
  for (int64_t i = first; i < last; ++i) {
    for (int64_t g = 0; g < sh.groups; ++g) {
      const int64_t qh = head * sh.groups + g;
      Row& r = chunk_rows[(i - first) * sh.groups + g];
      r.q = in.q + ((row * sh.t + i) * sh.h + qh) * sh.d;
      r.out = in.out + ((row * sh.t + i) * sh.h + qh) * sh.dv;
      r.lse = in.lse + ((row * sh.kvh + head) * sh.groups + g) * sh.t + i;
      r.slot = in.q_slots[i];
      r.segment = in.q_segments[row * sh.t + i];
    }
  }

  const bool packed = rows > kRows;  // more than one block of rows shares the packed keys
  if (packed) scratch.keys_t.resize(sh.d * width > 0 ? sh.d * width : 1);
  scratch.slots.resize(width > 0 ? width : 1);
  scratch.segments.resize(width > 0 ? width : 1);
  scratch.scores.resize(kRows * (width > 0 ? width : 1));
  float* keys_t = scratch.keys_t.data();
  const int64_t k_stride = sh.kvh * sh.d;
  const float* keys = in.k + ((row * sh.s + lo) * sh.kvh + head) * sh.d;  // key lo + j at keys + j * k_stride
  for (int64_t j = 0; j < width; ++j) {
    const int64_t key = lo + j;
    const bool real = j < count;
    if (packed) {
      const float* src = keys + (real ? j : 0) * k_stride;
      for (int64_t c = 0; c < sh.d; ++c) keys_t[c * width + j] = real ? src[c] : 0.0f;
    }
    scratch.slots[j] = real && in.key_valid[row * sh.s + key] ? in.k_slots[key] : kNever;
    scratch.segments[j] = real ? in.k_segments[row * sh.s + key] : 0;
  }
  const float* values = in.v + (row * sh.s * sh.kvh + head) * sh.dv + lo * sh.kvh * sh.dv;
  const int64_t v_stride = sh.kvh * sh.dv;

  float* scores = scratch.scores.data();
  std::vector<float> spare_out(sh.dv > 0 ? sh.dv : 1);
  float spare_lse;
  for (int64_t block = 0; block < rows; block += kRows) {
    const int real_rows = static_cast<int>(rows - block < kRows ? rows - block : kRows);
    Row br[kRows];
    for (int r = 0; r < kRows; ++r) {
      br[r] = chunk_rows[block + (r < real_rows ? r : 0)];
      if (r >= real_rows) br[r].out = spare_out.data(), br[r].lse = &spare_lse;
    }
    // The block's own keys: with contiguous slots, up to its last row's slot.
    int64_t block_hi = count;
    if (sh.contiguous) {
      int32_t top = br[0].slot;
      for (int r = 1; r < real_rows; ++r) top = br[r].slot > top ? br[r].slot : top;
      block_hi = top + 1 - lo < count ? (top + 1 - lo > 0 ? top + 1 - lo : 0) : count;
    }
    const int64_t block_width = (block_hi + 15) / 16 * 16;
    const int64_t seen = block_hi < count ? block_hi : count;
    with_rows(real_rows, [&](auto r) {
      if (packed) {
        row_scores<decltype(r)::value>(br, sh.d, keys_t, width, 0, block_width, scores, width);
      } else {
        direct_scores<decltype(r)::value>(br, sh.d, keys, k_stride, seen, block_width, scores, width);
      }
    });
    float inverse[kRows];
    for (int r = 0; r < real_rows; ++r) {
      float m;
      const float total = row_softmax(sh, br[r], scratch.slots.data(), scratch.segments.data(), scores + r * width,
                                      block_width, &m);
      inverse[r] = total > 0.0f ? 1.0f / total : 0.0f;
      *br[r].lse = total > 0.0f ? m + std::log(total) : std::numeric_limits<float>::infinity();
    }
    // Rows past the real ones (a pass's padding) weigh row 0's probabilities into the spare output.
    for (int r = real_rows; r < kRows; ++r) inverse[r] = 0.0f;
    for (int r0 = 0; r0 < real_rows; r0 += kValueRows) {
      const float* probs[kValueRows];
      float* outs[kValueRows];
      for (int r = 0; r < kValueRows; ++r) {
        probs[r] = scores + (r0 + r < real_rows ? r0 + r : 0) * width;
        outs[r] = br[r0 + r].out;
      }
      values_for(probs, block_hi, values, v_stride, outs, inverse + r0, sh.dv);
    }
  }
}

// A call's items, claimed one at a time by the calling thread and the tasks it hands XLA's pool. The caller waits
// for the items to finish, never for its tasks to start: when every pool thread is busy (other calls of these
// kernels waiting on theirs, as in concurrent programs), the caller does the work itself, and tasks that start late
// or after it returned find nothing to claim. The tasks share this state, never the caller's stack.
template <class Job>
struct Split {
  Job job;
  int64_t items = 0;
  std::atomic<int64_t> next{0}, finished{0};

  void work() {
    thread_local typename Job::Scratch scratch;
    for (;;) {
      const int64_t n = next.fetch_add(1, std::memory_order_relaxed);
      if (n >= items) break;
      job.run(n, scratch);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

template <class Job>
void run_split(ffi::ThreadPool& pool, const std::shared_ptr<Split<Job>>& split) {
  if (split->items == 0) return;
  const int64_t threads = pool.num_threads();
  const int64_t workers = threads < 1 ? 1 : (threads > split->items ? split->items : threads);
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([split]() { split->work(); });
  split->work();
  while (split->finished.load(std::memory_order_acquire) < split->items) std::this_thread::yield();
}

struct Forward {
  using Scratch = ::Scratch;
  Shapes shapes;
  Inputs inputs;

  // Item n in claim order: chunks from the last (they see the most keys), each over every (row, kv head).
  void run(int64_t n, Scratch& scratch) const {
    const int64_t chunks = (shapes.t + kChunk - 1) / kChunk;
    const int64_t per_chunk = shapes.b * shapes.kvh, chunk = chunks - 1 - n / per_chunk;
    run_item(shapes, inputs, (n % per_chunk) * chunks + chunk, scratch);
  }
};

ffi::Error CausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_slots, ffi::Buffer<ffi::S32> k_slots,
                           ffi::Buffer<ffi::U8> key_valid, ffi::Buffer<ffi::S32> q_segments,
                           ffi::Buffer<ffi::S32> k_segments, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> lse, float scale, int64_t window, int64_t contiguous) {
  auto split = std::make_shared<Split<Forward>>();
  Shapes& sh = split->job.shapes;
  if (!shapes_of(q.dimensions(), k.dimensions(), v.dimensions(), scale, window, contiguous, &sh)) {
    return ffi::Error::InvalidArgument(std::string("causal_attention: ") + kShapeRule);
  }
  split->job.inputs = Inputs{q.typed_data(),          k.typed_data(),          v.typed_data(),
                             q_slots.typed_data(),    k_slots.typed_data(),    q_segments.typed_data(),
                             k_segments.typed_data(), key_valid.typed_data(),  out->typed_data(),
                             lse->typed_data()};
  split->items = sh.b * sh.kvh * ((sh.t + kChunk - 1) / kChunk);
  run_split(pool, split);
  return ffi::Error::Success();
}

// ---- The backward pass: dq, and each query head's share of dk and dv ----
//
// One item per (row, query head): it owns that head's dq and its share of the kv head's dk and dv (the caller sums
// the shares of the heads that share a kv head), so items write nothing in common. For every block of 32 keys and
// every block of 32 query rows that can see one of them, it recomputes the probabilities from the forward's
// logsumexp, P = exp(scale q.k - lse), then dP = dO.v, dS = P (dP - D) with D = dO.out per row, and adds
// dV += P^T dO, dK += dS^T q, dQ += dS k (the two last times scale at the end). Operands are packed per item,
// zero-padded to whole vectors, so every product is one register-tiled loop.

// SmolLM2's training shape (4 x 256 tokens, 9 heads over 3): forward and backward 13.1-13.4 ms with blocks of 16
// rows x 64 keys, 11.9-12.5 with 32 x 64, 11.2-11.3 with 32 x 32 (less work past the causal diagonal). The backward
// alone on an AMD EPYC Zen 4 host: 9.6-11.3 ms with products in tiles of 4 rows x (2 or 4) vectors, 8.1-8.3 with
// 8 x 2 for the score blocks only, 7.0-7.8 with 8 x 2 for every product.
constexpr int kQueryBlock = 32;
constexpr int kKeyBlock = 32;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// c[m][n] += sum_k a(k, m) * b[k][n] for M rows m and V vectors of 16 columns n: a(k, m) = a[k * a_k + m * a_m].
template <int M, int V>
void product_tile(int64_t depth, const float* a, int64_t a_k, int64_t a_m, const float* b, int64_t b_k, float* c,
                  int64_t c_m) {
  Vec16 acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = load16(c + m * c_m + 16 * v);
  for (int64_t k = 0; k < depth; ++k) {
    Vec16 bk[V];
    for (int v = 0; v < V; ++v) bk[v] = load16(b + k * b_k + 16 * v);
    for (int m = 0; m < M; ++m) {
      const float x = a[k * a_k + m * a_m];
      for (int v = 0; v < V; ++v) acc[m][v] += x * bk[v];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) store16(c + m * c_m + 16 * v, acc[m][v]);
}

// c [rows, cols] += a^T-or-a [depth, rows] x b [depth, cols]: rows a multiple of 8 (each product here has a block's
// 32 rows), cols a multiple of 16. Tiles hold 16 sums: 8 rows x 2 vectors.
static_assert(kQueryBlock % 8 == 0 && kKeyBlock % 8 == 0, "add_product takes rows in tiles of 8");
void add_product(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_k, int64_t a_m, const float* b,
                 int64_t b_k, float* c, int64_t c_m) {
  for (int64_t m = 0; m < rows; m += 8) {
    const float* at = a + m * a_m;
    float* ct = c + m * c_m;
    int64_t n = 0;
    for (; cols - n >= 32; n += 32) product_tile<8, 2>(depth, at, a_k, a_m, b + n, b_k, ct + n, c_m);
    if (n < cols) product_tile<8, 1>(depth, at, a_k, a_m, b + n, b_k, ct + n, c_m);
  }
}

struct BackwardInputs {
  const float *q, *k, *v, *out, *lse, *d_out;
  const int32_t *q_slots, *k_slots, *q_segments, *k_segments;
  const uint8_t* key_valid;
  float *dq, *dk, *dv;  // dk, dv: [b, s, h, d] / [b, s, h, dv], each query head's share
};

struct BackwardScratch {
  std::vector<float> q, d_out, keys, values, keys_t, values_t, lse, delta, dq, dk, dv, probs, d_probs;
  std::vector<int32_t> q_slots, q_segments, k_slots, k_segments;
};

template <class T>
T* zeroed(std::vector<T>& buffer, int64_t size) {
  buffer.assign(size > 0 ? size : 1, T{});
  return buffer.data();
}

void run_backward_item(const Shapes& sh, const BackwardInputs& in, int64_t item, BackwardScratch& x) {
  const int64_t row = item / sh.h, qh = item % sh.h, head = qh / sh.groups, group = qh % sh.groups;
  const int64_t dp = round_up(sh.d, 16), dvp = round_up(sh.dv, 16);
  const int64_t tp = round_up(sh.t, kQueryBlock), sp = round_up(sh.s, kKeyBlock);

  float *q = zeroed(x.q, tp * dp), *d_out = zeroed(x.d_out, tp * dvp), *lse = zeroed(x.lse, tp);
  float* delta = zeroed(x.delta, tp);
  int32_t *q_slots = zeroed(x.q_slots, tp), *q_segments = zeroed(x.q_segments, tp);
  for (int64_t i = 0; i < tp; ++i) {
    if (i >= sh.t) {
      lse[i] = std::numeric_limits<float>::infinity();
      q_slots[i] = q_slots[sh.t - 1];
      continue;
    }
    const int64_t at = (row * sh.t + i) * sh.h + qh;
    std::memcpy(q + i * dp, in.q + at * sh.d, sh.d * sizeof(float));
    std::memcpy(d_out + i * dvp, in.d_out + at * sh.dv, sh.dv * sizeof(float));
    float dot = 0.0f;
    for (int64_t c = 0; c < sh.dv; ++c) dot += in.d_out[at * sh.dv + c] * in.out[at * sh.dv + c];
    delta[i] = dot;
    lse[i] = in.lse[((row * sh.kvh + head) * sh.groups + group) * sh.t + i];
    q_slots[i] = in.q_slots[i];
    q_segments[i] = in.q_segments[row * sh.t + i];
  }
  float *keys = zeroed(x.keys, sp * dp), *values = zeroed(x.values, sp * dvp);
  float *keys_t = zeroed(x.keys_t, dp * sp), *values_t = zeroed(x.values_t, dvp * sp);
  int32_t *k_slots = zeroed(x.k_slots, sp), *k_segments = zeroed(x.k_segments, sp);
  for (int64_t j = 0; j < sp; ++j) {
    if (j >= sh.s) {
      k_slots[j] = kNever;
      continue;
    }
    const int64_t at = (row * sh.s + j) * sh.kvh + head;
    for (int64_t c = 0; c < sh.d; ++c) keys[j * dp + c] = keys_t[c * sp + j] = in.k[at * sh.d + c];
    for (int64_t c = 0; c < sh.dv; ++c) values[j * dvp + c] = values_t[c * sp + j] = in.v[at * sh.dv + c];
    k_slots[j] = in.key_valid[row * sh.s + j] ? in.k_slots[j] : kNever;
    k_segments[j] = in.k_segments[row * sh.s + j];
  }

  float *dq = zeroed(x.dq, tp * dp), *dk = zeroed(x.dk, sp * dp), *dv = zeroed(x.dv, sp * dvp);
  float* probs = zeroed(x.probs, kQueryBlock * kKeyBlock);
  float* d_probs = zeroed(x.d_probs, kQueryBlock * kKeyBlock);
  const Int16 window = Int16{} + static_cast<int32_t>(sh.window > 0 ? sh.window : 0);
  for (int64_t i0 = 0; i0 < tp; i0 += kQueryBlock) {
    int64_t lo, hi;
    key_range(sh, q_slots, i0, i0 + kQueryBlock < sh.t ? i0 + kQueryBlock : sh.t, &lo, &hi);
    for (int64_t j0 = lo / kKeyBlock * kKeyBlock; j0 < hi; j0 += kKeyBlock) {
      std::memset(probs, 0, kQueryBlock * kKeyBlock * sizeof(float));
      std::memset(d_probs, 0, kQueryBlock * kKeyBlock * sizeof(float));
      add_product(kQueryBlock, kKeyBlock, dp, q + i0 * dp, 1, dp, keys_t + j0, sp, probs, kKeyBlock);
      add_product(kQueryBlock, kKeyBlock, dvp, d_out + i0 * dvp, 1, dvp, values_t + j0, sp, d_probs, kKeyBlock);
      for (int r = 0; r < kQueryBlock; ++r) {
        const int64_t i = i0 + r;
        float* p_row = probs + r * kKeyBlock;
        float* dp_row = d_probs + r * kKeyBlock;
        if (std::isinf(lse[i])) {  // a row that sees no key (or padding): no gradient through it
          std::memset(p_row, 0, kKeyBlock * sizeof(float));
          std::memset(dp_row, 0, kKeyBlock * sizeof(float));
          continue;
        }
        const Int16 slot = Int16{} + q_slots[i], segment = Int16{} + q_segments[i];
        for (int64_t j = 0; j < kKeyBlock; j += 16) {
          const Int16 key_slot = load16i(k_slots + j0 + j);
          Int16 visible = (key_slot <= slot) & (load16i(k_segments + j0 + j) == segment);
          if (sh.window > 0) visible &= (slot - key_slot) < window;
          const Vec16 p = visible ? exp16(load16(p_row + j) * sh.scale - lse[i]) : Vec16{};
          store16(p_row + j, p);
          store16(dp_row + j, p * (load16(dp_row + j) - delta[i]));
        }
      }
      // dV [keys, dv] += P^T dO; dK [keys, d] += dS^T q; dQ [rows, d] += dS k.
      add_product(kKeyBlock, dvp, kQueryBlock, probs, kKeyBlock, 1, d_out + i0 * dvp, dvp, dv + j0 * dvp, dvp);
      add_product(kKeyBlock, dp, kQueryBlock, d_probs, kKeyBlock, 1, q + i0 * dp, dp, dk + j0 * dp, dp);
      add_product(kQueryBlock, dp, kKeyBlock, d_probs, 1, kKeyBlock, keys + j0 * dp, dp, dq + i0 * dp, dp);
    }
  }

  for (int64_t i = 0; i < sh.t; ++i) {
    float* to = in.dq + ((row * sh.t + i) * sh.h + qh) * sh.d;
    for (int64_t c = 0; c < sh.d; ++c) to[c] = sh.scale * dq[i * dp + c];
  }
  for (int64_t j = 0; j < sh.s; ++j) {
    const int64_t at = (row * sh.s + j) * sh.h + qh;
    for (int64_t c = 0; c < sh.d; ++c) in.dk[at * sh.d + c] = sh.scale * dk[j * dp + c];
    std::memcpy(in.dv + at * sh.dv, dv + j * dvp, sh.dv * sizeof(float));
  }
}

struct Backward {
  using Scratch = BackwardScratch;
  Shapes shapes;
  BackwardInputs inputs;

  void run(int64_t n, Scratch& scratch) const { run_backward_item(shapes, inputs, n, scratch); }
};

ffi::Error CausalAttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_slots,
                                   ffi::Buffer<ffi::S32> k_slots, ffi::Buffer<ffi::U8> key_valid,
                                   ffi::Buffer<ffi::S32> q_segments, ffi::Buffer<ffi::S32> k_segments,
                                   ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                   ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t window, int64_t contiguous) {
  auto split = std::make_shared<Split<Backward>>();
  Shapes& sh = split->job.shapes;
  if (!shapes_of(q.dimensions(), k.dimensions(), v.dimensions(), scale, window, contiguous, &sh)) {
    return ffi::Error::InvalidArgument(std::string("causal_attention_backward: ") + kShapeRule);
  }
  split->job.inputs = BackwardInputs{q.typed_data(),       k.typed_data(),        v.typed_data(),
                                     out.typed_data(),     lse.typed_data(),      d_out.typed_data(),
                                     q_slots.typed_data(), k_slots.typed_data(),  q_segments.typed_data(),
                                     k_segments.typed_data(), key_valid.typed_data(), dq->typed_data(),
                                     dk->typed_data(),     dv->typed_data()};
  split->items = sh.t > 0 ? sh.b * sh.h : 0;
  run_split(pool, split);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraCausalAttention, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("contiguous"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraCausalAttentionBackward, CausalAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("contiguous"));
