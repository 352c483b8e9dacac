// Shared helpers for molt's CUDA kernels: dtype loads and the scalar activations.
// Every kernel computes and accumulates in f32 whatever the storage dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// PyTorch's softplus (threshold 20), written stably: max(v, 0) + log1p(exp(-|v|)).
__device__ __forceinline__ float softplus_f(float v) {
    if (v > 20.0f) return v;
    return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
}

// softplus'(v) = sigmoid(v), 1 above the threshold.
__device__ __forceinline__ float softplus_slope_f(float v) {
    if (v > 20.0f) return 1.0f;
    return 1.0f / (1.0f + expf(-v));
}

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ __forceinline__ float silu_f(float z) { return z * sigmoid_f(z); }

// silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))).
__device__ __forceinline__ float silu_grad_f(float z) {
    float s = sigmoid_f(z);
    return s * (1.0f + z * (1.0f - s));
}

// Sum over the 32 lanes of a warp (every lane gets the total).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
