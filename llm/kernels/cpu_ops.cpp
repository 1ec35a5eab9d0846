// The PyTorch-facing CPU ops a decode step runs besides the GEMVs (bound in cpu_quant.cpp's
// module, see llm/kernels/cpu_quant.py): paged decode attention over the fp32 pool, alone or
// with the step's RoPE and K/V write (kernels in cpu_attention.cpp), and RMSNorm of fp32 rows.
#include "cpu_ops.h"

#include <immintrin.h>

#include <cmath>

#include "cpu_attention.h"

namespace {

inline float sum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

void check_tables(const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                  int64_t S, int64_t num_blocks, int64_t block_size) {
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() &&
              block_tables.dim() == 2 && block_tables.size(0) == S &&
              context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous() &&
              context_lens.numel() == S);
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t need = (lens[s] + block_size - 1) / block_size;
    TORCH_CHECK(need <= max_blocks, "block table narrower than context length");
    for (int64_t b = 0; b < need; ++b)
      TORCH_CHECK(bt[s * max_blocks + b] >= 0 && bt[s * max_blocks + b] < num_blocks,
                  "block table entry outside the pool");
  }
}

void check_pool(const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.scalar_type() == torch::kFloat32 &&
              v_cache.scalar_type() == torch::kFloat32 && k_cache.is_contiguous() &&
              v_cache.is_contiguous());
}

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                     const torch::Tensor& context_lens, double scale) {
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  auto out = torch::empty_like(q);
  userllm::paged_decode_cpu({q.data_ptr<float>(), k_cache.data_ptr<float>(),
                             v_cache.data_ptr<float>(), block_tables.data_ptr<int32_t>(),
                             context_lens.data_ptr<int32_t>(), out.data_ptr<float>(), S, Hq,
                             k_cache.size(2), D, k_cache.size(1), block_tables.size(1),
                             static_cast<float>(scale)});
  return out;
}

}  // namespace

// Paged decode attention from an fp32 pool (cpu_attention.cpp); every block a sequence's length
// reaches is checked against the pool before any is read.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  check_pool(k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous() &&
              k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0);
  check_tables(block_tables, context_lens, q.size(0), k_cache.size(0), k_cache.size(1));
  return attend(q, k_cache, v_cache, block_tables, context_lens, scale);
}

// One decode step of a self-attention layer after its projections: RoPE on q and k, the new
// K/V written to their slots (-1: skipped), then paged_decode over the updated pool. The
// PyTorch path spends ~20 ATen calls on the same (Attention._paged).
torch::Tensor decode_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                          torch::Tensor slot_mapping, torch::Tensor block_tables,
                          torch::Tensor context_lens, double scale) {
  check_pool(k_cache, v_cache);
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  for (const auto* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous());
  TORCH_CHECK(q.dim() == 3 && k.sizes() == v.sizes() && k.dim() == 3 && k.size(0) == S &&
              k.size(1) == Hkv && k.size(2) == D && k_cache.size(3) == D && D % 2 == 0 &&
              Hq % Hkv == 0 && cos.sizes() == sin.sizes() && cos.numel() == S * D);
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == S);
  check_tables(block_tables, context_lens, S, k_cache.size(0), k_cache.size(1));
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  auto q_rot = torch::empty_like(q);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    const float* c = cos.data_ptr<float>() + s * D;
    const float* sn = sin.data_ptr<float>() + s * D;
    userllm::rope(q.data_ptr<float>() + s * Hq * D, c, sn, q_rot.data_ptr<float>() + s * Hq * D,
                  Hq, D);
    if (sm[s] < 0) continue;
    TORCH_CHECK(sm[s] < slots, "slot outside the pool");
    userllm::rope(k.data_ptr<float>() + s * Hkv * D, c, sn, kc + sm[s] * Hkv * D, Hkv, D);
    std::copy_n(v.data_ptr<float>() + s * Hkv * D, Hkv * D, vc + sm[s] * Hkv * D);
  }
  return attend(q_rot, k_cache, v_cache, block_tables, context_lens, scale);
}

// RMSNorm of fp32 rows: x / sqrt(mean(x^2) + eps) * w, the sum of squares in 8 lanes. Why: at a
// decode step's single row, torch's rms_norm cost ~25-60 us per call (61 calls a token).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 &&
              x.is_contiguous() && w.is_contiguous() && x.dim() >= 1 &&
              x.size(-1) == w.numel());
  const int64_t D = w.numel(), rows = D ? x.numel() / D : 0;
  auto out = torch::empty_like(x);
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data_ptr<float>() + r * D;
    float* o = out.data_ptr<float>() + r * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = sum8(acc);
    for (; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (i = 0; i < D; ++i) o[i] = wp[i] * (xr[i] * inv);
  }
  return out;
}

