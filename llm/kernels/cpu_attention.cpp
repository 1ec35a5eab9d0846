// Paged decode attention on CPU, read straight from the KV pool (fp32): one query token per
// sequence over its first context_lens[s] cached tokens. Built into the cpu_quant extension
// (cpu_quant.py) and called by llm/kernels/ops.py for small decode steps.
//
// Why: the PyTorch path gathers each sequence's pages into a contiguous copy, zeroes the padding,
// then runs a masked SDPA: ~20 ATen calls per layer, which at batch 1 cost more than the
// arithmetic (a SmolLM2 decode step spent ~8 ms of its ~50 in them, 30 layers). Here a GQA
// group's query heads share every K/V row they read, and nothing is copied.
//
// Per (sequence, kv head): scores for every key, a max-subtracted softmax, then the weighted
// sum of V rows, in fp32; a sequence's result does not depend on the others in the step.
#include "cpu_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace userllm {

namespace {

// AVX2 (the extension's baseline); head_dim's tail past a multiple of 8 runs scalar.
inline float dot(const float* a, const float* b, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= d; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(s0, s1)),
                        _mm256_extractf128_ps(_mm256_add_ps(s0, s1), 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  float r = _mm_cvtss_f32(h);
  for (; i < d; ++i) r += a[i] * b[i];
  return r;
}

inline void axpy(float p, const float* v, float* o, int64_t d) {  // o += p * v
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
  for (; i < d; ++i) o[i] += p * v[i];
}

}  // namespace

// HF's rotate-half RoPE, term for term as RotaryEmbedding.apply computes it (x * cos +
// rotate_half(x) * sin, no fused multiply-add: the extension builds with -ffp-contract=off),
// so the result is bit-identical to the PyTorch layer.
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xi = x + h * D;
    float* o = out + h * D;
    for (int64_t i = 0; i < half; ++i) o[i] = xi[i] * cos[i] + (-xi[i + half]) * sin[i];
    for (int64_t i = half; i < D; ++i) o[i] = xi[i] * cos[i] + xi[i - half] * sin[i];
  }
}

void paged_decode_cpu(const DecodeArgs& a) {
  const int64_t group = a.Hq / a.Hkv, D = a.D;
  std::vector<float> scores;
  std::vector<float> acc(group * D), inv_sum(group);
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t len = a.context_lens[s];
    const int32_t* table = a.block_tables + s * a.max_blocks;
    float* out = a.out + s * a.Hq * D;
    if (len <= 0) {
      std::fill(out, out + a.Hq * D, 0.f);
      continue;
    }
    scores.resize(group * len);
    for (int64_t h = 0; h < a.Hkv; ++h) {
      const float* q = a.q + (s * a.Hq + h * group) * D;
      // Scores: each K row is read once for the whole query group.
      for (int64_t t0 = 0, blk = 0; t0 < len; t0 += a.block_size, ++blk) {
        const int64_t n = std::min(a.block_size, len - t0);
        const float* kb = a.k_cache + (static_cast<int64_t>(table[blk]) * a.block_size * a.Hkv + h) * D;
        for (int64_t j = 0; j < n; ++j) {
          const float* k = kb + j * a.Hkv * D;
          for (int64_t g = 0; g < group; ++g) scores[g * len + t0 + j] = dot(q + g * D, k, D) * a.scale;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * len;
        const float mx = *std::max_element(sc, sc + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        inv_sum[g] = 1.f / sum;
      }
      for (int64_t t0 = 0, blk = 0; t0 < len; t0 += a.block_size, ++blk) {
        const int64_t n = std::min(a.block_size, len - t0);
        const float* vb = a.v_cache + (static_cast<int64_t>(table[blk]) * a.block_size * a.Hkv + h) * D;
        for (int64_t j = 0; j < n; ++j) {
          const float* v = vb + j * a.Hkv * D;
          for (int64_t g = 0; g < group; ++g) {
            axpy(scores[g * len + t0 + j], v, acc.data() + g * D, D);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < D; ++i) out[(h * group + g) * D + i] = acc[g * D + i] * inv_sum[g];
    }
  }
}

}  // namespace userllm
