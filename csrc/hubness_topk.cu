// Exact k-NN selection and k-occurrence counting on the GPU (docs/hubness.md).
//
// The distances arrive as int64 keys, one per (query row, reference column), written by the Triton
// distance tile (kernels/triton/hubness.py): key = (order-preserving int32 of the fp32 distance) << 32
// | reference index. Integer order on the keys is the spec's total order (distance, then the smaller
// index), so selection needs no float compares and no tie rule of its own; excluded pairs (self) carry
// KEY_EXCLUDED, which sorts after every real key.
//
// topk_merge: one warp per query row keeps the row's k smallest keys seen so far, sorted ascending, in
// shared memory. A tile's keys stream through in chunks of 32 (one per lane, coalesced); a ballot
// against the current k-th key admits the few that can enter (after the first tiles, almost none on
// real data) and each is inserted by a warp-wide rank + shift.
// count_neighbours: counts[key & 0xffffffff] += 1 over the selected keys, integer atomics, so the
// counts do not depend on launch order.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastnotes_c.h"

namespace {

constexpr int WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int64_t KEY_EXCLUDED = INT64_MAX;

__device__ int warp_sum(int v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__global__ void topk_merge_kernel(const int64_t* __restrict__ keys, int64_t n_rows, int64_t n_cols,
                                  int64_t row_stride, int64_t* __restrict__ best, int k) {
    extern __shared__ int64_t lists[];
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / WARP) + warp;
    if (row >= n_rows) return;  // whole warps only: the kernel never synchronises the block
    int64_t* list = lists + static_cast<int64_t>(warp) * k;
    int64_t* out = best + row * k;
    for (int s = lane; s < k; s += WARP) list[s] = out[s];
    __syncwarp();
    const int64_t* in = keys + row * row_stride;
    int64_t threshold = list[k - 1];
    for (int64_t base = 0; base < n_cols; base += WARP) {
        const int64_t col = base + lane;
        const int64_t key = col < n_cols ? in[col] : KEY_EXCLUDED;
        unsigned admitted = __ballot_sync(FULL_MASK, key < threshold);
        while (admitted) {
            const int src = __ffs(admitted) - 1;
            admitted &= admitted - 1;
            const int64_t candidate = __shfl_sync(FULL_MASK, key, src);
            if (candidate >= threshold) continue;  // threshold is warp-uniform: the whole warp skips
            int below = 0;
            for (int s = lane; s < k; s += WARP) below += list[s] < candidate;
            const int pos = warp_sum(below);  // < k, because candidate < list[k - 1]
            // shift list[pos .. k-2] up by one, top chunk first so no chunk reads a slot already moved
            for (int top = k - 1; top > pos; top -= WARP) {
                const int s = top - lane;
                const int64_t moved = s > pos ? list[s - 1] : 0;
                __syncwarp();
                if (s > pos) list[s] = moved;
                __syncwarp();
            }
            if (lane == 0) list[pos] = candidate;
            __syncwarp();
            threshold = list[k - 1];
        }
    }
    for (int s = lane; s < k; s += WARP) out[s] = list[s];
}

__global__ void count_neighbours_kernel(const int64_t* __restrict__ keys, int64_t n_keys,
                                        unsigned long long* __restrict__ counts) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_keys; i += stride) {
        const int64_t key = keys[i];
        if (key != KEY_EXCLUDED) atomicAdd(counts + (key & 0xffffffff), 1ull);
    }
}

const char* launched(cudaError_t status) {
    if (status == cudaSuccess) status = cudaGetLastError();
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace

namespace fastnotes {

const char* topk_merge(int device, std::intptr_t stream, const int64_t* keys, int64_t n_rows,
                       int64_t n_cols, int64_t row_stride, int64_t* best, int k) {
    if (n_rows == 0 || n_cols == 0) return nullptr;
    if (const char* err = launched(cudaSetDevice(device))) return err;
    const int64_t blocks = (n_rows + TOPK_WARPS_PER_BLOCK - 1) / TOPK_WARPS_PER_BLOCK;
    const size_t shared = sizeof(int64_t) * TOPK_WARPS_PER_BLOCK * static_cast<size_t>(k);
    topk_merge_kernel<<<static_cast<unsigned>(blocks), TOPK_WARPS_PER_BLOCK * WARP, shared,
                        reinterpret_cast<cudaStream_t>(stream)>>>(keys, n_rows, n_cols, row_stride, best, k);
    return launched(cudaSuccess);
}

const char* count_neighbours(int device, std::intptr_t stream, const int64_t* keys, int64_t n_keys,
                             int64_t* counts) {
    if (n_keys == 0) return nullptr;
    if (const char* err = launched(cudaSetDevice(device))) return err;
    constexpr int threads = 256;
    const int64_t blocks = (n_keys + threads - 1) / threads;
    count_neighbours_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0,
                              reinterpret_cast<cudaStream_t>(stream)>>>(
        keys, n_keys, reinterpret_cast<unsigned long long*>(counts));
    return launched(cudaSuccess);
}

int cuda_runtime_version() {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
}

}  // namespace fastnotes
