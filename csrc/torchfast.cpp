// The public op surface of torchfast: every operator schema, in one block, plus the tiny Python
// module `torchfast._C` that exposes build information. Kernels register themselves per backend
// with TORCH_LIBRARY_IMPL in csrc/ops/<op>/; fake kernels, autograd and autocast are registered
// from Python (torchfast/ops/<op>.py).
//
// torchfast/ops/<op>.py repeats each schema string so that the ops exist (with their reference
// implementation) when this extension is not built; tests/test_registry.py checks that both agree.
#include <Python.h>

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <torchfast/cpu_isa.h>

#include <cstdlib>
#include <string>

TORCH_LIBRARY(torchfast, m) {
  m.def("swish(Tensor x) -> Tensor");
  m.def("swish_backward(Tensor grad_out, Tensor x) -> Tensor");
  // Normalizations over the last dimension. The forward ops also return the per-row statistics
  // (fp32; fp64 for double x) that their backward ops take; the public functions return y only.
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor?)");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_backward(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor? weight, Tensor rstd) -> (Tensor, Tensor?)");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor?, Tensor?)");
  m.def("bias_act(Tensor x, Tensor? bias, *, str act) -> Tensor");
  m.def("bias_act_backward(Tensor grad_out, Tensor x, Tensor? bias, *, str act) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_packed(Tensor x) -> Tensor");
  m.def("swiglu_packed_backward(Tensor grad_out, Tensor x) -> Tensor");
  m.def("geglu(Tensor gate, Tensor up, *, str approximate=\"none\") -> Tensor");
  m.def("geglu_backward(Tensor grad_out, Tensor gate, Tensor up, *, str approximate=\"none\") -> (Tensor, Tensor)");
  m.def("geglu_packed(Tensor x, *, str approximate=\"none\") -> Tensor");
  m.def("geglu_packed_backward(Tensor grad_out, Tensor x, *, str approximate=\"none\") -> Tensor");
}

namespace torchfast::cpu {

namespace {
int g_override = -1;  // -1: follow ATen

Isa best_compiled(Isa want) {
#if !defined(TORCHFAST_HAVE_AVX512)
  if (want == Isa::AVX512) want = Isa::AVX2;
#endif
#if !defined(TORCHFAST_HAVE_AVX2)
  if (want == Isa::AVX2) want = Isa::DEFAULT;
#endif
  return want;
}

Isa parse(const std::string& name) {
  if (name == "AVX512") return Isa::AVX512;
  if (name == "AVX2") return Isa::AVX2;
  return Isa::DEFAULT;  // ATen reports DEFAULT, or an ISA of another architecture
}

// ATen's pick, computed once: it reads CPUID and ATEN_CPU_CAPABILITY, neither changes later.
Isa aten_isa() {
  static const Isa isa = best_compiled(parse(at::get_cpu_capability()));
  return isa;
}
}  // namespace

Isa active_isa() { return g_override >= 0 ? static_cast<Isa>(g_override) : aten_isa(); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      return "AVX512";
    case Isa::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out{"DEFAULT"};
#if defined(TORCHFAST_HAVE_AVX2)
  out.emplace_back("AVX2");
#endif
#if defined(TORCHFAST_HAVE_AVX512)
  out.emplace_back("AVX512");
#endif
  return out;
}

void set_isa_override(const std::string& name) {
  if (name.empty()) {
    g_override = -1;
    return;
  }
  Isa want = parse(name);
  TORCH_CHECK(name == isa_name(want), "torchfast: unknown CPU ISA '", name,
              "'; expected DEFAULT, AVX2 or AVX512");
  TORCH_CHECK(best_compiled(want) == want, "torchfast: the ", name,
              " kernels were not compiled into this build");
  // The CPU must support what we force: never run AVX-512 code on a CPU without it.
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_compiled(parse(at::get_cpu_capability()))) ||
                  want == Isa::DEFAULT,
              "torchfast: this CPU (or ATEN_CPU_CAPABILITY) does not allow ", name);
  g_override = static_cast<int>(want);
}

}  // namespace torchfast::cpu

// ---- torchfast._C: a plain C-API module (no pybind11) keeps this file quick to compile. ----
namespace {

PyObject* py_compiled_isas(PyObject*, PyObject*) {
  auto names = torchfast::cpu::compiled_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  for (size_t i = 0; i < names.size(); ++i) {
    PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  }
  return list;
}

PyObject* py_active_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(torchfast::cpu::isa_name(torchfast::cpu::active_isa()));
}

PyObject* py_set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    torchfast::cpu::set_isa_override(name);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_cuda_arch_list(PyObject*, PyObject*) {
#ifdef TORCHFAST_CUDA_ARCHS
  return PyUnicode_FromString(TORCHFAST_CUDA_ARCHS);
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"_compiled_isas", py_compiled_isas, METH_NOARGS, "CPU ISA variants compiled into this build."},
    {"_active_isa", py_active_isa, METH_NOARGS, "CPU ISA whose kernels run now."},
    {"_set_cpu_isa", py_set_isa, METH_O,
     "Force a compiled CPU ISA variant ('DEFAULT', 'AVX2', 'AVX512'); '' restores ATen's choice."},
    {"_cuda_arch_list", py_cuda_arch_list, METH_NOARGS,
     "The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for, or None without CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torchfast's compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
