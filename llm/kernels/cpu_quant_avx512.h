// The AVX-512 VNNI kernel's entry points (cpu_quant_avx512.cpp), called by cpu_quant.cpp.
#pragma once
#include <cstdint>

namespace userllm {

struct QuantArgs {
  const int8_t* xq;  // [M, K] activation codes
  const float* dx;   // [M, K/32] activation block scales
  const float* sx;   // [M, K/32] scale * sum(codes)
  const uint8_t* q;  // weight codes, row groups of 4 interleaved per block
  const float* d;    // [N/4, K/gs, 4] weight scales
  const float* c;    // [N/4, K/gs, 4] int4 offsets (unused for int8)
  float* out;        // [M, N]
  int64_t M, N, K, gs;
};

void quantize_rows_avx512(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx);
void quant_mm_avx512(const QuantArgs& a, int bits);

}  // namespace userllm
