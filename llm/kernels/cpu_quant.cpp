// CPU (AVX2) int4 / int8 weight-only GEMV-GEMM for QuantLinear (llm/layers/quant.py).
// Activations are quantized to int8 per 32-block (scale = max|x| / 127, round half to even),
// as llama.cpp does for its Q4/Q8 dot products, so a block's dot product is one
// _mm256_maddubs_epi16 over 32 codes. Weights, per 32-block of row n:
//   int4: 16 bytes, low nibble = element j, high nibble = element j + 16; w = d * q + c
//   int8: 32 bytes;                                                     w = d * q
// d (and c) are fp32 per group of `gs` (a multiple of 32) inputs. Output fp32 [M, N].
// Rows are interleaved in groups of RB = 4: codes [N/4][K/32][4][block bytes] and scales
// [N/4][K/gs][4], so a GEMV reads two sequential streams (one 64-byte line holds a block of
// four int4 rows). Rows of 288 bytes read side by side ran at under half the bandwidth.
#include <torch/extension.h>
#include <immintrin.h>
#include "cpu_ops.h"
#include "cpu_quant_avx512.h"
#include <cmath>
#include <vector>

namespace {

constexpr int64_t RB = 4;  // output rows per inner loop: independent accumulators

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < B; ++b) {
      const float* p = x + m * K + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(p[i]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* o = xq + (m * B + b) * 32;
      int s = 0;
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(p[i] * inv));
        o[i] = static_cast<int8_t>(v);
        s += v;
      }
      dx[m * B + b] = d;
      sx[m * B + b] = d * static_cast<float>(s);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

inline __m256i unpack_q4(const uint8_t* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                          _mm256_set1_epi8(0x0F));
}

// 32 unsigned x signed byte products summed to 8 floats.
inline __m256 dot_u8(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(
      _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

inline __m256 dot_q4(const uint8_t* w, const int8_t* x) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                     _mm256_set1_epi8(0x0F));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_cvtepi32_ps(
      _mm256_madd_epi16(_mm256_maddubs_epi16(v, xv), _mm256_set1_epi16(1)));
}

inline __m256 dot_q8(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  // maddubs multiplies unsigned by signed: |w| times x carrying w's sign.
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// Activations rounded to int8 blocks once, for every weight that reads them.
struct Activations {
  std::vector<int8_t> xq;
  std::vector<float> dx, sx;
  int64_t M, K;
};

Activations quantize_activations(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() &&
              x.size(1) % 32 == 0);
  const int64_t M = x.size(0), K = x.size(1), B = K / 32;
  Activations a{std::vector<int8_t>(M * K), std::vector<float>(M * B), std::vector<float>(M * B), M, K};
#ifdef USERLLM_AVX512_VNNI
  userllm::quantize_rows_avx512(x.data_ptr<float>(), M, K, a.xq.data(), a.dx.data(), a.sx.data());
#else
  quantize_rows(x.data_ptr<float>(), M, K, a.xq.data(), a.dx.data(), a.sx.data());
#endif
  return a;
}

template <int BITS>
torch::Tensor quant_mm(const Activations& act, const torch::Tensor& q, const torch::Tensor& d,
                       const torch::Tensor& c, int64_t gs) {
  TORCH_CHECK(q.is_contiguous() && d.is_contiguous() && d.scalar_type() == torch::kFloat32);
  TORCH_CHECK(gs > 0 && (BITS == 8 || (c.is_contiguous() && c.sizes() == d.sizes() &&
                                       c.scalar_type() == torch::kFloat32)));
  const int64_t M = act.M, K = act.K, N = d.size(0) * RB, B = K / 32, G = K / gs;
  const int64_t per = gs / 32, row_bytes = BITS == 4 ? K / 2 : K, block_bytes = BITS == 4 ? 16 : 32;
  TORCH_CHECK(K % gs == 0 && gs % 32 == 0 && N % RB == 0 && q.numel() == N * row_bytes &&
              d.numel() == N * G);
  auto out = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  const int8_t* xqp = act.xq.data();
  const float* dxp = act.dx.data();
  const float* sxp = act.sx.data();
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* dp = d.data_ptr<float>();
  const float* cp = BITS == 4 ? c.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
#ifdef USERLLM_AVX512_VNNI
  userllm::quant_mm_avx512({xqp, dxp, sxp, qp, dp, cp, op, M, N, K, gs}, BITS);
#else
  // Row groups outer, rows of x inner: a group's weights are read from memory once and stay
  // in L1 for every activation row.
  for (int64_t rg = 0; rg < N / RB; ++rg) {
    const uint8_t* wg = qp + rg * B * RB * block_bytes;
    const float* dg = dp + rg * G * RB;
    const float* cg = BITS == 4 ? cp + rg * G * RB : nullptr;
    int64_t m = 0;
    // Two activation rows at a time: each weight block is unpacked once for both.
    for (; m + 2 <= M; m += 2) {
      const int8_t* xr0 = xqp + m * K;
      const int8_t* xr1 = xr0 + K;
      const float* dx0 = dxp + m * B;
      const float* dx1 = dx0 + B;
      const float* sx0 = sxp + m * B;
      const float* sx1 = sx0 + B;
      __m256 acc0[RB], acc1[RB];
      __m128 accs0 = _mm_setzero_ps(), accs1 = _mm_setzero_ps();
      for (int r = 0; r < RB; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
      // g = b / per kept by counting: a 64-bit division per block cost more than the block.
      for (int64_t b = 0, g = 0, j = 0; b < B; ++b, j = j + 1 == per ? 0 : j + 1, g += j == 0) {
        const uint8_t* w = wg + b * RB * block_bytes;
        const __m128 d4 = _mm_loadu_ps(dg + g * RB);
        alignas(16) float ds0[RB], ds1[RB];
        _mm_store_ps(ds0, _mm_mul_ps(d4, _mm_set1_ps(dx0[b])));
        _mm_store_ps(ds1, _mm_mul_ps(d4, _mm_set1_ps(dx1[b])));
        const __m256i xv0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr0 + b * 32));
        const __m256i xv1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr1 + b * 32));
        for (int r = 0; r < RB; ++r) {
          __m256 p0, p1;
          if constexpr (BITS == 4) {
            const __m256i v = unpack_q4(w + r * block_bytes);
            p0 = dot_u8(v, xv0);
            p1 = dot_u8(v, xv1);
          } else {
            const __m256i wv = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(w + r * block_bytes));
            const __m256i aw = _mm256_sign_epi8(wv, wv);
            p0 = dot_u8(aw, _mm256_sign_epi8(xv0, wv));
            p1 = dot_u8(aw, _mm256_sign_epi8(xv1, wv));
          }
          acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(ds0[r]), p0, acc0[r]);
          acc1[r] = _mm256_fmadd_ps(_mm256_set1_ps(ds1[r]), p1, acc1[r]);
        }
        if constexpr (BITS == 4) {
          const __m128 c4 = _mm_loadu_ps(cg + g * RB);
          accs0 = _mm_fmadd_ps(c4, _mm_set1_ps(sx0[b]), accs0);
          accs1 = _mm_fmadd_ps(c4, _mm_set1_ps(sx1[b]), accs1);
        }
      }
      alignas(16) float cs0[RB], cs1[RB];
      _mm_store_ps(cs0, accs0);
      _mm_store_ps(cs1, accs1);
      for (int r = 0; r < RB; ++r) {
        op[m * N + rg * RB + r] = hsum(acc0[r]) + cs0[r];
        op[(m + 1) * N + rg * RB + r] = hsum(acc1[r]) + cs1[r];
      }
    }
    for (; m < M; ++m) {
      const int8_t* xr = xqp + m * K;
      const float* dxr = dxp + m * B;
      const float* sxr = sxp + m * B;
      __m256 acc[RB];
      __m128 accs = _mm_setzero_ps();
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
      // g = b / per kept by counting: a 64-bit division per block cost more than the block.
      for (int64_t b = 0, g = 0, j = 0; b < B; ++b, j = j + 1 == per ? 0 : j + 1, g += j == 0) {
        const uint8_t* w = wg + b * RB * block_bytes;
        const __m128 d4 = _mm_mul_ps(_mm_loadu_ps(dg + g * RB), _mm_set1_ps(dxr[b]));
        alignas(16) float ds[RB];
        _mm_store_ps(ds, d4);
        for (int r = 0; r < RB; ++r) {
          __m256 p;
          if constexpr (BITS == 4) {
            p = dot_q4(w + r * block_bytes, xr + b * 32);
          } else {
            p = dot_q8(reinterpret_cast<const int8_t*>(w + r * block_bytes), xr + b * 32);
          }
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ds[r]), p, acc[r]);
        }
        if constexpr (BITS == 4) {
          accs = _mm_fmadd_ps(_mm_loadu_ps(cg + g * RB), _mm_set1_ps(sxr[b]), accs);
        }
      }
      alignas(16) float cs[RB];
      _mm_store_ps(cs, accs);
      for (int r = 0; r < RB; ++r) op[m * N + rg * RB + r] = hsum(acc[r]) + cs[r];
    }
  }
#endif
  return out;
}

}  // namespace

// W [N, K] fp32 into `out` (a prefill chunk runs fp32 GEMM on it; see QuantLinear). Built
// with -ffp-contract=off: scale * q + off rounds twice, exactly as the PyTorch reference.
void dequantize(torch::Tensor out, torch::Tensor q, torch::Tensor d,
                c10::optional<torch::Tensor> c, int64_t gs, int64_t bits) {
  const int64_t N = out.size(0), K = out.size(1), B = K / 32, G = K / gs, per = gs / 32;
  const int64_t block_bytes = bits == 4 ? 16 : 32;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && N % RB == 0);
  TORCH_CHECK(q.numel() == N * B * block_bytes && d.numel() == N * G);
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* dp = d.data_ptr<float>();
  const float* cp = c.has_value() ? c->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  for (int64_t rg = 0; rg < N / RB; ++rg) {
    for (int64_t b = 0, g = 0, j = 0; b < B; ++b, j = j + 1 == per ? 0 : j + 1, g += j == 0) {
      for (int r = 0; r < RB; ++r) {
        const uint8_t* w = qp + ((rg * B + b) * RB + r) * block_bytes;
        const __m256 scale = _mm256_set1_ps(dp[(rg * G + g) * RB + r]);
        const __m256 off = _mm256_set1_ps(cp ? cp[(rg * G + g) * RB + r] : 0.f);
        float* o = op + (rg * RB + r) * K + b * 32;
        // Eight codes at a time to fp32: scale * q (+ off), two roundings as in PyTorch.
        auto put = [&](float* dst, __m128i eight_codes, bool is_signed) {
          const __m256i q32 = is_signed ? _mm256_cvtepi8_epi32(eight_codes)
                                        : _mm256_cvtepu8_epi32(eight_codes);
          __m256 v = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q32));
          _mm256_storeu_ps(dst, bits == 4 ? _mm256_add_ps(v, off) : v);
        };
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
        if (bits == 4) {
          const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
          put(o, lo, false);
          put(o + 8, _mm_srli_si128(lo, 8), false);
          put(o + 16, hi, false);
          put(o + 24, _mm_srli_si128(hi, 8), false);
        } else {
          const __m128i raw_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16));
          put(o, raw, true);
          put(o + 8, _mm_srli_si128(raw, 8), true);
          put(o + 16, raw_hi, true);
          put(o + 24, _mm_srli_si128(raw_hi, 8), true);
        }
      }
    }
  }
}

// x [M, K] fp32 -> the values the kernel multiplies: int8 codes per 32-block times their
// scale, in fp32 (QuantLinear's de-quantized-GEMM path for prefill chunks). Bit-identical to
// llm.layers.quant.round_activations, in one pass instead of six ATen calls.
torch::Tensor round_activations(torch::Tensor x) {
  const Activations act = quantize_activations(x);
  auto out = torch::empty_like(x);
  float* o = out.data_ptr<float>();
  const int64_t n = act.M * act.K;
  for (int64_t i = 0; i < n; i += 32) {
    const __m256 d = _mm256_set1_ps(act.dx[i / 32]);
    for (int64_t k = 0; k < 32; k += 8) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(act.xq.data() + i + k));
      _mm256_storeu_ps(o + i + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), d));
    }
  }
  return out;
}

torch::Tensor q4_mm(torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor c,
                    int64_t gs) {
  return quant_mm<4>(quantize_activations(x), q, d, c, gs);
}

torch::Tensor q8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor d, int64_t gs) {
  return quant_mm<8>(quantize_activations(x), q, d, d, gs);
}

// Several weights reading the same x (q/k/v, gate/up): x is rounded once and one call from
// Python replaces several. c[i] given: int4 with offsets; absent: int8.
std::vector<torch::Tensor> quant_mm_many(torch::Tensor x, std::vector<torch::Tensor> q,
                                         std::vector<torch::Tensor> d,
                                         std::vector<c10::optional<torch::Tensor>> c,
                                         std::vector<int64_t> gs) {
  TORCH_CHECK(q.size() == d.size() && q.size() == c.size() && q.size() == gs.size());
  const Activations act = quantize_activations(x);
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < q.size(); ++i)
    out.push_back(c[i].has_value() ? quant_mm<4>(act, q[i], d[i], *c[i], gs[i])
                                   : quant_mm<8>(act, q[i], d[i], d[i], gs[i]));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows");
  m.def("paged_decode", &paged_decode, "paged decode attention from an fp32 pool");
  m.def("decode_step", &decode_step, "RoPE, K/V write and paged decode attention");
#ifdef USERLLM_AVX512_VNNI
  m.attr("isa") = "avx512_vnni";
#else
  m.attr("isa") = "avx2";
#endif
  m.def("q4_mm", &q4_mm, "int4 weight-only matmul (int8 activations per 32-block)");
  m.def("q8_mm", &q8_mm, "int8 weight-only matmul (int8 activations per 32-block)");
  m.def("round_activations", &round_activations, "fp32 rows rounded to int8 blocks, as fp32");
  m.def("quant_mm_many", &quant_mm_many, "several int4/int8 matmuls of one activation");
  m.def("dequantize", &dequantize, "codes -> fp32 weights");
}
