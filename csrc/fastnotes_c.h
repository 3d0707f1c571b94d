// The launchers csrc/*.cu export to the pybind11 module (bindings.cpp). Plain C++ types only: the
// bindings are compiled by the host compiler without CUDA or torch headers. Each launcher returns
// nullptr on success or the CUDA error string.
#pragma once

#include <cstdint>

namespace fastnotes {

constexpr int TOPK_WARPS_PER_BLOCK = 4;
// Each warp holds its row's k int64 keys in shared memory: 4 warps * 1024 * 8 bytes = 32 KiB, under
// the 48 KiB a kernel gets without opting in.
constexpr int TOPK_MAX_K = 1024;

// best[n_rows, k] (row stride k) holds each row's k smallest keys so far, ascending (fill with
// INT64_MAX before the first tile); merges keys[n_rows, n_cols] (row stride row_stride) into it.
const char* topk_merge(int device, std::intptr_t stream, const int64_t* keys, int64_t n_rows,
                       int64_t n_cols, int64_t row_stride, int64_t* best, int k);

// counts[key & 0xffffffff] += 1 for each of the n_keys keys (INT64_MAX entries are skipped).
const char* count_neighbours(int device, std::intptr_t stream, const int64_t* keys, int64_t n_keys,
                             int64_t* counts);

int cuda_runtime_version();

}  // namespace fastnotes
