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
#include <torchfast/cpu_matmul.h>

#include <atomic>
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
  // Cross-entropy over the last dimension (class-index targets). The forward returns the per-row loss
  // and log-sum-exp (fp32; fp64 for double logits); reductions are done by the caller. The backward
  // recomputes softmax from the logits and the saved lse: no [rows, V] tensor is kept in between.
  m.def("cross_entropy(Tensor logits, Tensor target, *, int ignore_index=-100, float label_smoothing=0., float z_loss=0., float? softcap=None) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, *, int ignore_index=-100, float label_smoothing=0., float z_loss=0., float? softcap=None) -> Tensor");
  // hidden @ weight^T (+ bias) followed by cross_entropy, in chunks of tokens, never holding the full
  // logits. For reduction "mean"/"sum" the gradients named by grad_mask (bits 1, 2, 4: hidden, weight,
  // bias; an int, not bool[3], which torch.jit.trace cannot record) are
  // computed during the forward (already scaled for the reduction) and returned; otherwise, and for
  // the ones not asked for, empty tensors. The backward op recomputes the logits chunk by chunk.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, *, int ignore_index=-100, str reduction=\"mean\", float label_smoothing=0., float z_loss=0., float? softcap=None, int chunk_size=4096, int grad_mask=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, *, int ignore_index=-100, float label_smoothing=0., float z_loss=0., float? softcap=None, int chunk_size=4096, int grad_mask=7) -> (Tensor, Tensor, Tensor)");
  // Rotary position embedding of q and k (transformers' apply_rotary_pos_emb; interleaved: GPT-J), with
  // cos/sin broadcast as cos.unsqueeze(unsqueeze_dim) and R = cos.size(-1) <= head dim features rotated
  // (the rest passes through). The backward op is the transposed rotation (by -sin for RoPE's cos/sin).
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, *, int unsqueeze_dim=1, bool interleaved=False) -> (Tensor, Tensor)");
  m.def("rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, *, int unsqueeze_dim=1, bool interleaved=False) -> (Tensor, Tensor)");
}

namespace torchfast::cpu {

namespace {
int g_override = -1;  // -1: follow ATen

Isa best_compiled(Isa want) {
#if !defined(TORCHFAST_HAVE_AVX512_BF16)
  if (want == Isa::AVX512_BF16) want = Isa::AVX512;
#endif
#if !defined(TORCHFAST_HAVE_AVX512)
  if (want == Isa::AVX512) want = Isa::AVX2;
#endif
#if !defined(TORCHFAST_HAVE_AVX2)
  if (want == Isa::AVX2) want = Isa::DEFAULT;
#endif
  return want;
}

constexpr Isa kAll[] = {Isa::DEFAULT, Isa::AVX2, Isa::AVX512, Isa::AVX512_BF16};

bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// ATen's pick, computed once: it reads CPUID and ATEN_CPU_CAPABILITY, neither changes later. Where
// ATen runs AVX-512 and the CPU has the BF16 extension too, ours goes one step further.
Isa cpu_ceiling() {
  static const Isa isa = [] {
    const std::string aten = at::get_cpu_capability();
    if (aten == "AVX512") return cpu_has_avx512_bf16() ? Isa::AVX512_BF16 : Isa::AVX512;
    if (aten == "AVX2") return Isa::AVX2;
    return Isa::DEFAULT;  // ATen reports DEFAULT, or an ISA of another architecture
  }();
  return isa;
}

Isa aten_isa() {
  static const Isa isa = best_compiled(cpu_ceiling());
  return isa;
}
}  // namespace

Isa active_isa() { return g_override >= 0 ? static_cast<Isa>(g_override) : aten_isa(); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512_BF16:
      return "AVX512_BF16";
    case Isa::AVX512:
      return "AVX512";
    case Isa::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll) {
    if (best_compiled(isa) == isa) out.emplace_back(isa_name(isa));
  }
  return out;
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll) {
    if (best_compiled(isa) == isa && static_cast<int>(isa) <= static_cast<int>(cpu_ceiling())) {
      out.emplace_back(isa_name(isa));
    }
  }
  return out;
}

void set_isa_override(const std::string& name) {
  if (name.empty()) {
    g_override = -1;
    return;
  }
  const Isa* found = nullptr;
  for (const Isa& isa : kAll) {
    if (name == isa_name(isa)) found = &isa;
  }
  TORCH_CHECK(found != nullptr, "torchfast: unknown CPU ISA '", name,
              "'; expected DEFAULT, AVX2, AVX512 or AVX512_BF16");
  const Isa want = *found;
  TORCH_CHECK(best_compiled(want) == want, "torchfast: the ", name,
              " kernels were not compiled into this build");
  // The CPU must support what we force: never run AVX-512 code on a CPU without it.
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(cpu_ceiling()),
              "torchfast: this CPU (or ATEN_CPU_CAPABILITY) does not allow ", name);
  g_override = static_cast<int>(want);
}

namespace {
std::atomic<bool> g_onednn_matmul{false};
}  // namespace

void set_onednn_matmul(bool on) { g_onednn_matmul = on; }
bool onednn_matmul() { return g_onednn_matmul; }

}  // namespace torchfast::cpu

// ---- torchfast._C: a plain C-API module (no pybind11) keeps this file quick to compile. ----
namespace {

PyObject* string_list(const std::vector<std::string>& names) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  for (size_t i = 0; i < names.size(); ++i) {
    PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  }
  return list;
}

PyObject* py_compiled_isas(PyObject*, PyObject*) { return string_list(torchfast::cpu::compiled_isas()); }
PyObject* py_runnable_isas(PyObject*, PyObject*) { return string_list(torchfast::cpu::runnable_isas()); }

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

PyObject* py_set_onednn_matmul(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  torchfast::cpu::set_onednn_matmul(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_onednn_matmul(PyObject*, PyObject*) { return PyBool_FromLong(torchfast::cpu::onednn_matmul()); }

PyObject* py_cuda_arch_list(PyObject*, PyObject*) {
#ifdef TORCHFAST_CUDA_ARCHS
  return PyUnicode_FromString(TORCHFAST_CUDA_ARCHS);
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"_compiled_isas", py_compiled_isas, METH_NOARGS, "CPU ISA variants compiled into this build."},
    {"_runnable_isas", py_runnable_isas, METH_NOARGS, "Compiled CPU ISA variants this CPU can run."},
    {"_active_isa", py_active_isa, METH_NOARGS, "CPU ISA whose kernels run now."},
    {"_set_cpu_isa", py_set_isa, METH_O,
     "Force a runnable CPU ISA variant ('DEFAULT', 'AVX2', 'AVX512', 'AVX512_BF16'); '' restores ATen's "
     "choice."},
    {"_set_onednn_matmul", py_set_onednn_matmul, METH_O,
     "Route torchfast's own float32 CPU GEMMs issued from C++ through oneDNN (True) or ATen's BLAS."},
    {"_onednn_matmul", py_onednn_matmul, METH_NOARGS, "Whether torchfast's C++ float32 CPU GEMMs use oneDNN."},
    {"_cuda_arch_list", py_cuda_arch_list, METH_NOARGS,
     "The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for, or None without CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torchfast's compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
