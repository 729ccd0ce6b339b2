// The module object of the extension `sparsevd._C`. The op schemas are declared in Python
// (sparsevd/_ops.py); each kernel file registers its kernels for its dispatch key with
// TORCH_LIBRARY_IMPL, which the dispatcher accepts before or after the schema exists.
#include <Python.h>

// `import sparsevd._C` loads the shared library, which runs those registrations; the
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
