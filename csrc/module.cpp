// Python module srd_ext._C. The ops themselves are registered by static initializers in
// csrc/schemas.cpp and the backend files; importing the module loads the library. The module's
// one function reports which CPU kernel of the tap norms this process runs.
#include <Python.h>
#include <c10/util/Exception.h>

#include <string>

#include "cpu/fused_tap_sums.h"

namespace {
PyObject* tap_norms_cpu_kernel(PyObject*, PyObject*) {
  try {
    const std::string s = srd_ext::cpu::fused::describe();
    return PyUnicode_FromString(s.c_str());
  } catch (const c10::Error& e) {  // a bad SRD_EXT_TAP_NORMS_FUSED
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"tap_norms_cpu_kernel", tap_norms_cpu_kernel, METH_NOARGS,
     "The float32 tap-norm kernel of this CPU: instruction set and register tile, or 'none'."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
