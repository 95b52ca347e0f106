// Rotary embedding CPU kernel, compiled once per ISA (see cpu_isa.h). One pass over the rows of q and
// k together (one parallel region, split by rows), cos/sin read through their broadcast strides.
//
//   rotate-half, pairs (x1, x2) = (x[i], x[i + R/2]):
//     forward    o1 = x1 c1 - x2 s1      o2 = x2 c2 + x1 s2
//     transpose  o1 = x1 c1 + x2 s2      o2 = x2 c2 - x1 s1
//   interleaved, pairs (xe, xo) = (x[2i], x[2i + 1]), with swap() exchanging the members of each pair:
//     forward    o = x c + swap(x) s * (-1, +1, ...)
//     transpose  o = x c - swap(x s) * (-1, +1, ...)
// (c1, c2 and s1, s2: the cos/sin entries at the same positions; for RoPE's cos/sin they are equal and
// the transpose is the rotation by -sin.) bf16/fp16 are widened to fp32 per vector and rounded once on
// store; cos/sin may be float32 with bf16/fp16 x (then read as float32, no rounding of the angles).
#define TORCHFAST_ROPE_KERNEL_ONLY
#include "rope.h"

#include <torchfast/rowmap.h>

#include <cstring>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {

namespace {

using rope::Operand;
using rope::Params;

// Exchanges the two members of every pair of lanes: (a, b, c, d, ...) -> (b, a, d, c, ...).
template <typename C>
inline Vectorized<C> swap_pairs(const Vectorized<C>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) return Vectorized<C>(_mm512_permute_ps(v, 0xB1));
  if constexpr (std::is_same_v<C, double>) return Vectorized<C>(_mm512_permute_pd(v, 0x55));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<C, float>) return Vectorized<C>(_mm256_permute_ps(v, 0xB1));
  if constexpr (std::is_same_v<C, double>) return Vectorized<C>(_mm256_permute_pd(v, 0x5));
#endif
  alignas(64) C buf[Vectorized<C>::size()];
  v.store(buf);
  for (int64_t i = 0; i + 1 < Vectorized<C>::size(); i += 2) std::swap(buf[i], buf[i + 1]);
  return Vectorized<C>::loadu(buf);
}

// (-1, +1, -1, +1, ...)
template <typename C>
inline Vectorized<C> pair_signs() {
  alignas(64) C buf[Vectorized<C>::size()];
  for (int64_t i = 0; i < Vectorized<C>::size(); ++i) buf[i] = i % 2 ? C(1) : C(-1);
  return Vectorized<C>::loadu(buf);
}

// Loads of cos/sin: CS is x's type T, or float (the compute type) for bf16/fp16 x.
template <typename L, typename CS>
inline void load_cs(const CS* p, int64_t count, typename L::V (&v)[L::kN]) {
  if constexpr (std::is_same_v<CS, typename L::C>) {
    L::load_c(p, count, v);
  } else {
    L::load(p, count, v);
  }
}

template <typename T, typename CS, bool kTranspose>
void row_rotate_half(const T* x, T* out, const CS* c, const CS* s, int64_t h) {
  using L = MapLanes<T>;
  using V = typename L::V;
  for_steps<L>(h, [&](int64_t i, int64_t n) {
    V x1[L::kN], x2[L::kN], c1[L::kN], c2[L::kN], s1[L::kN], s2[L::kN], o1[L::kN], o2[L::kN];
    L::load(x + i, n, x1);
    L::load(x + h + i, n, x2);
    load_cs<L>(c + i, n, c1);
    load_cs<L>(c + h + i, n, c2);
    load_cs<L>(s + i, n, s1);
    load_cs<L>(s + h + i, n, s2);
    for (int k = 0; k < L::kN; ++k) {
      if constexpr (kTranspose) {
        o1[k] = at::vec::fmadd(x1[k], c1[k], x2[k] * s2[k]);
        o2[k] = at::vec::fmsub(x2[k], c2[k], x1[k] * s1[k]);
      } else {
        o1[k] = at::vec::fmsub(x1[k], c1[k], x2[k] * s1[k]);
        o2[k] = at::vec::fmadd(x2[k], c2[k], x1[k] * s2[k]);
      }
    }
    L::store(out + i, n, o1);
    L::store(out + h + i, n, o2);
  });
}

template <typename T, typename CS, bool kTranspose>
void row_interleaved(const T* x, T* out, const CS* c, const CS* s, int64_t r, const typename MapLanes<T>::V& sign) {
  using L = MapLanes<T>;
  using V = typename L::V;
  for_steps<L>(r, [&](int64_t i, int64_t n) {
    V xv[L::kN], cv[L::kN], sv[L::kN];
    L::load(x + i, n, xv);
    load_cs<L>(c + i, n, cv);
    load_cs<L>(s + i, n, sv);
    for (int k = 0; k < L::kN; ++k) {
      if constexpr (kTranspose) {
        xv[k] = at::vec::fmsub(xv[k], cv[k], swap_pairs(xv[k] * sv[k]) * sign);
      } else {
        // x c rounded once with the fma, as in the transpose, so that rope(-sin) equals the transpose
        // bit for bit on RoPE's cos/sin.
        xv[k] = at::vec::fmadd(xv[k], cv[k], swap_pairs(xv[k]) * sv[k] * sign);
      }
    }
    L::store(out + i, n, xv);
  });
}

// Rows [r0, r1) of one operand: an odometer over its leading dimensions gives each row's offsets.
template <typename T, typename CS, bool kInterleaved, bool kTranspose>
void run_rows(const Operand& o, const Params& p, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(o.x);
  T* out = static_cast<T*>(o.out);
  const CS* cos = static_cast<const CS*>(p.cos);
  const CS* sin = static_cast<const CS*>(p.sin);
  int64_t idx[rope::kMaxDims];
  int64_t xo = 0, oo = 0, co = 0;
  int64_t rem = r0;
  for (int d = o.nd - 1; d >= 0; --d) {
    idx[d] = rem % o.size[d];
    rem /= o.size[d];
    xo += idx[d] * o.x_stride[d];
    oo += idx[d] * o.out_stride[d];
    co += idx[d] * o.cs_stride[d];
  }
  const typename MapLanes<T>::V sign = pair_signs<typename MapLanes<T>::C>();
  const int64_t rot = p.rot, pass = o.dim - p.rot;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + xo;
    T* yr = out + oo;
    if constexpr (kInterleaved) {
      row_interleaved<T, CS, kTranspose>(xr, yr, cos + co, sin + co, rot, sign);
    } else {
      row_rotate_half<T, CS, kTranspose>(xr, yr, cos + co, sin + co, rot / 2);
    }
    if (pass > 0) std::memcpy(yr + rot, xr + rot, pass * sizeof(T));
    for (int d = o.nd - 1; d >= 0; --d) {
      xo += o.x_stride[d];
      oo += o.out_stride[d];
      co += o.cs_stride[d];
      if (++idx[d] < o.size[d]) break;
      xo -= o.x_stride[d] * o.size[d];
      oo -= o.out_stride[d] * o.size[d];
      co -= o.cs_stride[d] * o.size[d];
      idx[d] = 0;
    }
  }
}

template <typename T, typename CS, bool kInterleaved, bool kTranspose>
void run_all(const Params& p) {
  // The rows of both operands as one range [0, rows0 + rows1), so one parallel region covers q and k.
  const int64_t rows0 = p.op[0].rows, total = rows0 + (p.n_ops > 1 ? p.op[1].rows : 0);
  const int64_t dim = std::max<int64_t>(std::max(p.op[0].dim, p.n_ops > 1 ? p.op[1].dim : 1), 1);
  const int64_t grain = std::max<int64_t>(1, kGrain / dim);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    if (begin < rows0) run_rows<T, CS, kInterleaved, kTranspose>(p.op[0], p, begin, std::min(end, rows0));
    if (end > rows0) run_rows<T, CS, kInterleaved, kTranspose>(p.op[1], p, std::max(begin, rows0) - rows0, end - rows0);
  });
}

template <typename T, typename CS>
void run_layout(const Params& p) {
  if (p.interleaved) {
    p.transpose ? run_all<T, CS, true, true>(p) : run_all<T, CS, true, false>(p);
  } else {
    p.transpose ? run_all<T, CS, false, true>(p) : run_all<T, CS, false, false>(p);
  }
}

}  // namespace

void rope_kernel(c10::ScalarType dtype, c10::ScalarType cs_dtype, const rope::Params& p) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      if (cs_dtype == c10::ScalarType::Float) return run_layout<T, float>(p);
    }
    TORCH_CHECK(cs_dtype == dtype, "torchfast: internal error: rope kernel for ", dtype, " with cos of ", cs_dtype);
    run_layout<T, T>(p);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
