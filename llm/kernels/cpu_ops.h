// cpu_ops.cpp's entry points, registered by cpu_quant.cpp's module.
#pragma once
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor decode_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                          torch::Tensor slot_mapping, torch::Tensor block_tables,
                          torch::Tensor context_lens, double scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
