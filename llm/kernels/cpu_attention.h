// Paged decode attention on CPU (cpu_attention.cpp), called by cpu_quant.cpp's binding.
#pragma once
#include <cstdint>

namespace userllm {

struct DecodeArgs {
  const float* q;             // [S, Hq, D]
  const float* k_cache;       // [num_blocks, block_size, Hkv, D]
  const float* v_cache;
  const int32_t* block_tables;  // [S, max_blocks]
  const int32_t* context_lens;  // [S]
  float* out;                 // [S, Hq, D]
  int64_t S, Hq, Hkv, D, block_size, max_blocks;
  float scale;
};

void paged_decode_cpu(const DecodeArgs& a);
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t heads, int64_t D);

}  // namespace userllm
