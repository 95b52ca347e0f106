// Run-time choice among CPU kernels compiled for several instruction sets.
//
// Each `*_kernel.cpp` under csrc/ops/ is compiled once per ISA (setup.py passes -DCPU_CAPABILITY=X,
// -DCPU_CAPABILITY_X and the matching -m flags), so its functions land in the namespace
// torchfast::cpu::DEFAULT, ::AVX2, ::AVX512 or ::AVX512_BF16. The op files pick one at run time with
// TORCHFAST_CPU_DISPATCH, following ATen's own choice (at::get_cpu_capability(), which reads the CPU
// and honours the ATEN_CPU_CAPABILITY environment variable), unless torchfast._C._set_cpu_isa()
// overrode it (tests use that to check every variant against the reference).
//
// AVX512_BF16 is ours, not ATen's: the AVX512 code plus native float->bfloat16 rounding. It is taken
// where ATen picks AVX512 and CPUID also reports the AVX512_BF16 extension.
#pragma once

#include <string>
#include <vector>

namespace torchfast::cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

// The ISA whose kernels run now: ATen's choice, capped by what was compiled, or the override.
Isa active_isa();
// Names of the ISA variants compiled into this build, lowest first.
std::vector<std::string> compiled_isas();
// Names of the compiled variants this CPU can run (and ATEN_CPU_CAPABILITY allows), lowest first.
std::vector<std::string> runnable_isas();
// Force an ISA ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16"), or "" to go back to ATen's choice. Throws if that
// variant was not compiled or the CPU lacks it.
void set_isa_override(const std::string& name);
const char* isa_name(Isa isa);

template <typename Fn>
Fn pick(Fn default_fn, Fn avx2_fn, Fn avx512_fn, Fn avx512_bf16_fn) {
  switch (active_isa()) {
    case Isa::AVX512_BF16:
      return avx512_bf16_fn;
    case Isa::AVX512:
      return avx512_fn;
    case Isa::AVX2:
      return avx2_fn;
    default:
      return default_fn;
  }
}

}  // namespace torchfast::cpu

// Declares `decl` (a function declaration without a namespace) in each per-ISA namespace.
#define TORCHFAST_DECLARE_CPU_KERNEL(ret, name, ...)   \
  namespace torchfast::cpu {                            \
  namespace DEFAULT { ret name(__VA_ARGS__); }          \
  namespace AVX2 { ret name(__VA_ARGS__); }             \
  namespace AVX512 { ret name(__VA_ARGS__); }           \
  namespace AVX512_BF16 { ret name(__VA_ARGS__); }      \
  }

// The function pointer of the active ISA's variant of `name`. A variant that was not compiled (a
// non-x86 build, or one left out with TORCHFAST_CPU_ISAS) falls back to the next lower compiled one
// (AVX512_BF16 -> AVX512 -> AVX2 -> DEFAULT); active_isa() never returns an ISA that was not
// compiled, so the fallback is never taken by mistake.
#define TORCHFAST_ISA_FN_(isa, name) &::torchfast::cpu::isa::name
#if defined(TORCHFAST_HAVE_AVX2)
#define TORCHFAST_AVX2_FN_(name) TORCHFAST_ISA_FN_(AVX2, name)
#else
#define TORCHFAST_AVX2_FN_(name) TORCHFAST_ISA_FN_(DEFAULT, name)
#endif
#if defined(TORCHFAST_HAVE_AVX512)
#define TORCHFAST_AVX512_FN_(name) TORCHFAST_ISA_FN_(AVX512, name)
#else
#define TORCHFAST_AVX512_FN_(name) TORCHFAST_AVX2_FN_(name)
#endif
#if defined(TORCHFAST_HAVE_AVX512_BF16)
#define TORCHFAST_AVX512_BF16_FN_(name) TORCHFAST_ISA_FN_(AVX512_BF16, name)
#else
#define TORCHFAST_AVX512_BF16_FN_(name) TORCHFAST_AVX512_FN_(name)
#endif
#define TORCHFAST_CPU_DISPATCH(name)                                                       \
  ::torchfast::cpu::pick(TORCHFAST_ISA_FN_(DEFAULT, name), TORCHFAST_AVX2_FN_(name),     \
                         TORCHFAST_AVX512_FN_(name), TORCHFAST_AVX512_BF16_FN_(name))
