// fastnotes._C: pybind11 over raw device pointers, sizes and the CUDA stream as integers. No torch
// headers, so the module does not depend on the torch version it runs next to. The Python side
// (kernels/cuda/) checks shapes, dtypes and devices and passes tensor.data_ptr() and the stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastnotes_c.h"

namespace py = pybind11;

namespace {

void check(const char* error, const char* op) {
    if (error != nullptr) throw std::runtime_error(std::string("fastnotes._C.") + op + ": " + error);
}

template <typename T>
T* pointer(std::intptr_t address) {
    return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastnotes CUDA kernels over raw device pointers (see kernels/cuda/ for the torch wrappers)";
    m.attr("TOPK_MAX_K") = fastnotes::TOPK_MAX_K;

    m.def(
        "topk_merge",
        [](int device, std::intptr_t stream, std::intptr_t keys, int64_t n_rows, int64_t n_cols,
           int64_t row_stride, std::intptr_t best, int k) {
            if (k < 1 || k > fastnotes::TOPK_MAX_K)
                throw std::invalid_argument("fastnotes._C.topk_merge: k must be in 1.." +
                                            std::to_string(fastnotes::TOPK_MAX_K) + ", got " + std::to_string(k));
            if (n_rows < 0 || n_cols < 0 || row_stride < n_cols)
                throw std::invalid_argument("fastnotes._C.topk_merge: bad sizes or row stride");
            check(fastnotes::topk_merge(device, stream, pointer<const int64_t>(keys), n_rows, n_cols, row_stride,
                                        pointer<int64_t>(best), k),
                  "topk_merge");
        },
        py::arg("device"), py::arg("stream"), py::arg("keys"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("row_stride"), py::arg("best"), py::arg("k"),
        "Merge int64 keys[n_rows, n_cols] (row stride row_stride) into best[n_rows, k], each row's k "
        "smallest keys so far in ascending order. Asynchronous on `stream` (a cudaStream_t as an integer).");

    m.def(
        "count_neighbours",
        [](int device, std::intptr_t stream, std::intptr_t keys, int64_t n_keys, std::intptr_t counts) {
            if (n_keys < 0) throw std::invalid_argument("fastnotes._C.count_neighbours: n_keys < 0");
            check(fastnotes::count_neighbours(device, stream, pointer<const int64_t>(keys), n_keys,
                                              pointer<int64_t>(counts)),
                  "count_neighbours");
        },
        py::arg("device"), py::arg("stream"), py::arg("keys"), py::arg("n_keys"), py::arg("counts"),
        "counts[key & 0xffffffff] += 1 (int64 atomics) for n_keys int64 keys; INT64_MAX keys are skipped.");

    m.def("cuda_runtime_version", &fastnotes::cuda_runtime_version,
          "Version of the CUDA runtime linked into the module (statically), e.g. 13000.");
}
