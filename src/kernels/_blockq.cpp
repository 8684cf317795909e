// y = x @ W^T for a few rows of x, with W stored as GGUF-style blocks of 32 input columns, three layouts:
//   bits 4 (Q4_1, Q4_K): w = fma(d, q, m), q in 0..15 (two per byte)
//   bits 8 (Q8_0):       w = d * q, q in -127..127
//   bits 5 (Q5_0):       w = d * q, q = (low 4 bits | high bit << 4) - 16 in -16..15
//   bits 6 (Q6_K):       w = d * q, q in -32..31, one d per 16 values
// Weights are de-quantized in registers so that each one equals the fp32 value gguf's own
// de-quantization computes: its d (and m) are fp32 values made exactly from the file's fp16 scales
// (Q4_K: d * sc and -(dmin * m); Q6_K: d * sc; each product exact in fp32), then d * q rounds once as
// gguf's does (exact for Q4/Q8/Q5_0) and Q4's + m rounds once, here in one fused multiply-add (gguf
// rounds d * q + m with d * q exact: the same value). Only the summation order differs from an fp32
// GEMM on those weights.
//
// Layout (all contiguous): bits 4 packed [N, K/32, 16] bytes, byte i of a block = q[i] | q[i + 16] << 4;
// bits 5 packed [N, K/32, 20] bytes as in the GGUF file: 32 high bits (bit i of byte i / 8 for value i), then 16
// bytes as bits 4's; bits 8 and 6 packed [N, K/32, 32] int8; scale [N, K/32] fp32 ([N, K/16] for bits 6); min [N, K/32]
// fp32 (bits 4 only); x [rows, K] fp32; out [rows, N] fp32.

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <immintrin.h>
#include <omp.h>

namespace py = pybind11;

namespace {

constexpr int kBlock = 32;

struct Q4 {
  static constexpr int kBytes = 16, kScales = 1;
  static float weight(const uint8_t* p, int i, const float* s, const float* m) {
    const int q = i < 16 ? (p[i] & 0x0F) : (p[i - 16] >> 4);
    return std::fma(s[0], static_cast<float>(q), m[0]);
  }
  __attribute__((target("avx512f"))) static void wide(const uint8_t* p, const float* s, const float* mp, __m512* w) {
    const float d = s[0], m = mp[0];
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512 dd = _mm512_set1_ps(d), mm = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low4))), dd, mm);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4))),
                           dd, mm);
  }
  __attribute__((target("avx2,fma"))) static void narrow(const uint8_t* p, const float* s, const float* mp,
                                                        __m256* w) {
    const float d = s[0], m = mp[0];
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    const __m256 dd = _mm256_set1_ps(d), mm = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dd, mm);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dd, mm);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dd, mm);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dd, mm);
  }
};

struct Q5 {
  static constexpr int kBytes = 20, kScales = 1;
  static uint32_t high_bits(const uint8_t* p) {
    uint32_t h;
    std::memcpy(&h, p, 4);
    return h;
  }
  static float weight(const uint8_t* p, int i, const float* s, const float*) {
    const int low = i < 16 ? (p[4 + i] & 0x0F) : (p[4 + i - 16] >> 4);
    const int high = static_cast<int>(high_bits(p) >> i & 1);
    return s[0] * static_cast<float>((low | high << 4) - 16);
  }
  __attribute__((target("avx512f"))) static void wide(const uint8_t* p, const float* s, const float*, __m512* w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4));
    const uint32_t h = high_bits(p);
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512 dd = _mm512_set1_ps(s[0]);
    const __m128i halves[2] = {_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4)};
    for (int k = 0; k < 2; ++k) {
      const __m512i q = _mm512_cvtepu8_epi32(halves[k]);  // + 16 where the high bit is set, then - 16
      const __m512i with_high = _mm512_mask_add_epi32(q, static_cast<__mmask16>(h >> (16 * k)), q, sixteen);
      w[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(with_high, sixteen)), dd);
    }
  }
  __attribute__((target("avx2,fma"))) static void narrow(const uint8_t* p, const float* s, const float*, __m256* w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4));
    const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    const __m256i h = _mm256_set1_epi32(static_cast<int>(high_bits(p))), one = _mm256_set1_epi32(1);
    const __m256i sixteen = _mm256_set1_epi32(16), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i bytes[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    const __m256 dd = _mm256_set1_ps(s[0]);
    for (int k = 0; k < 4; ++k) {  // values 8k..8k+7
      const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * k))), one);
      const __m256i q = _mm256_or_si256(_mm256_cvtepu8_epi32(bytes[k]), _mm256_slli_epi32(bit, 4));
      w[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, sixteen)), dd);
    }
  }
};

// int8 values, one scale per kPer values (Q8_0 and Q5_0: 32; Q6_K: 16)
template <int kPer>
struct Int8Values {
  static constexpr int kBytes = 32, kScales = kBlock / kPer;
  static float weight(const uint8_t* p, int i, const float* s, const float*) {
    return s[i / kPer] * static_cast<float>(reinterpret_cast<const int8_t*>(p)[i]);
  }
  __attribute__((target("avx512f"))) static void wide(const uint8_t* p, const float* s, const float*, __m512* w) {
    for (int h = 0; h < 2; ++h) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h));
      w[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), _mm512_set1_ps(s[16 * h / kPer]));
    }
  }
  __attribute__((target("avx2,fma"))) static void narrow(const uint8_t* p, const float* s, const float*, __m256* w) {
    for (int h = 0; h < 4; ++h) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h));
      w[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_set1_ps(s[8 * h / kPer]));
    }
  }
};
using Q8 = Int8Values<32>;
using Q6 = Int8Values<16>;

struct Weights {
  const uint8_t* packed;
  const float* scale;
  const float* min;
  int64_t K, N;
};

template <class F>
void rows_scalar(const float* x, int64_t rows, const Weights& w, int64_t n0, int64_t n1, float* out) {
  const int64_t nb = w.K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = w.packed + (n * nb + b) * F::kBytes;
        const float *s = w.scale + (n * nb + b) * F::kScales, *m = w.min ? w.min + n * nb + b : nullptr;
        for (int i = 0; i < kBlock; ++i) acc += x[r * w.K + b * kBlock + i] * F::weight(p, i, s, m);
      }
      out[r * w.N + n] = acc;
    }
  }
}

// R rows (R <= 8) against output columns [n0, n1): 16 weights per instruction, two accumulators per row.
template <class F, int R>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const Weights& w, int64_t n0, int64_t n1,
                                                    float* out) {
  const int64_t nb = w.K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc0[R], acc1[R], wv[2];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      F::wide(w.packed + (n * nb + b) * F::kBytes, w.scale + (n * nb + b) * F::kScales,
              w.min ? w.min + n * nb + b : nullptr, wv);
      for (int r = 0; r < R; ++r) {
        const float* xb = x + r * w.K + b * kBlock;
        acc0[r] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xb), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xb + 16), acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * w.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows (R <= 4): 8 weights per instruction, two accumulators per row.
template <class F, int R>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const Weights& w, int64_t n0, int64_t n1,
                                                   float* out) {
  const int64_t nb = w.K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc0[R], acc1[R], wv[4];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      F::narrow(w.packed + (n * nb + b) * F::kBytes, w.scale + (n * nb + b) * F::kScales,
                w.min ? w.min + n * nb + b : nullptr, wv);
      for (int r = 0; r < R; ++r) {
        const float* xb = x + r * w.K + b * kBlock;
        acc0[r] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xb), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), acc1[r]);
        acc0[r] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * w.N + n] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
  }
}

bool avx512_available() { return __builtin_cpu_supports("avx512f"); }
bool avx2_available() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

template <class F>
void columns(const float* x, int64_t rows, const Weights& w, int64_t n0, int64_t n1, float* out, int isa) {
  const int step = isa == 2 ? 8 : 4;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int rr = static_cast<int>(rows - r0 < step ? rows - r0 : step);
    const float* xr = x + r0 * w.K;
    float* o = out + r0 * w.N;
    if (isa == 2) {
      switch (rr) {
        case 8: rows_avx512<F, 8>(xr, w, n0, n1, o); break;
        case 7: rows_avx512<F, 7>(xr, w, n0, n1, o); break;
        case 6: rows_avx512<F, 6>(xr, w, n0, n1, o); break;
        case 5: rows_avx512<F, 5>(xr, w, n0, n1, o); break;
        case 4: rows_avx512<F, 4>(xr, w, n0, n1, o); break;
        case 3: rows_avx512<F, 3>(xr, w, n0, n1, o); break;
        case 2: rows_avx512<F, 2>(xr, w, n0, n1, o); break;
        default: rows_avx512<F, 1>(xr, w, n0, n1, o);
      }
    } else if (isa == 1) {
      switch (rr) {
        case 4: rows_avx2<F, 4>(xr, w, n0, n1, o); break;
        case 3: rows_avx2<F, 3>(xr, w, n0, n1, o); break;
        case 2: rows_avx2<F, 2>(xr, w, n0, n1, o); break;
        default: rows_avx2<F, 1>(xr, w, n0, n1, o);
      }
    } else {
      rows_scalar<F>(xr, rr, w, n0, n1, o);
    }
  }
}

// Output columns [0, N) split into one contiguous range per thread: fn(n0, n1) on each.
template <class Fn>
void over_columns(int64_t N, int threads, const Fn& fn) {
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunk = (N + nt - 1) / nt;
    const int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
    if (n0 < n1) fn(n0, n1);
  }
}

// ---- int8 activations (AVX-512 VNNI), as llama.cpp multiplies Q4_1 x Q8_1 and Q8_0 x Q8_0 ----
// Each activation row is rounded per block of 32: d = max|x| / 127, q = round-half-even(x * (1/d)) in
// -127..127 (all fp32 operations, so a torch reference reproduces q and d bit for bit), s = d * sum(q).
// A block's dot product is an exact int32 from vpdpbusd (unsigned x signed bytes, four products per lane):
//   Q4_1: w = dw * qw + m, qw in 0..15 (unsigned)  ->  dw * dx * sum(qw * q) + m * s
//   Q8_0: w = dw * qw, qw in -127..127 -> bytes qw + 128 (unsigned); the 128 * sum(q) this adds is
//         subtracted exactly, in int32, by starting the lane's accumulator at -128 * sum(q)
// Each int32 lane is converted once and scaled by dw * dx in one fp32 multiply-add into the row's
// accumulator, as are the Q4_1 min terms (m * s, 16 blocks a vector); the lanes are summed at the end.
// Every row runs the same fp32 instructions in the same order whatever the other rows of the call or
// the thread count (only the exact int32 sums are split differently for few rows): a row's result
// depends on that row only.
//
// Layout (weights re-arranged once by blockq.py, activations per call), per row of blocks:
//   groups of 16 blocks: lane L of a 512-bit register is block L; step j (0..7) holds values 4j..4j+3 of
//     each block, so 8 vpdpbusd leave each block's exact int32 sum in its own lane (no shuffles);
//     Q4_1 weights: 32 bytes per step, lanes 0-7 in the low nibbles, lanes 8-15 in the high ones;
//   the remaining blocks in pairs (one zero block pads an odd count): lanes 0-7 block 0, 8-15 block 1
//     (Q8_0: [b0 q0-31, b1 q0-31]); Q4_1: [b0 q0-15, b1 q0-15, b0 q16-31, b1 q16-31], so that the
//     natural Q4_1 bytes of the pair (low nibbles, then high) unpack into it.
// Q8_0 weight bytes are stored + 128; scale and min [N, padded blocks], zero in the padding.
// Q6_K (bits 6) is Q8_0's layout with a scale per 16 values: in a group, steps 0-3 (values 0..15) and 4-7
// (16..31) go into two int32 sums per lane, each scaled by its half's dw (and each starting at -128 times
// the sum of its half's activations); in a pair each lane already holds values of one half. Its scales
// [N, 32 * groups + 16 * pairs]: per group 16 first-half then 16 second-half scales, per pair each lane's.

struct Int8Plan {  // how the blocks of a row are cut: groups of 16, then pairs
  int64_t blocks, groups, pairs, padded;
  explicit Int8Plan(int64_t K) : blocks(K / kBlock), groups(blocks / 16), pairs((blocks - 16 * groups + 1) / 2),
                                 padded(16 * groups + 2 * pairs) {}
  int64_t units() const { return groups + pairs; }  // 16 scale lanes each
};

constexpr int kTile = 8;  // rows multiplied together (a call's last tile may be shorter)
constexpr int kAhead = 4;  // columns ahead whose weights the int8 kernel prefetches

struct Int8Rows {  // activation rows rounded to int8, in the layout above, tile by tile: within a tile of
                   // R rows, each unit's steps hold the R rows' 64 bytes side by side (constant offsets)
  std::vector<int8_t> q;       // [tiles: unit (group: 8 steps; pair: 1), row of the tile, 64]
  std::vector<float> dlanes;   // [tiles: unit, row of the tile, 16]: each int32 lane's dx
  std::vector<int32_t> bias;   // as dlanes: Q8_0's -128 * (sum of the lane's q); unused for Q4_1
  std::vector<int32_t> bias_hi;  // Q6_K: groups' bias split in halves, values 0..15 in bias, 16..31 here
  std::vector<float> sums;     // [rows, padded rounded up to 16]: s = d * sum(q), zero-padded
  int64_t sum_stride = 0;
};

// Round one block of 32 floats: q[0..15] to lo, q[16..31] to hi; returns d, sets sum(q).
__attribute__((target("avx512f,avx512bw"))) float quantize_block(const float* x, int8_t* lo, int8_t* hi, int* sum) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m512 vid = _mm512_set1_ps(id);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtsepi32_epi8(qb));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  return d;
}

template <int kBits>
void quantize_rows(const float* x, int64_t rows, int64_t K, const Int8Plan& plan, Int8Rows& a) {
  const int64_t row_bytes = plan.padded * kBlock, units = plan.units();
  a.sum_stride = (plan.padded + 15) / 16 * 16;
  a.q.assign(rows * row_bytes, 0);
  a.dlanes.assign(rows * units * 16, 0.0f);
  a.bias.assign(rows * units * 16, 0);
  a.sums.assign(rows * a.sum_stride, 0.0f);
  if (kBits == 6) a.bias_hi.assign(rows * units * 16, 0);
  constexpr bool kQ4 = kBits == 4;
  int8_t nat[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t r0 = r / kTile * kTile, R = rows - r0 < kTile ? rows - r0 : kTile, i = r - r0;
    int8_t* q = a.q.data() + r0 * row_bytes;  // the tile's
    float* dl = a.dlanes.data() + r0 * units * 16;
    int32_t* bias = a.bias.data() + r0 * units * 16;
    for (int64_t b = 0; b < plan.blocks; ++b) {
      int sum = 0;
      const float d = quantize_block(x + r * K + b * kBlock, nat, nat + 16, &sum);
      a.sums[r * a.sum_stride + b] = d * static_cast<float>(sum);
      if (b < 16 * plan.groups) {  // lane L = b % 16 of group b / 16: values 4j..4j+3 at step j
        const int64_t g = b / 16, lane = b % 16;
        for (int j = 0; j < 8; ++j) std::memcpy(q + ((g * 8 + j) * R + i) * 64 + lane * 4, nat + 4 * j, 4);
        dl[(g * R + i) * 16 + lane] = d;
        if (kBits == 6) {
          int lo = 0;
          for (int j = 0; j < 16; ++j) lo += nat[j];
          bias[(g * R + i) * 16 + lane] = -128 * lo;
          a.bias_hi[r0 * units * 16 + (g * R + i) * 16 + lane] = -128 * (sum - lo);
        } else {
          bias[(g * R + i) * 16 + lane] = -128 * sum;
        }
      } else {
        const int64_t t = b - 16 * plan.groups, p = t / 2, half = t % 2, unit = plan.groups + p;
        int8_t* pq = q + (plan.groups * 8 * R + p * R + i) * 64;
        std::memcpy(kQ4 ? pq + 16 * half : pq + 32 * half, nat, 16);
        std::memcpy(kQ4 ? pq + 32 + 16 * half : pq + 32 * half + 16, nat + 16, 16);
        for (int j = 0; j < 16; ++j) {
          if ((kQ4 ? (j / 4) % 2 : j / 8) != half) continue;  // the lanes this block's products land in
          const int8_t* lane = pq + 4 * j;
          dl[(unit * R + i) * 16 + j] = d;
          bias[(unit * R + i) * 16 + j] = -128 * (lane[0] + lane[1] + lane[2] + lane[3]);
        }
      }
    }
  }
}

// The 64 unsigned weight bytes of one vpdpbusd (Q4_1: 32 bytes, low nibbles then high ones).
template <bool kQ4>
__attribute__((target("avx512f,avx512bw"))) inline __m512i unpack_int8(const uint8_t* p) {
  if (kQ4) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), 1);
  }
  return _mm512_loadu_si512(p);
}

// The R rows of the tile from row r0 against output columns [n0, n1).
template <int kBits, int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_int8(const Int8Rows& a, const Int8Plan& plan,
                                                                      int64_t r0, const Weights& w, int64_t n0,
                                                                      int64_t n1, float* out) {
  constexpr bool kQ4 = kBits == 4, kHalves = kBits == 6;
  constexpr int kBytes = kQ4 ? 16 : 32;  // weight bytes per block
  // Q6_K: chain 0 the first half of each block, chain 1 the second
  constexpr int kChains = kHalves ? 2 : R <= 2 ? 4 : R <= 4 ? 2 : 1;
  const int64_t groups = plan.groups, pairs = plan.pairs, padded = plan.padded, wrow = padded * kBytes;
  const int64_t srow = kHalves ? 32 * groups + 16 * pairs : padded;  // scales per weight row
  // a pair's two scales -> its lanes (see the layout above)
  const __m512i spread = kQ4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                             : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const int8_t* q = a.q.data() + r0 * padded * kBlock;
  const float* dl = a.dlanes.data() + r0 * plan.units() * 16;
  const int32_t* bias = a.bias.data() + r0 * plan.units() * 16;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* wp = w.packed + n * wrow;
    const float* ws = w.scale + n * srow;
    if (n + kAhead < n1) {  // at a few rows the hardware prefetcher alone falls behind (1 row: 3.4 -> 2.7 ms a step)
      const auto* ahead = reinterpret_cast<const char*>(wp + kAhead * wrow);
      for (int64_t i = 0; i < wrow; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
      for (int64_t i = 0; i < srow; i += 16) _mm_prefetch(reinterpret_cast<const char*>(ws + kAhead * srow + i), _MM_HINT_T0);
      for (int64_t i = 0; i < padded; i += 16) {
        if (kQ4) _mm_prefetch(reinterpret_cast<const char*>(w.min + (n + kAhead) * padded + i), _MM_HINT_T0);
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* qg = q + g * 8 * R * 64;
      // kChains independent int32 sums per row (few rows: shorter dependency chains); integer, so exact in any order
      __m512i dot[R][kChains];
      for (int r = 0; r < R; ++r) {
        dot[r][0] = kQ4 ? _mm512_setzero_si512() : _mm512_loadu_si512(bias + (g * R + r) * 16);
        for (int c = 1; c < kChains; ++c) dot[r][c] = _mm512_setzero_si512();
        if (kHalves) dot[r][1] = _mm512_loadu_si512(a.bias_hi.data() + r0 * plan.units() * 16 + (g * R + r) * 16);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i wq = unpack_int8<kQ4>(wp + (g * 16 + 2 * j) * kBytes);
        for (int r = 0; r < R; ++r) {
          __m512i& d = dot[r][kHalves ? j / 4 : j % kChains];
          d = _mm512_dpbusd_epi32(d, wq, _mm512_loadu_si512(qg + (j * R + r) * 64));
        }
      }
      if (kHalves) {
        const __m512 dw0 = _mm512_loadu_ps(ws + 32 * g), dw1 = _mm512_loadu_ps(ws + 32 * g + 16);
        for (int r = 0; r < R; ++r) {
          const __m512 dx = _mm512_loadu_ps(dl + (g * R + r) * 16);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][0]), _mm512_mul_ps(dw0, dx), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][1]), _mm512_mul_ps(dw1, dx), acc[r]);
        }
        continue;
      }
      for (int r = 0; r < R; ++r) {
        for (int c = 1; c < kChains; ++c) dot[r][0] = _mm512_add_epi32(dot[r][0], dot[r][c]);
      }
      const __m512 dw = _mm512_loadu_ps(ws + 16 * g);
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(dl + (g * R + r) * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][0]), scale, acc[r]);
      }
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t unit = groups + p;
      const __m512i wq = unpack_int8<kQ4>(wp + (16 * groups + 2 * p) * kBytes);
      const __m512 dw = kHalves ? _mm512_loadu_ps(ws + 32 * groups + 16 * p)
                                : _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(0x3, ws + 16 * groups + 2 * p));
      const int8_t* qp = q + (groups * 8 * R + p * R) * 64;
      for (int r = 0; r < R; ++r) {
        const __m512i start = kQ4 ? _mm512_setzero_si512() : _mm512_loadu_si512(bias + (unit * R + r) * 16);
        const __m512i dot = _mm512_dpbusd_epi32(start, wq, _mm512_loadu_si512(qp + r * 64));
        const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(dl + (unit * R + r) * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      }
    }
    if (kQ4) {  // + m * s over the blocks, in the same accumulators
      for (int64_t b = 0; b < padded; b += 16) {
        const int64_t left = padded - b;
        const __mmask16 k = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        const __m512 m = _mm512_maskz_loadu_ps(k, w.min + n * padded + b);
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm512_fmadd_ps(m, _mm512_loadu_ps(a.sums.data() + (r0 + r) * a.sum_stride + b), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) out[(r0 + r) * w.N + n] = _mm512_reduce_add_ps(acc[r]);
  }
}

template <int kBits>
void columns_int8(const Int8Rows& a, const Int8Plan& plan, int64_t rows, const Weights& w, int64_t n0, int64_t n1,
                  float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    switch (rows - r0 < kTile ? rows - r0 : kTile) {
      case 8: rows_int8<kBits, 8>(a, plan, r0, w, n0, n1, out); break;
      case 7: rows_int8<kBits, 7>(a, plan, r0, w, n0, n1, out); break;
      case 6: rows_int8<kBits, 6>(a, plan, r0, w, n0, n1, out); break;
      case 5: rows_int8<kBits, 5>(a, plan, r0, w, n0, n1, out); break;
      case 4: rows_int8<kBits, 4>(a, plan, r0, w, n0, n1, out); break;
      case 3: rows_int8<kBits, 3>(a, plan, r0, w, n0, n1, out); break;
      case 2: rows_int8<kBits, 2>(a, plan, r0, w, n0, n1, out); break;
      default: rows_int8<kBits, 1>(a, plan, r0, w, n0, n1, out);
    }
  }
}


bool int8_available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

void check_shape(int bits, int64_t K) {
  if (K % kBlock != 0) throw std::invalid_argument("K must be a multiple of 32");
  if (bits != 4 && bits != 8 && bits != 6 && bits != 5) {
    throw std::invalid_argument("bits must be 4 (Q4_1), 8 (Q8_0), 5 (Q5_0) or 6 (Q6_K)");
  }
}

void block_linear_int8(int bits, uintptr_t x_ptr, int64_t rows, int64_t K, uintptr_t packed_ptr,
                       uintptr_t scale_ptr, uintptr_t min_ptr, int64_t N, uintptr_t out_ptr, int threads) {
  check_shape(bits, K);
  if (bits == 5) throw std::invalid_argument("int8 activations take Q5_0 in the Q8_0 layout (bits 8)");
  if (!int8_available()) throw std::runtime_error("int8 activations need AVX-512 BW and VNNI on this CPU");
  if (bits == 4 && min_ptr == 0) throw std::invalid_argument("Q4_1 weights need their min");
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  const Weights w{reinterpret_cast<const uint8_t*>(packed_ptr), reinterpret_cast<const float*>(scale_ptr),
                  reinterpret_cast<const float*>(min_ptr), K, N};
  auto* out = reinterpret_cast<float*>(out_ptr);
  py::gil_scoped_release release;
  const Int8Plan plan(K);
  Int8Rows a;
  if (bits == 4) {
    quantize_rows<4>(x, rows, K, plan, a);
  } else if (bits == 6) {
    quantize_rows<6>(x, rows, K, plan, a);
  } else {
    quantize_rows<8>(x, rows, K, plan, a);
  }
  over_columns(N, threads, [&](int64_t n0, int64_t n1) {
    if (bits == 4) {
      columns_int8<4>(a, plan, rows, w, n0, n1, out);
    } else if (bits == 6) {
      columns_int8<6>(a, plan, rows, w, n0, n1, out);
    } else {
      columns_int8<8>(a, plan, rows, w, n0, n1, out);
    }
  });
}

// The rounding alone, in natural order: q [rows, K] int8, d and s [rows, K/32] fp32 (for tests).
void quantize_q8(uintptr_t x_ptr, int64_t rows, int64_t K, uintptr_t q_ptr, uintptr_t d_ptr, uintptr_t s_ptr) {
  check_shape(8, K);
  if (!int8_available()) throw std::runtime_error("int8 activations need AVX-512 BW and VNNI on this CPU");
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  auto* q = reinterpret_cast<int8_t*>(q_ptr);
  auto* d = reinterpret_cast<float*>(d_ptr);
  auto* s = reinterpret_cast<float*>(s_ptr);
  const int64_t nb = K / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      int sum = 0;
      int8_t* dst = q + r * K + b * kBlock;
      d[r * nb + b] = quantize_block(x + r * K + b * kBlock, dst, dst + 16, &sum);
      s[r * nb + b] = d[r * nb + b] * static_cast<float>(sum);
    }
  }
}

void block_linear(int bits, uintptr_t x_ptr, int64_t rows, int64_t K, uintptr_t packed_ptr, uintptr_t scale_ptr,
                  uintptr_t min_ptr, int64_t N, uintptr_t out_ptr, int threads, int isa) {
  check_shape(bits, K);
  if (bits == 4 && min_ptr == 0) throw std::invalid_argument("Q4_1 weights need their min");
  const int best = avx512_available() ? 2 : avx2_available() ? 1 : 0;
  if (isa > best) throw std::runtime_error("this CPU lacks the instruction set asked for");
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  const Weights w{reinterpret_cast<const uint8_t*>(packed_ptr), reinterpret_cast<const float*>(scale_ptr),
                  reinterpret_cast<const float*>(min_ptr), K, N};
  auto* out = reinterpret_cast<float*>(out_ptr);
  if (isa < 0) isa = best;
  py::gil_scoped_release release;
  over_columns(N, threads, [&](int64_t n0, int64_t n1) {
    if (bits == 4) {
      columns<Q4>(x, rows, w, n0, n1, out, isa);
    } else if (bits == 6) {
      columns<Q6>(x, rows, w, n0, n1, out, isa);
    } else if (bits == 5) {
      columns<Q5>(x, rows, w, n0, n1, out, isa);
    } else {
      columns<Q8>(x, rows, w, n0, n1, out, isa);
    }
  });
}

}  // namespace

PYBIND11_MODULE(_blockq, m) {
  m.doc() = "GGUF-block (Q4_1/Q4_K, Q8_0/Q5_0, Q6_K) weight matmul for a few rows: fp32 activations (AVX-512, AVX2/FMA or "
            "scalar) or int8 activations (AVX-512 VNNI)";
  m.def("avx2_available", &avx2_available, "True when this CPU has AVX2 and FMA (the fast path)");
  m.def("avx512_available", &avx512_available, "True when this CPU has AVX-512F (16 weights per instruction)");
  m.def("block_linear", &block_linear, py::arg("bits"), py::arg("x"), py::arg("rows"), py::arg("K"),
        py::arg("packed"), py::arg("scale"), py::arg("min"), py::arg("N"), py::arg("out"), py::arg("threads"),
        py::arg("isa") = -1,
        "out[rows, N] = x[rows, K] @ dequant(W)^T; arguments are data pointers of contiguous tensors (min may be 0); "
        "isa: -1 the best this CPU has, 2 AVX-512, 1 AVX2/FMA, 0 scalar");
  m.def("int8_available", &int8_available, "True when this CPU has AVX-512 BW and VNNI (int8 activations)");
  m.def("block_linear_int8", &block_linear_int8, py::arg("bits"), py::arg("x"), py::arg("rows"), py::arg("K"),
        py::arg("packed"), py::arg("scale"), py::arg("min"), py::arg("N"), py::arg("out"), py::arg("threads"),
        "block_linear with each row of x rounded to int8 per block of 32 (Q8_1) and integer dot products (VNNI); "
        "the weights in the int8 layout (blockq.Int8Layout)");
  m.def("quantize_q8", &quantize_q8, py::arg("x"), py::arg("rows"), py::arg("K"), py::arg("q"), py::arg("d"),
        py::arg("s"), "The int8 rounding of x[rows, K]: q [rows, K] int8, d and s = d * sum(q) [rows, K/32] fp32");
}
