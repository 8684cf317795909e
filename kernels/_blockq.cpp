// y = x @ W^T for a few rows of x, with W stored as GGUF-style blocks of 32 input columns:
//   Q4_1: w = d * q + m, q in 0..15 (two per byte)    Q8_0: w = d * q, q in -127..127
// Weights are de-quantized in registers so that each one equals the fp32 value gguf's own
// de-quantization computes (d * q is exact in fp32; Q4_1 then rounds once for + m, here in one
// fused multiply-add). Only the summation order differs from an fp32 GEMM on those weights.
//
// Layout (all contiguous): Q4_1 packed [N, K/32, 16] bytes, byte i of a block = q[i] | q[i + 16] << 4;
// Q8_0 packed [N, K/32, 32] int8; scale and min [N, K/32] fp32 (min unused for Q8_0);
// x [rows, K] fp32; out [rows, N] fp32.

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include <immintrin.h>
#include <omp.h>

namespace py = pybind11;

namespace {

constexpr int kBlock = 32;

struct Q4 {
  static constexpr int kBytes = 16;
  static float weight(const uint8_t* p, int i, float d, float m) {
    const int q = i < 16 ? (p[i] & 0x0F) : (p[i - 16] >> 4);
    return std::fma(d, static_cast<float>(q), m);
  }
  __attribute__((target("avx512f"))) static void wide(const uint8_t* p, float d, float m, __m512* w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512 dd = _mm512_set1_ps(d), mm = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low4))), dd, mm);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4))),
                           dd, mm);
  }
  __attribute__((target("avx2,fma"))) static void narrow(const uint8_t* p, float d, float m, __m256* w) {
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

struct Q8 {
  static constexpr int kBytes = 32;
  static float weight(const uint8_t* p, int i, float d, float) {
    return d * static_cast<float>(reinterpret_cast<const int8_t*>(p)[i]);
  }
  __attribute__((target("avx512f"))) static void wide(const uint8_t* p, float d, float, __m512* w) {
    const __m512 dd = _mm512_set1_ps(d);
    for (int h = 0; h < 2; ++h) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h));
      w[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), dd);
    }
  }
  __attribute__((target("avx2,fma"))) static void narrow(const uint8_t* p, float d, float, __m256* w) {
    const __m256 dd = _mm256_set1_ps(d);
    for (int h = 0; h < 4; ++h) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h));
      w[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), dd);
    }
  }
};

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
        const float d = w.scale[n * nb + b], m = w.min ? w.min[n * nb + b] : 0.0f;
        for (int i = 0; i < kBlock; ++i) acc += x[r * w.K + b * kBlock + i] * F::weight(p, i, d, m);
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
      F::wide(w.packed + (n * nb + b) * F::kBytes, w.scale[n * nb + b], w.min ? w.min[n * nb + b] : 0.0f, wv);
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
      F::narrow(w.packed + (n * nb + b) * F::kBytes, w.scale[n * nb + b], w.min ? w.min[n * nb + b] : 0.0f, wv);
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

void block_linear(int bits, uintptr_t x_ptr, int64_t rows, int64_t K, uintptr_t packed_ptr, uintptr_t scale_ptr,
                  uintptr_t min_ptr, int64_t N, uintptr_t out_ptr, int threads) {
  if (K % kBlock != 0) throw std::invalid_argument("K must be a multiple of 32");
  if (bits != 4 && bits != 8) throw std::invalid_argument("bits must be 4 (Q4_1) or 8 (Q8_0)");
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  const Weights w{reinterpret_cast<const uint8_t*>(packed_ptr), reinterpret_cast<const float*>(scale_ptr),
                  reinterpret_cast<const float*>(min_ptr), K, N};
  auto* out = reinterpret_cast<float*>(out_ptr);
  const int isa = avx512_available() ? 2 : avx2_available() ? 1 : 0;
  py::gil_scoped_release release;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunk = (N + nt - 1) / nt;
    const int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
    if (n0 < n1) {
      if (bits == 4) {
        columns<Q4>(x, rows, w, n0, n1, out, isa);
      } else {
        columns<Q8>(x, rows, w, n0, n1, out, isa);
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(_blockq, m) {
  m.doc() = "GGUF-block (Q4_1, Q8_0) weight x fp32 activation matmul for a few rows: AVX-512, AVX2/FMA or scalar";
  m.def("avx2_available", &avx2_available, "True when this CPU has AVX2 and FMA (the fast path)");
  m.def("avx512_available", &avx512_available, "True when this CPU has AVX-512F (16 weights per instruction)");
  m.def("block_linear", &block_linear, py::arg("bits"), py::arg("x"), py::arg("rows"), py::arg("K"),
        py::arg("packed"), py::arg("scale"), py::arg("min"), py::arg("N"), py::arg("out"), py::arg("threads"),
        "out[rows, N] = x[rows, K] @ dequant(W)^T; arguments are data pointers of contiguous tensors (min may be 0)");
}
