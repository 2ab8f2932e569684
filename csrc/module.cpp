// Python module of the compiled extension kvpo_kernels._C.
// The ops themselves are registered with the torch dispatcher (TORCH_LIBRARY_FRAGMENT in
// csrc/torch/*.cpp) when this shared library loads; the module only reports how it was built.
#include <Python.h>

static PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef KVPO_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* openmp_threads(PyObject*, PyObject*);

static PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"openmp_threads", openmp_threads, METH_NOARGS, "OpenMP's max thread count (0 without OpenMP)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }

#ifdef _OPENMP
#include <omp.h>
static PyObject* openmp_threads(PyObject*, PyObject*) { return PyLong_FromLong(omp_get_max_threads()); }
#else
static PyObject* openmp_threads(PyObject*, PyObject*) { return PyLong_FromLong(0); }
#endif
