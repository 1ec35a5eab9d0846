// AVX-512 VNNI form of cpu_quant.cpp's int4 / int8 GEMV-GEMM (same layouts, same numbers up to
// fp32 summation order). Compiled only when the build targets VNNI (cpu_quant.py checks the CPU).
//
// Why: on a VNNI Xeon the AVX2 kernel ran ~11 cycles per 32-weight row block (unpack, two
// multiply-adds, a convert and an FMA per row), about 5 GB/s: compute-bound. Here one 64-byte
// load holds a block of all four interleaved int4 rows, two vpdpbusd give the four rows' partial
// sums in one register, and a row group costs ~14 instructions per block for 128 products.
//
// int8 weights are signed and vpdpbusd multiplies unsigned by signed, so the activation codes
// are offset by 128: sum((x + 128) w) - 128 sum(w), the second sum one more vpdpbusd.
#ifdef USERLLM_AVX512_VNNI
#include "cpu_quant_avx512.h"

#include <immintrin.h>
#include <cmath>

namespace userllm {

namespace {

constexpr int64_t RB = 4;  // interleaved rows per group (QuantLinear's ROW_GROUP)
constexpr int64_t PREFETCH = 32;  // blocks ahead (2 KiB of int4 codes; 4-64 measured, 32 best)

// Row r's four floats sit in 128-bit lane r (int4) or in the 256-bit half (int8, 8 floats):
// spread a group's four scales to those lanes.
inline __m512 spread4(const float* s) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s)));
}

inline __m512 spread2(const float* s) {  // rows s[0], s[1] over 8 lanes each
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s)));
}

inline void lane_sums4(__m512 v, float* out) {  // the four 128-bit lanes' sums
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int r = 0; r < 4; ++r) out[r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
}

inline void half_sums(__m512 v, float* out) {  // the two 256-bit halves' sums
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int r = 0; r < 2; ++r) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += t[8 * r + i];
    out[r] = s;
  }
}

// MB activation rows against NG consecutive groups of four int4 rows: every weight block is
// unpacked once for all MB rows, and NG > 1 gives a single row independent chains to overlap
// (at batch 1 one group's loop ran latency-bound).
template <int MB, int NG>
void q4_group(const QuantArgs& a, int64_t m0, int64_t rg) {
  const int64_t B = a.K / 32, G = a.K / a.gs, per = a.gs / 32;
  const uint8_t* wg = a.q + rg * B * RB * 16;
  const float* dg = a.d + rg * G * RB;
  const float* cg = a.c + rg * G * RB;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[NG][MB];
  __m128 accs[NG][MB];
  for (int n = 0; n < NG; ++n)
    for (int i = 0; i < MB; ++i) {
      acc[n][i] = _mm512_setzero_ps();
      accs[n][i] = _mm_setzero_ps();
    }
  // One loop over blocks; a group's scales are loaded at its first block (g = b / per kept by
  // counting: a 64-bit division per block cost more than the block, and a nested group loop
  // spilled the row pointers when a group is one block).
  __m512 dw[NG];
  __m128 cw[NG];
  for (int64_t b = 0, g = 0, j = 0; b < B; ++b) {
    if (j == 0) {
      for (int n = 0; n < NG; ++n) {
        const int64_t at = (n * G + g) * RB;
        _mm_prefetch(reinterpret_cast<const char*>(dg + at + PREFETCH * RB), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(cg + at + PREFETCH * RB), _MM_HINT_T0);
        dw[n] = spread4(dg + at);
        cw[n] = _mm_loadu_ps(cg + at);
      }
    }
    if (++j == per) {
      j = 0;
      ++g;
    }
    __m512i lo[NG], hi[NG];
    for (int n = 0; n < NG; ++n) {
      const uint8_t* w = wg + (n * B + b) * RB * 16;
      // Single-core DRAM streams stall on the hardware prefetcher's ramp: ask ahead.
      _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * RB * 16), _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(w);
      lo[n] = _mm512_and_si512(raw, low4);                       // inputs 0..15
      hi[n] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);  // inputs 16..31
    }
    for (int i = 0; i < MB; ++i) {
      const int8_t* x = a.xq + (m0 + i) * a.K + b * 32;
      const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
      const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
      const __m512 dx = _mm512_set1_ps(a.dx[(m0 + i) * B + b]);
      const __m128 sx = _mm_set1_ps(a.sx[(m0 + i) * B + b]);
      for (int n = 0; n < NG; ++n) {
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[n], xlo);
        s = _mm512_dpbusd_epi32(s, hi[n], xhi);
        acc[n][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[n], dx), acc[n][i]);
        accs[n][i] = _mm_fmadd_ps(cw[n], sx, accs[n][i]);
      }
    }
  }
  for (int n = 0; n < NG; ++n)
    for (int i = 0; i < MB; ++i) {
      alignas(16) float sums[4], offs[4];
      lane_sums4(acc[n][i], sums);
      _mm_store_ps(offs, accs[n][i]);
      float* o = a.out + (m0 + i) * a.N + (rg + n) * RB;
      for (int r = 0; r < RB; ++r) o[r] = sums[r] + offs[r];
    }
}

template <int MB, int NG>
void q8_group(const QuantArgs& a, int64_t m0, int64_t rg) {  // as q4_group, for int8 codes
  const int64_t B = a.K / 32, G = a.K / a.gs, per = a.gs / 32;
  const uint8_t* wg = a.q + rg * B * RB * 32;
  const float* dg = a.d + rg * G * RB;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 as unsigned bytes
  __m512 acc01[NG][MB], acc23[NG][MB];
  for (int n = 0; n < NG; ++n)
    for (int i = 0; i < MB; ++i) acc01[n][i] = acc23[n][i] = _mm512_setzero_ps();
  __m512 d01[NG], d23[NG];
  for (int64_t b = 0, g = 0, j = 0; b < B; ++b) {
    if (j == 0) {
      for (int n = 0; n < NG; ++n) {
        const int64_t at = (n * G + g) * RB;
        _mm_prefetch(reinterpret_cast<const char*>(dg + at + PREFETCH * RB), _MM_HINT_T0);
        d01[n] = spread2(dg + at);
        d23[n] = spread2(dg + at + 2);
      }
    }
    if (++j == per) {
      j = 0;
      ++g;
    }
    __m512i w01[NG], w23[NG], c01[NG], c23[NG];
    for (int n = 0; n < NG; ++n) {
      const uint8_t* w = wg + (n * B + b) * RB * 32;
      const uint8_t* ahead = w + (PREFETCH / 2) * RB * 32;  // the same 2 KiB ahead
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T0);
      w01[n] = _mm512_loadu_si512(w);       // rows 0, 1
      w23[n] = _mm512_loadu_si512(w + 64);  // rows 2, 3
      // 128 * sum(w) per 4 inputs, subtracted from every activation row's sums below.
      c01[n] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, w01[n]);
      c23[n] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, w23[n]);
    }
    for (int i = 0; i < MB; ++i) {
      const int8_t* x = a.xq + (m0 + i) * a.K + b * 32;
      const __m512i xu = _mm512_xor_si512(  // x + 128 as unsigned bytes
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), offset);
      const __m512 dx = _mm512_set1_ps(a.dx[(m0 + i) * B + b]);
      for (int n = 0; n < NG; ++n) {
        const __m512i s01 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, w01[n]), c01[n]);
        const __m512i s23 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, w23[n]), c23[n]);
        acc01[n][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s01), _mm512_mul_ps(d01[n], dx), acc01[n][i]);
        acc23[n][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s23), _mm512_mul_ps(d23[n], dx), acc23[n][i]);
      }
    }
  }
  for (int n = 0; n < NG; ++n)
    for (int i = 0; i < MB; ++i) {
      float* o = a.out + (m0 + i) * a.N + (rg + n) * RB;
      half_sums(acc01[n][i], o);
      half_sums(acc23[n][i], o + 2);
    }
}

template <int BITS, int MB, int NG>
void rows_of_groups(const QuantArgs& a, int64_t m0, int64_t rg) {
  if constexpr (BITS == 4) q4_group<MB, NG>(a, m0, rg); else q8_group<MB, NG>(a, m0, rg);
}

template <int BITS, int NG>
void groups(const QuantArgs& a, int64_t rg) {  // every activation row: 4 at a time, then the tail
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) rows_of_groups<BITS, 4, NG>(a, m, rg);
  switch (a.M - m) {
    case 3: rows_of_groups<BITS, 3, NG>(a, m, rg); break;
    case 2: rows_of_groups<BITS, 2, NG>(a, m, rg); break;
    case 1: rows_of_groups<BITS, 1, NG>(a, m, rg); break;
    default: break;
  }
}

template <int BITS>
void quant_mm(const QuantArgs& a) {
  // Row groups outer: their weights stay in L1 while every activation row passes over them.
  // Two groups at a time: independent chains (one group's loop ran latency-bound, ~2x slower).
  int64_t rg = 0;
  for (; rg + 2 <= a.N / RB; rg += 2) groups<BITS, 2>(a, rg);
  for (; rg < a.N / RB; ++rg) groups<BITS, 1>(a, rg);
}

}  // namespace

// x [M, K] fp32 -> int8 codes per 32-block (scale max|x| / 127, round half to even: the
// same numbers as the scalar loop in cpu_quant.cpp), scales dx and dx * sum(codes).
void quantize_rows_avx512(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < B; ++b) {
      const float* p = x + m * K + b * 32;
      const __m512 v0 = _mm512_loadu_ps(p), v1 = _mm512_loadu_ps(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));  // MXCSR: nearest even
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
      int8_t* o = xq + (m * B + b) * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm512_cvtepi32_epi8(i1));
      dx[m * B + b] = d;
      sx[m * B + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
    }
  }
}

void quant_mm_avx512(const QuantArgs& a, int bits) {
  if (bits == 4) quant_mm<4>(a); else quant_mm<8>(a);
}

}  // namespace userllm
#endif
