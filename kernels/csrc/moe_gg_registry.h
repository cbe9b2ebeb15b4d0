// The table that links the generated CUTLASS translation units to the torch binding, without either
// including the other's headers: each unit registers its launchers under "<kind>_<config>".
#pragma once
#include <cstddef>
#include <cuda_runtime.h>

struct MoeGGEntry {
  // bytes of the device scratch buffer one call needs (argument arrays + CUTLASS workspace)
  size_t (*bytes)(int groups, int device);
  // 0 on success, else a cudaError_t or 1000 + cutlass::Status
  int (*run)(int groups, const int* offs, const void* a, const void* b, void* d, int k, int n, void* buffer,
             size_t buffer_size, cudaStream_t stream, int device);
};

extern "C" void moe_gg_register(const char* name, MoeGGEntry entry);
