// Gated linear unit CPU kernels (swiglu, geglu), compiled once per ISA (see cpu_isa.h).
//
//   forward:  y = act(gate) * up
//   backward: d_gate = dy * up * act'(gate),   d_up = dy * act(gate)
//
// act is swish (swiglu), gelu or gelu_tanh (geglu). The backward recomputes act(gate) and act'(gate)
// from the saved inputs in the same pass, so autograd keeps no intermediate. bf16/fp16 are widened to
// fp32 per vector and rounded once on store. Operands are row views (row_ptr.h), so the two halves of
// a packed [..., 2H] tensor are read and written in place.
#include <torchfast/activations.h>
#include <torchfast/rowmap.h>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {

namespace {

template <typename Fn>
void dispatch_glu(c10::ScalarType dtype, int act, const Fn& fn) {
  dispatch_float(dtype, [&](auto tag) {
    switch (static_cast<ActCode>(act)) {
      case ActCode::Swish:
        return fn(tag, Swish<decltype(tag)>{});
      case ActCode::Gelu:
        return fn(tag, Gelu<decltype(tag)>{});
      case ActCode::GeluTanh:
        return fn(tag, GeluTanh<decltype(tag)>{});
      default:
        TORCH_CHECK(false, "torchfast: internal error: no gated kernel for activation code ", act);
    }
  });
}

}  // namespace

void glu_fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr gate, RowPtr up,
             RowPtrMut out) {
  dispatch_glu(dtype, act, [&](auto tag, auto a) {
    using T = decltype(tag);
    using A = decltype(a);
    using L = MapLanes<T>;
    using V = typename L::V;
    parallel_rows(rows, cols, [&](int64_t r, int64_t c0, int64_t len) {
      const T* gr = row<T>(gate, r) + c0;
      const T* ur = row<T>(up, r) + c0;
      T* yr = row<T>(out, r) + c0;
      for_steps<L>(len, [&](int64_t i, int64_t n) {
        V g[L::kN], u[L::kN];
        L::load(gr + i, n, g);
        L::load(ur + i, n, u);
        for (int k = 0; k < L::kN; ++k) g[k] = A::fwd(g[k]) * u[k];
        L::store(yr + i, n, g);
      });
    });
  });
}

void glu_bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr gate,
             RowPtr up, RowPtrMut grad_gate, RowPtrMut grad_up) {
  dispatch_glu(dtype, act, [&](auto tag, auto a) {
    using T = decltype(tag);
    using A = decltype(a);
    using L = MapLanes<T>;
    using V = typename L::V;
    parallel_rows(rows, cols, [&](int64_t r, int64_t c0, int64_t len) {
      const T* dyr = row<T>(grad_out, r) + c0;
      const T* gr = row<T>(gate, r) + c0;
      const T* ur = row<T>(up, r) + c0;
      T* dgr = row<T>(grad_gate, r) + c0;
      T* dur = row<T>(grad_up, r) + c0;
      for_steps<L>(len, [&](int64_t i, int64_t n) {
        V dy[L::kN], g[L::kN], u[L::kN], dg[L::kN], du[L::kN];
        L::load(dyr + i, n, dy);
        L::load(gr + i, n, g);
        L::load(ur + i, n, u);
        for (int k = 0; k < L::kN; ++k) {
          V y, d;
          A::fwd_deriv(g[k], y, d);
          du[k] = dy[k] * y;
          dg[k] = dy[k] * u[k] * d;
        }
        L::store(dgr + i, n, dg);
        L::store(dur + i, n, du);
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
