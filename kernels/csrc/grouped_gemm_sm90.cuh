// Hopper (SM90) grouped GEMM for MoE experts: CUTLASS's ptr-array TMA warp-specialized kernel
// (CUTLASS example 57), bf16 in/out, fp32 accumulate, with the per-expert problem sizes, operand
// pointers and strides built ON THE DEVICE from the int32 cumulative row ends `offs` (so a call
// never waits for the GPU: no .tolist(), no host copy of the routing).
//
// Torch-free on purpose: this header is compiled by nvcc alone (the heavy CUTLASS templates never
// see torch's headers); kernels/csrc/binding.cpp calls the extern "C" launchers below.
//
// The three products of one MoE projection, with x (M, K), w (E, K, N), dy (M, N) all row-major
// and expert e owning rows [offs[e-1], offs[e]):
//   FWD  y_e  = x_e  @ w_e     A = x_e  row-major (m_e x K),   B = w_e   (K x N) row-major
//   DX   dx_e = dy_e @ w_e^T   A = dy_e row-major (m_e x N),   B = w_e^T (N x K) column-major
//   DW   dw_e = x_e^T @ dy_e   A = x_e^T column-major (K x m_e), B = dy_e (m_e x N) row-major
// In DW the reduction length m_e varies per group (TMA zero-fills past it, so m_e needs no
// alignment); an expert with no rows gets problem (0, 0, 0) (no tiles) and its dw_e is zeroed by
// the setup kernel. Only leading dimensions (K, N) must keep 16-byte alignment (multiples of 8).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "moe_gg_registry.h"

namespace moe_gg {

using namespace cute;

enum Kind : int { FWD = 0, DX = 1, DW = 2 };

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Element = cutlass::bfloat16_t;
using Acc = float;
constexpr int Align = 8;  // 16 bytes of bf16

struct Coop {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epi = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Ping {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epi = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

template <Kind K> struct KindLayouts;
template <> struct KindLayouts<FWD> { using A = cutlass::layout::RowMajor;    using B = cutlass::layout::RowMajor; };
template <> struct KindLayouts<DX>  { using A = cutlass::layout::RowMajor;    using B = cutlass::layout::ColumnMajor; };
template <> struct KindLayouts<DW>  { using A = cutlass::layout::ColumnMajor; using B = cutlass::layout::RowMajor; };

template <Kind K, class Tile, class Cluster, class Sched>
struct Gemm {
  using LayoutA = typename KindLayouts<K>::A;
  using LayoutB = typename KindLayouts<K>::B;
  using LayoutD = cutlass::layout::RowMajor;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      Element, LayoutD*, Align, Element, LayoutD*, Align, typename Sched::Epi,
      cutlass::epilogue::fusion::LinearCombination<Element, Acc>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, Align, Element, LayoutB*, Align, Acc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Sched::Kernel>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The per-group argument arrays live in one device buffer, carved at 16-byte boundaries.
template <class G>
struct Meta {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename G::StrideA* sa;
  typename G::StrideB* sb;
  typename G::StrideD* sd;

  static size_t round16(size_t n) { return (n + 15) & ~size_t(15); }
  static size_t bytes(int groups) {
    return round16(sizeof(*shapes) * groups) + 3 * round16(sizeof(void*) * groups) +
           round16(sizeof(*sa) * groups) + round16(sizeof(*sb) * groups) + round16(sizeof(*sd) * groups);
  }
  static Meta carve(void* base, int groups) {
    char* p = static_cast<char*>(base);
    Meta m;
    m.shapes = reinterpret_cast<decltype(m.shapes)>(p); p += round16(sizeof(*m.shapes) * groups);
    m.a = reinterpret_cast<const Element**>(p); p += round16(sizeof(void*) * groups);
    m.b = reinterpret_cast<const Element**>(p); p += round16(sizeof(void*) * groups);
    m.d = reinterpret_cast<Element**>(p); p += round16(sizeof(void*) * groups);
    m.sa = reinterpret_cast<decltype(m.sa)>(p); p += round16(sizeof(*m.sa) * groups);
    m.sb = reinterpret_cast<decltype(m.sb)>(p); p += round16(sizeof(*m.sb) * groups);
    m.sd = reinterpret_cast<decltype(m.sd)>(p);
    return m;
  }
};

// One block per expert: thread 0 writes that expert's problem, pointers and strides; for DW an
// expert without rows instead gets an empty problem and the block zeroes its dw_e.
// a: x (FWD, DW) or dy (DX); b: w (FWD, DX) or dy (DW); d: y, dx or dw.  k, n: the model dims
// of w (E, k, n).
template <Kind K, class G>
__global__ void setup_kernel(Meta<G> m, const int* __restrict__ offs, const Element* a, const Element* b,
                             Element* d, int k, int n) {
  const int e = blockIdx.x;
  const int start = e == 0 ? 0 : offs[e - 1];
  const int rows = offs[e] - start;
  if (K == DW && rows <= 0) {
    // zero dw_e (k * n elements, 16-byte stores; k * n is a multiple of 8)
    uint4* out = reinterpret_cast<uint4*>(d + int64_t(e) * k * n);
    const int64_t vecs = int64_t(k) * n / 8;
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) out[i] = make_uint4(0, 0, 0, 0);
  }
  if (threadIdx.x != 0) return;
  const int64_t s = start;
  int M, N, R;  // the GEMM's own (M, N, K) of this group
  if (K == FWD) {
    M = rows; N = n; R = k;
    m.a[e] = a + s * k; m.b[e] = b + int64_t(e) * k * n; m.d[e] = d + s * n;
  } else if (K == DX) {
    M = rows; N = k; R = n;
    m.a[e] = a + s * n; m.b[e] = b + int64_t(e) * k * n; m.d[e] = d + s * k;
  } else {
    M = rows > 0 ? k : 0; N = rows > 0 ? n : 0; R = rows > 0 ? rows : 0;
    m.a[e] = a + s * k; m.b[e] = b + s * n; m.d[e] = d + int64_t(e) * k * n;
  }
  if (M < 0) M = 0;
  m.shapes[e] = make_shape(M, N, R);
  // packed strides of the logical operands; their leading dims are exactly the model dims
  // (FWD: k, n, n; DX: n, n, k; DW: k, n, n), so packing by the group's (M, N, K) is right
  // except where that group dim is the varying row count, which never is a leading dim here.
  const int lda = K == DX ? n : k;
  if (K == DW) {
    m.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(k, max(R, 1), 1));
    m.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(n, max(R, 1), 1));
    m.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(k, n, 1));
  } else {
    m.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(max(M, 1), lda, 1));
    m.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(N, R, 1));
    m.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(max(M, 1), N, 1));
  }
}

inline int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (!cached[device]) cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device);
  return cached[device];
}

template <class G>
typename G::Op::Arguments make_args(Meta<G> m, int groups, int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  typename G::Op::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  args = typename G::Op::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, m.shapes, nullptr},  // no host copy of the problem sizes: they exist on the device only
      {const_cast<const Element**>(m.a), m.sa, const_cast<const Element**>(m.b), m.sb},
      {fusion, nullptr, m.sd, m.d, m.sd},
      hw};
  return args;
}

// Bytes of the device buffer one call needs (argument arrays + CUTLASS workspace).
template <class G>
size_t buffer_bytes(int groups, int device) {
  Meta<G> m = Meta<G>::carve(nullptr, groups);
  auto args = make_args<G>(m, groups, device);
  return Meta<G>::bytes(groups) + 256 + G::Op::get_workspace_size(args);
}

// 0 on success; a cudaError_t, or 1000 + cutlass::Status on failure.
template <Kind K, class G>
int run(int groups, const int* offs, const void* a, const void* b, void* d, int k, int n, void* buffer,
        size_t buffer_size, cudaStream_t stream, int device) {
  if (groups <= 0) return 0;
  const size_t meta = Meta<G>::bytes(groups);
  Meta<G> m = Meta<G>::carve(buffer, groups);
  setup_kernel<K, G><<<groups, 256, 0, stream>>>(m, offs, static_cast<const Element*>(a),
                                                 static_cast<const Element*>(b), static_cast<Element*>(d), k, n);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return int(err);
  auto args = make_args<G>(m, groups, device);
  char* ws = static_cast<char*>(buffer) + ((meta + 255) & ~size_t(255));
  size_t need = G::Op::get_workspace_size(args);
  if (size_t(ws - static_cast<char*>(buffer)) + need > buffer_size) return 1000 + int(cutlass::Status::kErrorWorkspaceNull);
  typename G::Op op;
  cutlass::Status st = op.initialize(args, ws, stream);
  if (st != cutlass::Status::kSuccess) return 1000 + int(st);
  st = op.run(stream);
  if (st != cutlass::Status::kSuccess) return 1000 + int(st);
  err = cudaGetLastError();
  return err == cudaSuccess ? 0 : int(err);
}

}  // namespace moe_gg

// Registry: each generated translation unit (kernels/cutlass_ext.py writes one per config) registers
// its launchers under "<kind>_<config>" at load time; binding.cpp owns the table and looks them up.
#define MOE_GG_REGISTER(KIND, TILE, CLUSTER, SCHED, NAME)                                                  \
  namespace {                                                                                              \
  using G_ = moe_gg::Gemm<moe_gg::KIND, TILE, CLUSTER, moe_gg::SCHED>;                                     \
  size_t bytes_(int groups, int device) { return moe_gg::buffer_bytes<G_>(groups, device); }               \
  int run_(int groups, const int* offs, const void* a, const void* b, void* d, int k, int n, void* buffer,  \
           size_t buffer_size, cudaStream_t stream, int device) {                                         \
    return moe_gg::run<moe_gg::KIND, G_>(groups, offs, a, b, d, k, n, buffer, buffer_size, stream, device); \
  }                                                                                                        \
  struct Registrar_ {                                                                                      \
    Registrar_() { moe_gg_register(NAME, MoeGGEntry{&bytes_, &run_}); }                                    \
  } registrar_;                                                                                            \
  }
