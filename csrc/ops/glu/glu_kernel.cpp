// Gated linear unit CPU kernels (swiglu, geglu), compiled once per ISA (see cpu_isa.h).
//
//   forward:  y = act(gate) * up
//   backward: d_gate = dy * up * act'(gate),   d_up = dy * act(gate)
//
// act is swish (swiglu), gelu or gelu_tanh (geglu). The backward recomputes act(gate) and act'(gate)
// from the saved inputs in the same pass, so autograd keeps no intermediate. bf16/fp16 are widened to
// fp32 (per vector; on AVX2 per block, see with_float_blocks, and for swiglu with_split_blocks) and
// rounded once on store. Operands are
// row views (row_ptr.h), so the two halves of a packed [..., 2H] tensor are read and written in place.
#include <torchfast/activations.h>
#include <torchfast/rowmap.h>

#include <array>

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
      if constexpr (kSplitExp<T, A>) {
        const T* gp = row<T>(gate, r) + c0;
        const T* upp = row<T>(up, r) + c0;
        T* op = row<T>(out, r) + c0;
        with_split_blocks<T, A>(
            len, [&](int64_t i, int64_t n, V (&v)[L::kN]) { L::load(gp + i, n, v); },
            [&](int64_t b, int64_t count, const float* xf, const float* ef) {
          for_steps<L>(count, [&](int64_t i, int64_t n) {
            V g[L::kN], e[L::kN], u[L::kN];
            L::load_c(xf + i, n, g);
            L::load_c(ef + i, n, e);
            L::load(upp + b + i, n, u);
            for (int k = 0; k < L::kN; ++k) g[k] = A::fwd_from(g[k], e[k]) * u[k];
            L::store(op + b + i, n, g);
          });
        });
        return;
      }
      with_float_blocks<T>(len, std::array<const T*, 2>{row<T>(gate, r) + c0, row<T>(up, r) + c0},
                           std::array<T*, 1>{row<T>(out, r) + c0},
                           [&](int64_t, int64_t count, const auto& in, const auto& outs) {
        using LE = LanesOf<decltype(outs)>;
        for_steps<LE>(count, [&](int64_t i, int64_t n) {
          V g[LE::kN], u[LE::kN];
          LE::load(in[0] + i, n, g);
          LE::load(in[1] + i, n, u);
          for (int k = 0; k < LE::kN; ++k) g[k] = A::fwd(g[k]) * u[k];
          LE::store(outs[0] + i, n, g);
        });
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
      if constexpr (kSplitExp<T, A>) {
        const T* dyp = row<T>(grad_out, r) + c0;
        const T* gp = row<T>(gate, r) + c0;
        const T* upp = row<T>(up, r) + c0;
        T* dgp = row<T>(grad_gate, r) + c0;
        T* dup = row<T>(grad_up, r) + c0;
        with_split_blocks<T, A>(
            len, [&](int64_t i, int64_t n, V (&v)[L::kN]) { L::load(gp + i, n, v); },
            [&](int64_t b, int64_t count, const float* xf, const float* ef) {
          for_steps<L>(count, [&](int64_t i, int64_t n) {
            V dy[L::kN], g[L::kN], e[L::kN], u[L::kN], dg[L::kN], du[L::kN];
            L::load_c(xf + i, n, g);
            L::load_c(ef + i, n, e);
            L::load(dyp + b + i, n, dy);
            L::load(upp + b + i, n, u);
            for (int k = 0; k < L::kN; ++k) {
              V y, d;
              A::fwd_deriv_from(g[k], e[k], y, d);
              du[k] = dy[k] * y;
              dg[k] = dy[k] * u[k] * d;
            }
            L::store(dgp + b + i, n, dg);
            L::store(dup + b + i, n, du);
          });
        });
        return;
      }
      with_float_blocks<T>(
          len, std::array<const T*, 3>{row<T>(grad_out, r) + c0, row<T>(gate, r) + c0, row<T>(up, r) + c0},
          std::array<T*, 2>{row<T>(grad_gate, r) + c0, row<T>(grad_up, r) + c0},
          [&](int64_t, int64_t count, const auto& in, const auto& outs) {
        using LE = LanesOf<decltype(outs)>;
        for_steps<LE>(count, [&](int64_t i, int64_t n) {
          V dy[LE::kN], g[LE::kN], u[LE::kN], dg[LE::kN], du[LE::kN];
          LE::load(in[0] + i, n, dy);
          LE::load(in[1] + i, n, g);
          LE::load(in[2] + i, n, u);
          for (int k = 0; k < LE::kN; ++k) {
            V y, d;
            A::fwd_deriv(g[k], y, d);
            du[k] = dy[k] * y;
            dg[k] = dy[k] * u[k] * d;
          }
          LE::store(outs[0] + i, n, dg);
          LE::store(outs[1] + i, n, du);
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
