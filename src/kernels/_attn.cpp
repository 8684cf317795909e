// Tree attention for a CPU verification step (or a causal prefill chunk): T query tokens over the
// committed prefix (P keys, no mask) and the step's own T keys (under a [T, T] visibility mask).
//
// Each query row (head h, token t) attends to its *visible key sequence*: prefix keys 0..P-1, then
// the step's keys t sees, in order. That sequence is cut at fixed multiples of kChunk keys; each
// chunk gives the row a partial (max m, sum l, unnormalised output acc) computed in blocks of 16
// keys, and the partials are folded in chunk order. Every number a row gets is thus a function of
// its visible sequence only: a row computed inside a step of T tokens is bit-identical to the same
// token computed alone after its ancestors were committed (so a verification step equals plain
// decoding with this kernel), and to any thread count.
//
// Keys and values are read once per step for all rows that share them: work items are (kv head,
// chunk); inside an item each block of 16 keys is read (and, for 16-bit KV, widened to fp32) once
// and then scored by all groups x T query rows of that kv head while it sits in L1.
//
// Two instruction sets, chosen at run time: AVX-512F (a block of 16 scores is one vector) and
// AVX2 + FMA + F16C (a pair of 8-lane vectors). They perform the same IEEE operations in the same
// order: a dot product keeps 16 per-lane partial sums, adds lane i to lane i + 8 and then sums the 8
// lanes in one fixed tree (sum8); softmax sums and value accumulations run lane by lane; exp
// scales by 2^n with a single rounding in both. So the two paths give the same bits (the tests
// check it); only the folding of chunk partials uses libm's exp, shared by both. This needs
// -ffp-contract=off (setup.py): a compiler that fused a written multiply and add would break it.
//
// bf16 KV on a CPU with AVX512-BF16 ("avx512bf16"; head dims 32, 64, 128) runs the dot products in
// bf16, as GPU attention in bf16 does: the query row and each block's softmax weights are rounded
// to bf16 (round to nearest even) and multiplied with vdpbf16ps, two products per fp32 lane; max,
// exp and the sums stay fp32. Half the multiply instructions per key and row, so a verification
// step's extra rows cost less; each row's operations are still fixed by its visible sequence alone
// (value rows are paired 0-1, 2-3, ... inside each block of 16), so a verification step still
// equals plain decoding on such a CPU. It is a different rounding from the fp32 path that the other
// ISAs run on bf16 KV, so outputs differ from those CPUs' (as int8 matmul inputs do).
//
// Layout: q fp32 with strides (head, token), head dim contiguous; k/v [Hkv, S, D] rows contiguous
// (stride D), kv-head stride given; fp32, fp16 or bf16. The prefix is rows prefix_start ..
// prefix_start + P - 1; the step's U keys are rows slots[0..U-1] (no slots: rows prefix_start + P +
// j, U = T). mask [T, U] uint8 (1 = token i sees step key j); a token sees the step keys it sees in
// the order of j. out [T, H, D] fp32 contiguous (what the output projection reads).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <immintrin.h>
#include <omp.h>

namespace py = pybind11;

// Per-function instruction sets (the module itself stays baseline x86-64, so it loads anywhere).
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))
#define BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

namespace {

constexpr int kLanes = 16;  // keys per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
enum Kind { kF32 = 0, kF16 = 1, kBF16 = 2 };

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() { return has_avx2() && __builtin_cpu_supports("avx512f"); }
bool has_avx512bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}

// The instruction sets this CPU can run the kernel with, best first.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> isas;
  if (has_avx512bf16()) isas.emplace_back("avx512bf16");
  if (has_avx512()) isas.emplace_back("avx512");
  if (has_avx2()) isas.emplace_back("avx2");
  return isas;
}

struct Problem {
  const float* q;
  int64_t q_head, q_tok;  // q strides (floats)
  const void* k;
  const void* v;
  int64_t kv_head;  // elements between kv heads in k and v
  int kind;
  int64_t H, Hkv, T, D, P, chunk;
  float scale;
  float* out;
  int64_t prefix_start;  // the row of prefix key 0
};

// Per query token: how many keys it sees, how many of those lie in consecutive rows from the
// prefix's first (the prefix, then step keys seen in order right after it: a chain or a causal
// chunk in a cache), and the rows of the step keys it sees.
struct Rows {
  std::vector<int64_t> visible, direct;
  std::vector<std::vector<int64_t>> tree;  // rows of the step keys each token sees, in order
  int64_t start, most_direct = 0;          // the prefix's first row; the largest direct

  Rows(const uint8_t* mask, int64_t T, int64_t U, int64_t P, int64_t start, const int64_t* slots)
      : visible(T), direct(T), tree(T), start(start) {
    for (int64_t t = 0; t < T; ++t) {
      bool in_order = true;
      int64_t run = 0;
      for (int64_t j = 0; j < U; ++j) {
        if (!mask[t * U + j]) continue;
        const int64_t row = slots ? slots[j] : start + P + j;
        in_order = in_order && row == start + P + static_cast<int64_t>(tree[t].size());
        tree[t].push_back(row);
        if (in_order) run = static_cast<int64_t>(tree[t].size());
      }
      visible[t] = P + static_cast<int64_t>(tree[t].size());
      direct[t] = P + run;
      most_direct = std::max(most_direct, direct[t]);
    }
  }
  // The row of token t's visible key i.
  int64_t key(int64_t t, int64_t i, int64_t P) const { return i < P ? start + i : tree[t][i - P]; }
  // How many of the keys [b0, b0 + 16) some token reads from consecutive rows.
  int direct_in_block(int64_t b0) const { return static_cast<int>(std::clamp<int64_t>(most_direct - b0, 0, 16)); }
};

// ---------------------------------------------------------------------------------------------
// Arithmetic both instruction sets share (8-lane AVX2 code; AVX-512 functions call it too).

// Lane j = the sum of x[j]'s 8 lanes, as ((x0 + x2) + (x1 + x3)) + ((x4 + x6) + (x5 + x7)).
AVX2_FN inline __m256 sum8(const __m256* x) {
  __m256 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d y = _mm256_castps_pd(b[2 * i]), z = _mm256_castps_pd(b[2 * i + 1]);
    c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(y, z)), _mm256_castpd_ps(_mm256_unpackhi_pd(y, z)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

// The sum of x's 8 lanes, as ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7)).
AVX2_FN inline float hsum8(__m256 x) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// exp's constants (Cephes expf): ln 2 in two parts; e^r ~ 1 + r + r^2 q(r), q's coefficients from the highest power.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// 2^k for integer lanes k in [-126, 127].
AVX2_FN inline __m256 pow2(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// exp(x) per lane: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (~1 ulp);
// x <= -104 (and -inf) gives exactly 0. 2^n is applied as 2^(n >> 1) then 2^(n - (n >> 1)): both
// factors are normal floats and the first product is exact, so the result is rounded once, as
// AVX-512's vscalefps rounds it.
AVX2_FN inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-104.0f);
  const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.5f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1);
  return _mm256_andnot_ps(zero, _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(_mm256_sub_epi32(ni, n1))));
}

// ---------------------------------------------------------------------------------------------
// The per-block operations, once per instruction set. D = 16 * ND floats per row.

template <int ND>
struct Avx2 {
  static constexpr int D = 16 * ND;

  // Row at `offset` of base (kind) as fp32 into dst[D] (fp16: vcvtph2ps; bf16: the 16 bits shifted up).
  AVX2_FN static void widen(const void* base, int kind, int64_t offset, float* dst) {
    for (int c = 0; c < 2 * ND; ++c) {
      __m256 x;
      if (kind == kF32) {
        x = _mm256_loadu_ps(static_cast<const float*>(base) + offset + 8 * c);
      } else {
        const __m128i h = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset + 8 * c));
        x = kind == kF16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
      _mm256_storeu_ps(dst + 8 * c, x);
    }
  }

  // s[0..15] = scale * q . k_j for the n rows k_j (lanes >= n: -inf).
  AVX2_FN static void score(const float* q, const float* const* k, int n, float scale, float* s) {
    __m256 qv[2 * ND];
    for (int c = 0; c < 2 * ND; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
    for (int half = 0; half < 2; ++half) {
      __m256 x[8];
      for (int i = 0; i < 8; ++i) {
        const int j = 8 * half + i;
        if (j >= n) {
          x[i] = _mm256_setzero_ps();
          continue;
        }
        __m256 lo = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k[j])), hi = _mm256_mul_ps(qv[1], _mm256_loadu_ps(k[j] + 8));
        for (int c = 1; c < ND; ++c) {
          lo = _mm256_fmadd_ps(qv[2 * c], _mm256_loadu_ps(k[j] + 16 * c), lo);
          hi = _mm256_fmadd_ps(qv[2 * c + 1], _mm256_loadu_ps(k[j] + 16 * c + 8), hi);
        }
        x[i] = _mm256_add_ps(lo, hi);
      }
      const __m256 scores = _mm256_mul_ps(sum8(x), _mm256_set1_ps(scale));
      const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n - 8 * half)), _CMP_LT_OQ);
      _mm256_storeu_ps(s + 8 * half, _mm256_blendv_ps(_mm256_set1_ps(kNegInf), scores, valid));
    }
  }

  // s[0..16 * blocks) <- exp(s - m) with m their max; ml = (m, sum of the exps).
  AVX2_FN static void softmax(float* s, int64_t blocks, float* ml) {
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int64_t i = 0; i < 2 * blocks; ++i) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + 8 * i));
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4E));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xB1));
    __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < blocks; ++b) {
      for (int half = 0; half < 2; ++half) {
        float* at = s + b * kLanes + 8 * half;
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(at), mx));
        _mm256_storeu_ps(at, p);
        sum[half] = _mm256_add_ps(sum[half], p);
      }
    }
    ml[0] = _mm256_cvtss_f32(mx);
    ml[1] = hsum8(_mm256_add_ps(sum[0], sum[1]));
  }

  // acc[D] += sum_j p[j] v_j over the n rows v_j, in order (at most 8 accumulators live at a time).
  AVX2_FN static void accumulate(const float* p, const float* const* v, int n, float* acc) {
    constexpr int G = 2 * ND < 8 ? 2 * ND : 8;
    for (int c0 = 0; c0 < 2 * ND; c0 += G) {
      __m256 a[G];
      for (int c = 0; c < G; ++c) a[c] = _mm256_loadu_ps(acc + 8 * (c0 + c));
      for (int j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < G; ++c) a[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + 8 * (c0 + c)), a[c]);
      }
      for (int c = 0; c < G; ++c) _mm256_storeu_ps(acc + 8 * (c0 + c), a[c]);
    }
  }
};

template <int ND>
struct Avx512 {
  static constexpr int D = 16 * ND;

  AVX512_FN static void widen(const void* base, int kind, int64_t offset, float* dst) {
    for (int c = 0; c < ND; ++c) {
      __m512 x;
      if (kind == kF32) {
        x = _mm512_loadu_ps(static_cast<const float*>(base) + offset + 16 * c);
      } else {
        const __m256i h = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + offset + 16 * c));
        x = kind == kF16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      _mm512_storeu_ps(dst + 16 * c, x);
    }
  }

  // sum8's tree on 16 rows at once: row i in the low 256 bits, row i + 8 in the high ones.
  AVX512_FN static __m512 sum16(const __m512* a) {
    __m512 z[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7 + lanes 8-15 of rows i and i + 8
      z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)
      b[i] = _mm512_add_ps(_mm512_unpacklo_ps(z[2 * i], z[2 * i + 1]), _mm512_unpackhi_ps(z[2 * i], z[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m512d y = _mm512_castps_pd(b[2 * i]), w = _mm512_castps_pd(b[2 * i + 1]);
      c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(y, w)), _mm512_castpd_ps(_mm512_unpackhi_pd(y, w)));
    }
    const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i high = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    return _mm512_add_ps(_mm512_permutex2var_ps(c[0], low, c[1]), _mm512_permutex2var_ps(c[0], high, c[1]));
  }

  AVX512_FN static void score(const float* q, const float* const* k, int n, float scale, float* s) {
    __m512 qv[ND], a[kLanes];
    for (int c = 0; c < ND; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    for (int j = 0; j < kLanes; ++j) {
      if (j >= n) {
        a[j] = _mm512_setzero_ps();
        continue;
      }
      __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k[j]));
      for (int c = 1; c < ND; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k[j] + 16 * c), acc);
      a[j] = acc;
    }
    const __m512 scores = _mm512_mul_ps(sum16(a), _mm512_set1_ps(scale));
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_storeu_ps(s, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), scores));
  }

  // exp8 on 16 lanes, with the single rounding of vscalefps.
  AVX512_FN static __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-104.0f);
    const __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.5f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x));
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero), _mm512_scalef_ps(p, n));
  }

  AVX512_FN static void softmax(float* s, int64_t blocks, float* ml) {
    __m512 mx = _mm512_set1_ps(kNegInf);
    for (int64_t b = 0; b < blocks; ++b) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + b * kLanes));
    const float m = _mm512_reduce_max_ps(mx);  // a max is exact in any order
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + b * kLanes), mv));
      _mm512_storeu_ps(s + b * kLanes, p);
      sum = _mm512_add_ps(sum, p);
    }
    ml[0] = m;
    ml[1] = hsum8(_mm256_add_ps(_mm512_castps512_ps256(sum),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1))));
  }

  AVX512_FN static void accumulate(const float* p, const float* const* v, int n, float* acc) {
    __m512 a[ND];
    for (int c = 0; c < ND; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
    for (int j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < ND; ++c) a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v[j] + 16 * c), a[c]);
    }
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
  }
};

// bf16 dot products (AVX512-BF16): D = 16 * ND, ND even; a row of bf16 is W = ND / 2 vectors.
template <int ND>
struct Bf16 {
  static constexpr int D = 16 * ND, W = ND / 2;

  // The query row rounded to bf16: qb[W].
  BF16_FN static void round_query(const float* q, __m512bh* qb) {
    for (int c = 0; c < W; ++c) qb[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * c + 16), _mm512_loadu_ps(q + 32 * c));
  }

  // s[0..15] = scale * q . k_j for the n bf16 rows k_j (lanes >= n: -inf); per key 16 lanes of pair
  // sums, then summed as Avx512::score sums.
  BF16_FN static void score(const __m512bh* qb, const uint16_t* const* k, int n, float scale, float* s) {
    __m512 a[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      a[j] = _mm512_setzero_ps();
      if (j >= n) continue;
      for (int c = 0; c < W; ++c)
        a[j] = _mm512_dpbf16_ps(a[j], qb[c], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k[j] + 32 * c)));
    }
    const __m512 scores = _mm512_mul_ps(Avx512<ND>::sum16(a), _mm512_set1_ps(scale));
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_storeu_ps(s, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), scores));
  }

  // The n value rows v_j of a block as 8 pairs: vp[m * ND + c] holds (v_2m[d], v_2m+1[d]) for the 16
  // dims d of vector c, in order (rows >= n are zeros).
  BF16_FN static void pair_values(const uint16_t* const* v, int n, __m512i* vp) {
    __m512i lo_idx, hi_idx;
    alignas(64) uint16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = static_cast<uint16_t>(i), lo[2 * i + 1] = static_cast<uint16_t>(32 + i);
      hi[2 * i] = static_cast<uint16_t>(16 + i), hi[2 * i + 1] = static_cast<uint16_t>(48 + i);
    }
    lo_idx = _mm512_load_si512(lo);
    hi_idx = _mm512_load_si512(hi);
    for (int m = 0; 2 * m < n; ++m) {
      for (int w = 0; w < W; ++w) {
        const __m512i x = _mm512_loadu_si512(v[2 * m] + 32 * w);
        const __m512i y = 2 * m + 1 < n ? _mm512_loadu_si512(v[2 * m + 1] + 32 * w) : _mm512_setzero_si512();
        vp[m * ND + 2 * w] = _mm512_permutex2var_epi16(x, lo_idx, y);
        vp[m * ND + 2 * w + 1] = _mm512_permutex2var_epi16(x, hi_idx, y);
      }
    }
  }

  // acc[D] += sum_j bf16(p[j]) v_j over the block's first n rows, a pair of rows per vdpbf16ps.
  BF16_FN static void accumulate(const float* p, const __m512i* vp, int n, float* acc) {
    alignas(32) uint32_t pairs[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs),
                       reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(p))));
    __m512 a[ND];
    for (int c = 0; c < ND; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
    for (int m = 0; 2 * m < n; ++m) {
      const __m512bh pm = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pairs[m])));
      for (int c = 0; c < ND; ++c) a[c] = _mm512_dpbf16_ps(a[c], pm, reinterpret_cast<__m512bh>(vp[m * ND + c]));
    }
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
  }
};

// ---------------------------------------------------------------------------------------------
// The walk over blocks and chunks, written once: V is Avx2<ND> or Avx512<ND>. These templates are
// compiled into each instruction set's work item (chunk_avx2 / chunk_avx512, which flatten them).

// Floats on 64-byte boundaries (a vector load that crosses a cache line costs two).
struct Aligned {
  std::vector<float> raw;
  float* ptr = nullptr;
  void resize(size_t n) {
    raw.resize(n + 16);
    ptr = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t{63});
  }
  float* data() { return ptr; }
};

constexpr int kAcc = 16;  // a partial is (m, l, 14 floats of padding, acc[D]): acc on a cache-line boundary

struct Scratch {
  Aligned scores, direct, gathered, query;  // query: the item's query rows in bf16 (bf16 path)
  const float* dptr[kLanes];
  const float* gptr[kLanes];
};

constexpr int kAhead = 2;  // blocks a walk asks the memory for ahead of their use

// Ask for the rows [b0, b0 + n) of kv head g (base: K or V, elem bytes each) ahead of their use; a
// streaming walk otherwise waits on each block in turn.
inline void prefetch_rows(const Problem& pb, const void* base, int64_t g, int64_t b0, int64_t n) {
  if (n <= 0) return;
  const int64_t elem = pb.kind == kF32 ? 4 : 2;
  const char* first = static_cast<const char*>(base) + (g * pb.kv_head + (pb.prefix_start + b0) * pb.D) * elem;
  for (int64_t offset = 0; offset < n * pb.D * elem; offset += 64) __builtin_prefetch(first + offset, 0, 3);
}

// Pointers to the fp32 rows of keys [b0, b0 + n) of kv head g as the cache holds them in order.
template <class V>
void direct_rows(const Problem& pb, const void* base, int64_t g, int64_t b0, int n, Scratch& sc) {
  for (int j = 0; j < n; ++j) {
    const int64_t offset = g * pb.kv_head + (pb.prefix_start + b0 + j) * V::D;
    if (pb.kind == kF32) {
      sc.dptr[j] = static_cast<const float*>(base) + offset;
    } else {
      V::widen(base, pb.kind, offset, sc.direct.data() + j * V::D);
      sc.dptr[j] = sc.direct.data() + j * V::D;
    }
  }
}

// Token t's visible keys b0 .. b0 + n - 1 (logical indices) of kv head g as fp32 rows.
template <class V>
const float* const* rows_for(const Problem& pb, const Rows& rows, const void* base, int64_t g, int64_t t, int64_t b0,
                             int n, Scratch& sc) {
  if (b0 + n <= rows.direct[t]) return sc.dptr;
  for (int j = 0; j < n; ++j) {
    V::widen(base, pb.kind, g * pb.kv_head + rows.key(t, b0 + j, pb.P) * V::D, sc.gathered.data() + j * V::D);
    sc.gptr[j] = sc.gathered.data() + j * V::D;
  }
  return sc.gptr;
}

// For each block of 16 keys in [c0, c0 + reach) of kv head g (K or V: base) and each token that sees some of
// them: fn(block, token, its n visible rows there as fp32, n). The block's rows are read once for all tokens
// that see them where the cache holds them.
template <class V, class F>
void for_each_block(const Problem& pb, const Rows& rows, const void* base, int64_t g, int64_t c0, int64_t reach,
                    Scratch& sc, F&& fn) {
  for (int64_t b = 0; b * kLanes < reach; ++b) {
    const int64_t b0 = c0 + b * kLanes, ahead = (b + kAhead) * kLanes;
    if (ahead < reach) prefetch_rows(pb, base, g, c0 + ahead, rows.direct_in_block(c0 + ahead));
    direct_rows<V>(pb, base, g, b0, rows.direct_in_block(b0), sc);
    for (int64_t t = 0; t < pb.T; ++t) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, rows.visible[t] - b0));
      if (n > 0) fn(b, t, rows_for<V>(pb, rows, base, g, t, b0, n, sc), n);
    }
  }
}

// The softmax numerators of a work item's rows from their scores: m, p = exp(s - m) in place, l = sum
// p into the row's partial (slot(h, t)), whose acc is zeroed; rows that see no key of the chunk get l = 0.
template <class V, class Slot, class ScoreRow>
void softmax_rows(const Problem& pb, const Rows& rows, int64_t g, int64_t c0, Slot&& slot, ScoreRow&& score_row) {
  const int64_t groups = pb.H / pb.Hkv;
  for (int64_t t = 0; t < pb.T; ++t) {
    const int64_t len = std::min(pb.chunk, rows.visible[t] - c0);
    for (int64_t j = 0; j < groups; ++j) {
      float* out = slot(g * groups + j, t);
      if (len <= 0) {
        out[0] = kNegInf;
        out[1] = 0.0f;
        continue;
      }
      V::softmax(score_row(j, t), (len + kLanes - 1) / kLanes, out);
      std::memset(out + kAcc, 0, V::D * sizeof(float));
    }
  }
}

// One work item: chunk c of kv head g for all its groups x T query rows; partial[row][c] = (m, l, acc[D]).
template <class V>
void chunk_item(const Problem& pb, const Rows& rows, int64_t g, int64_t c, int64_t n_chunks, Scratch& sc,
                float* partial) {
  const int64_t T = pb.T, groups = pb.H / pb.Hkv, C = pb.chunk, c0 = c * C;
  int64_t reach = 0;  // keys of this chunk the farthest-seeing row reads
  for (int64_t t = 0; t < T; ++t) reach = std::max(reach, std::min(C, rows.visible[t] - c0));
  auto slot = [&](int64_t h, int64_t t) { return partial + ((h * T + t) * n_chunks + c) * (V::D + kAcc); };
  auto score_row = [&](int64_t j, int64_t t) { return sc.scores.data() + (j * T + t) * C; };
  for_each_block<V>(pb, rows, pb.k, g, c0, reach, sc, [&](int64_t b, int64_t t, const float* const* k, int n) {
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t h = g * groups + j;
      V::score(pb.q + h * pb.q_head + t * pb.q_tok, k, n, pb.scale, score_row(j, t) + b * kLanes);
    }
  });
  softmax_rows<V>(pb, rows, g, c0, slot, score_row);
  for_each_block<V>(pb, rows, pb.v, g, c0, reach, sc, [&](int64_t b, int64_t t, const float* const* v, int n) {
    for (int64_t j = 0; j < groups; ++j)
      V::accumulate(score_row(j, t) + b * kLanes, v, n, slot(g * groups + j, t) + kAcc);
  });
}

// chunk_item with bf16 dot products (bf16 KV, AVX512-BF16): keys are read in place (no widening), each
// block's value rows are paired once for all rows that see them where the cache holds them in order.
template <int ND>
BF16_FN __attribute__((flatten)) void chunk_bf16(const Problem& pb, const Rows& rows, int64_t g, int64_t c,
                                                 int64_t n_chunks, Scratch& sc, float* partial) {
  using B = Bf16<ND>;
  constexpr int D = B::D, W = B::W;
  const int64_t T = pb.T, groups = pb.H / pb.Hkv, C = pb.chunk, c0 = c * C;
  int64_t reach = 0;
  for (int64_t t = 0; t < T; ++t) reach = std::max(reach, std::min(C, rows.visible[t] - c0));
  auto slot = [&](int64_t h, int64_t t) { return partial + ((h * T + t) * n_chunks + c) * (D + kAcc); };
  auto score_row = [&](int64_t j, int64_t t) { return sc.scores.data() + (j * T + t) * C; };
  const uint16_t* keys = static_cast<const uint16_t*>(pb.k) + g * pb.kv_head;
  const uint16_t* values = static_cast<const uint16_t*>(pb.v) + g * pb.kv_head;
  __m512bh* qb = reinterpret_cast<__m512bh*>(sc.query.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < groups; ++j)
      B::round_query(pb.q + (g * groups + j) * pb.q_head + t * pb.q_tok, qb + (j * T + t) * W);
  const uint16_t* direct[kLanes];
  const uint16_t* gathered[kLanes];
  // Token t's n visible rows of the block at b0 (base: keys or values).
  auto rows_of = [&](const uint16_t* base, int64_t t, int64_t b0, int n) -> const uint16_t* const* {
    if (b0 + n <= rows.direct[t]) return direct;
    for (int j = 0; j < n; ++j) gathered[j] = base + rows.key(t, b0 + j, pb.P) * D;
    return gathered;
  };
  for (int64_t b = 0; b * kLanes < reach; ++b) {
    const int64_t b0 = c0 + b * kLanes, ahead = (b + kAhead) * kLanes;
    if (ahead < reach) prefetch_rows(pb, pb.k, g, c0 + ahead, rows.direct_in_block(c0 + ahead));
    const int in_cache = rows.direct_in_block(b0);
    for (int j = 0; j < in_cache; ++j) direct[j] = keys + (pb.prefix_start + b0 + j) * D;
    for (int64_t t = 0; t < T; ++t) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, rows.visible[t] - b0));
      if (n <= 0) continue;
      const uint16_t* const* k = rows_of(keys, t, b0, n);
      for (int64_t j = 0; j < groups; ++j) B::score(qb + (j * T + t) * W, k, n, pb.scale, score_row(j, t) + b * kLanes);
    }
  }
  softmax_rows<Avx512<ND>>(pb, rows, g, c0, slot, score_row);
  __m512i* paired = reinterpret_cast<__m512i*>(sc.direct.data());  // the block's rows in cache order
  __m512i* own = reinterpret_cast<__m512i*>(sc.gathered.data());   // a token's own visible rows
  for (int64_t b = 0; b * kLanes < reach; ++b) {
    const int64_t b0 = c0 + b * kLanes, ahead = (b + kAhead) * kLanes;
    if (ahead < reach) prefetch_rows(pb, pb.v, g, c0 + ahead, rows.direct_in_block(c0 + ahead));
    const int in_cache = rows.direct_in_block(b0);
    for (int j = 0; j < in_cache; ++j) direct[j] = values + (pb.prefix_start + b0 + j) * D;
    bool paired_ready = false;
    for (int64_t t = 0; t < T; ++t) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, rows.visible[t] - b0));
      if (n <= 0) continue;
      const __m512i* vp;
      if (b0 + n <= rows.direct[t]) {
        if (!paired_ready) B::pair_values(direct, in_cache, paired);
        paired_ready = true;
        vp = paired;
      } else {
        B::pair_values(rows_of(values, t, b0, n), n, own);
        vp = own;
      }
      for (int64_t j = 0; j < groups; ++j)
        B::accumulate(score_row(j, t) + b * kLanes, vp, n, slot(g * groups + j, t) + kAcc);
    }
  }
}

// chunk_item compiled for each instruction set: flatten inlines the walk and its block operations here.
using ChunkFn = void (*)(const Problem&, const Rows&, int64_t, int64_t, int64_t, Scratch&, float*);

template <int ND>
AVX2_FN __attribute__((flatten)) void chunk_avx2(const Problem& pb, const Rows& rows, int64_t g, int64_t c,
                                                 int64_t n_chunks, Scratch& sc, float* partial) {
  chunk_item<Avx2<ND>>(pb, rows, g, c, n_chunks, sc, partial);
}

template <int ND>
AVX512_FN __attribute__((flatten)) void chunk_avx512(const Problem& pb, const Rows& rows, int64_t g, int64_t c,
                                                     int64_t n_chunks, Scratch& sc, float* partial) {
  chunk_item<Avx512<ND>>(pb, rows, g, c, n_chunks, sc, partial);
}

// Fold a row's chunk partials in order and normalise: out[D] (baseline code, the same for both ISAs).
void fold(const float* partial, int64_t n_chunks, int64_t D, float* out) {
  float m = kNegInf, l = 0.0f;
  std::vector<float> acc(D, 0.0f);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const float* p = partial + c * (D + kAcc);
    if (p[1] == 0.0f) continue;  // the row sees no key of this chunk
    if (l == 0.0f) {
      m = p[0];
      l = p[1];
      std::copy(p + kAcc, p + kAcc + D, acc.begin());
      continue;
    }
    const float mn = std::max(m, p[0]);
    const float a = std::exp(m - mn), b = std::exp(p[0] - mn);
    l = l * a + p[1] * b;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * a + p[kAcc + d] * b;
    m = mn;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = l > 0.0f ? acc[d] / l : 0.0f;
}

template <int ND>
void run(const Problem& pb, const Rows& rows, int threads, bool avx512, bool bf16) {
  constexpr int D = 16 * ND;
  ChunkFn item_fn = avx512 ? &chunk_avx512<ND> : &chunk_avx2<ND>;
  if constexpr (ND % 2 == 0) {
    if (bf16) item_fn = &chunk_bf16<ND>;
  }
  const int64_t most = *std::max_element(rows.visible.begin(), rows.visible.end());
  const int64_t n_chunks = std::max<int64_t>(1, (most + pb.chunk - 1) / pb.chunk);
  const int64_t items = pb.Hkv * n_chunks, groups = pb.H / pb.Hkv;
  Aligned partial;
  partial.resize(static_cast<size_t>(pb.H * pb.T * n_chunks * (D + kAcc)));
#pragma omp parallel num_threads(threads)
  {
    Scratch sc;
    sc.scores.resize(static_cast<size_t>(groups * pb.T * pb.chunk));
    sc.direct.resize(kLanes * D);
    sc.gathered.resize(kLanes * D);
    sc.query.resize(static_cast<size_t>(groups * pb.T * D / 2));
    // contiguous runs of items per thread: each thread then streams its K and V rows in memory order
    // (the hardware prefetchers follow; dynamic hand-outs made a one-token step's attention 1.2x slower)
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item)
      item_fn(pb, rows, item / n_chunks, item % n_chunks, n_chunks, sc, partial.data());
#pragma omp for schedule(static)
    for (int64_t row = 0; row < pb.H * pb.T; ++row) {  // row = h * T + t -> out[t, h]
      const int64_t h = row / pb.T, t = row % pb.T;
      fold(partial.data() + row * n_chunks * (D + kAcc), n_chunks, D, pb.out + (t * pb.H + h) * D);
    }
  }
}

void tree_attention(uintptr_t q, int64_t q_head, int64_t q_tok, uintptr_t k, uintptr_t v, int64_t kv_head, int kind,
                    int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t P, uintptr_t mask, double scale,
                    uintptr_t out, int64_t chunk, int threads, const std::string& isa, int64_t prefix_start,
                    int64_t U, uintptr_t slots) {
  if (isa != "avx512bf16" && isa != "avx512" && isa != "avx2")
    throw std::invalid_argument("isa must be 'avx512bf16', 'avx512' or 'avx2', not '" + isa + "'");
  const bool avx512 = isa != "avx2";
  if (isa == "avx512bf16" && !has_avx512bf16()) throw std::runtime_error("this CPU lacks AVX512-BF16 (or BW, VL)");
  if (!(avx512 ? has_avx512() : has_avx2()))
    throw std::runtime_error(avx512 ? "this CPU lacks AVX-512F" : "this CPU lacks AVX2, FMA or F16C");
  if (kind < kF32 || kind > kBF16) throw std::invalid_argument("kind must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (H <= 0 || Hkv <= 0 || H % Hkv || T <= 0 || P < 0 || prefix_start < 0)
    throw std::invalid_argument("bad head or token counts");
  if (U < 0) U = T;
  if (slots == 0 && U != T) throw std::invalid_argument("without slots the mask is [T, T]");
  if (chunk <= 0 || chunk % kLanes) throw std::invalid_argument("chunk must be a positive multiple of 16");
  const Problem pb{reinterpret_cast<const float*>(q), q_head, q_tok, reinterpret_cast<const void*>(k),
                   reinterpret_cast<const void*>(v), kv_head, kind, H, Hkv, T, D, P, chunk,
                   static_cast<float>(scale), reinterpret_cast<float*>(out), prefix_start};
  py::gil_scoped_release release;
  const Rows rows(reinterpret_cast<const uint8_t*>(mask), T, U, P, prefix_start, reinterpret_cast<const int64_t*>(slots));
  threads = threads > 0 ? threads : 1;
  const bool bf16 = isa == "avx512bf16" && kind == kBF16;  // head dim 16 keeps the fp32 path
  switch (D) {
    case 16: run<1>(pb, rows, threads, avx512, false); break;
    case 32: run<2>(pb, rows, threads, avx512, bf16); break;
    case 64: run<4>(pb, rows, threads, avx512, bf16); break;
    case 128: run<8>(pb, rows, threads, avx512, bf16); break;
    default: throw std::invalid_argument("head dim must be 16, 32, 64 or 128");
  }
}

// Rotary embedding of one step's q and k, and the KV write, in one pass (the lean forward's
// per-layer glue: about twenty torch ops a layer otherwise). qkv [T, (H + 2 Hkv) D] fp32 rows as the
// fused q/k/v projection leaves them; cos, sin [T, D]. q_out [T, H, D] gets the rotated queries;
// the rotated keys and the values go to rows rows[t] (or t) of k/v [Hkv, S, D] (rows contiguous,
// kv-head stride given), rounded to fp16 / bf16 to nearest even as torch's conversion rounds. The rotation is
// torch's (x * cos) + (rotate_half(x) * sin), one IEEE multiply and add per term (no fused
// multiply-add: -ffp-contract=off), so the results are bit-identical to those ops.
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if (std::isnan(x)) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

AVX2_FN uint16_t f16_bits(float x) {
  return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT), 0));
}

void rotate(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * c[i], b = -x[i + half] * s[i];
    out[i] = a + b;
  }
  for (int64_t i = half; i < D; ++i) {
    const float a = x[i] * c[i], b = x[i - half] * s[i];
    out[i] = a + b;
  }
}

void store(const float* x, int64_t D, int kind, void* dst) {
  if (kind == kF32) {
    std::memcpy(dst, x, D * sizeof(float));
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < D; ++i) d[i] = kind == kBF16 ? bf16_bits(x[i]) : f16_bits(x[i]);
  }
}

void rope_store(uintptr_t qkv, uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k, uintptr_t v,
                int64_t kv_head, int kind, int64_t H, int64_t Hkv, int64_t T, int64_t D, uintptr_t rows, int64_t S,
                int threads) {
  if (kind < kF32 || kind > kBF16) throw std::invalid_argument("kind must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (H <= 0 || Hkv <= 0 || T < 0 || D <= 0 || D % 2 || D > 256) throw std::invalid_argument("bad head or token counts");
  const int64_t* row = reinterpret_cast<const int64_t*>(rows);
  for (int64_t t = 0; t < T; ++t)
    if ((row ? row[t] : t) < 0 || (row ? row[t] : t) >= S) throw std::invalid_argument("a row lies outside k/v");
  if (kind == kF16 && !has_avx2()) throw std::runtime_error("fp16 KV needs F16C");
  const float* src = reinterpret_cast<const float*>(qkv);
  const float* cs = reinterpret_cast<const float*>(cos);
  const float* sn = reinterpret_cast<const float*>(sin);
  float* qo = reinterpret_cast<float*>(q_out);
  const int64_t width = (H + 2 * Hkv) * D, bytes = kind == kF32 ? 4 : 2;
  char* kb = reinterpret_cast<char*>(k);
  char* vb = reinterpret_cast<char*>(v);
  py::gil_scoped_release release;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) if (T >= 32)
  for (int64_t t = 0; t < T; ++t) {
    const float *x = src + t * width, *c = cs + t * D, *s = sn + t * D;
    for (int64_t h = 0; h < H; ++h) rotate(x + h * D, c, s, D, qo + (t * H + h) * D);
    const int64_t r = row ? row[t] : t;
    float key[256];
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = (g * kv_head + r * D) * bytes;
      rotate(x + (H + g) * D, c, s, D, key);
      store(key, D, kind, kb + at);
      store(x + (H + Hkv + g) * D, D, kind, vb + at);
    }
  }
}

// RMSNorm of T rows of N: out[t, i] = w[i] * (x[t, i] * (1 / sqrt(mean(x[t]^2) + eps))), in one call
// instead of six torch ops. The mean of squares is summed in 16 interleaved partial sums folded in a
// fixed order, so a row's result depends on that row alone (a row inside a step equals it alone);
// the order differs from torch's reduction, so the output may differ from torch's in the last bit.
void rms_norm(uintptr_t x, uintptr_t w, uintptr_t out, int64_t T, int64_t N, double eps) {
  if (T < 0 || N <= 0) throw std::invalid_argument("bad row counts");
  const float* xs = reinterpret_cast<const float*>(x);
  const float* ws = reinterpret_cast<const float*>(w);
  float* o = reinterpret_cast<float*>(out);
  const float e = static_cast<float>(eps);
  py::gil_scoped_release release;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xs + t * N;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= N; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += row[i + j] * row[i + j];
    for (int j = 0; i < N; ++i, ++j) acc[j] += row[i] * row[i];
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
    const float r = 1.0f / std::sqrt(acc[0] / static_cast<float>(N) + e);
    for (int64_t k = 0; k < N; ++k) o[t * N + k] = ws[k] * (row[k] * r);
  }
}

}  // namespace

PYBIND11_MODULE(_attn, m) {
  m.doc() = "Tree attention over fp32/fp16/bf16 KV for CPU verification steps (AVX-512 (+BF16) or AVX2)";
  m.def("cpu_isas", &cpu_isas, "The instruction sets this CPU can run the kernel with, best first");
  m.def("tree_attention", &tree_attention, py::arg("q"), py::arg("q_head"), py::arg("q_tok"), py::arg("k"),
        py::arg("v"), py::arg("kv_head"), py::arg("kind"), py::arg("H"), py::arg("Hkv"), py::arg("T"), py::arg("D"),
        py::arg("P"), py::arg("mask"), py::arg("scale"), py::arg("out"), py::arg("chunk"), py::arg("threads"),
        py::arg("isa"), py::arg("prefix_start") = 0, py::arg("U") = -1, py::arg("slots") = 0,
        "out[T, H, D] = attention of q over k/v (pointers of tensors laid out as the module doc says)");
  m.def("rope_store", &rope_store, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("q_out"), py::arg("k"),
        py::arg("v"), py::arg("kv_head"), py::arg("kind"), py::arg("H"), py::arg("Hkv"), py::arg("T"), py::arg("D"),
        py::arg("rows"), py::arg("S"), py::arg("threads"),
        "Rotate q and k of a step (torch's rotary, bit for bit) and write k and v to their cache rows");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("out"), py::arg("T"), py::arg("N"), py::arg("eps"),
        "out = w * (x * rsqrt(mean(x^2) + eps)) per row of N");
}
