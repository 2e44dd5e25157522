// Python module stub of srd_ext._C. The ops themselves are registered by static initializers in
// csrc/schemas.cpp and the backend files; importing the module only has to load the library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
