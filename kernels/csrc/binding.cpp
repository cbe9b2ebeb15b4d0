// Torch binding of the SM90 grouped GEMM (kernels/csrc/grouped_gemm_sm90.cuh): checks the tensors,
// allocates the per-call scratch buffer from torch's caching allocator and launches on torch's
// current stream. No host synchronisation: the routing offsets are read only by the device.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <string>
#include <vector>

#include "moe_gg_registry.h"

static std::map<std::string, MoeGGEntry>& table() {
  static std::map<std::string, MoeGGEntry> t;  // function-local: safe against static-init order
  return t;
}

extern "C" void moe_gg_register(const char* name, MoeGGEntry entry) { table()[name] = entry; }

static std::vector<std::string> configs() {
  std::vector<std::string> out;
  for (auto const& kv : table()) out.push_back(kv.first);
  return out;
}

static void check_operand(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, what, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, what, " must be 16-byte aligned");
}

// d <- the grouped product named by `name` ("fwd_*", "dx_*" or "dw_*"); k, n are the dims of w (E, k, n).
static void run(const std::string& name, const torch::Tensor& offs, const torch::Tensor& a, const torch::Tensor& b,
                const torch::Tensor& d, int64_t k, int64_t n) {
  auto it = table().find(name);
  TORCH_CHECK(it != table().end(), "grouped GEMM config ", name, " is not compiled in");
  TORCH_CHECK(offs.is_cuda() && offs.scalar_type() == torch::kInt32 && offs.dim() == 1 && offs.is_contiguous(),
              "offs must be a contiguous 1-D int32 CUDA tensor");
  check_operand(a, "a");
  check_operand(b, "b");
  check_operand(d, "d");
  TORCH_CHECK(k % 8 == 0 && n % 8 == 0, "k and n must be multiples of 8 (16-byte rows), got k=", k, " n=", n);
  const int groups = static_cast<int>(offs.size(0));
  if (groups == 0 || d.numel() == 0) return;
  c10::cuda::CUDAGuard guard(d.device());
  const int device = d.device().index();
  const size_t bytes = it->second.bytes(groups, device);
  auto buffer = torch::empty({static_cast<int64_t>(bytes)}, d.options().dtype(torch::kUInt8));
  int rc = it->second.run(groups, offs.data_ptr<int>(), a.data_ptr(), b.data_ptr(), d.data_ptr(),
                          static_cast<int>(k), static_cast<int>(n), buffer.data_ptr(), bytes,
                          at::cuda::getCurrentCUDAStream(device).stream(), device);
  if (rc >= 1000) TORCH_CHECK(false, "CUTLASS grouped GEMM ", name, " failed: cutlass::Status ", rc - 1000);
  TORCH_CHECK(rc == 0, "CUTLASS grouped GEMM ", name, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "grouped GEMM d = op(a, b) per expert (see grouped_gemm_sm90.cuh)");
  m.def("configs", &configs, "names of the compiled <kind>_<config> launchers");
}
