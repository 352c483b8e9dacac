// Fused causal depthwise conv1d + bias + SiLU, forward and backward (see
// trainer/src/kernels/conv.rs). `x` is [b, P + L, E] with any batch/row strides and
// contiguous channels; weight [E, K] and bias [E] are f32. One thread per output element,
// consecutive threads on consecutive channels (coalesced).
#include "common.cuh"

struct ConvArgs {
    // rev: anti-causal (see ConvDims::reverse in conv.rs); never with history (p = 0).
    int b, l, e, k, p, rev;
    long long x_start, stride_b, stride_t;
};

// The x row that tap kk of output row t reads, or -1 outside x.
__device__ __forceinline__ int tap(const ConvArgs& a, int t, int kk) {
    if (a.rev) {
        const int j = t + a.k - 1 - kk;
        return j < a.l ? j : -1;
    }
    const int j = t + a.p + kk - (a.k - 1);
    return j >= 0 ? j : -1;
}

// The output row whose tap kk reads x row j, or -1 when there is none.
__device__ __forceinline__ int tapped_by(const ConvArgs& a, int j, int kk) {
    const int t = a.rev ? j + kk - (a.k - 1) : j + a.k - 1 - a.p - kk;
    return (t >= 0 && t < a.l) ? t : -1;
}

template <typename T>
__device__ __forceinline__ float preact(const T* x, const float* w, const float* bias,
                                        const ConvArgs& a, int bi, int t, int e) {
    float acc = bias[e];
    for (int kk = 0; kk < a.k; kk++) {
        const int j = tap(a, t, kk);
        if (j < 0) continue;
        acc = fmaf(w[(long long)e * a.k + kk],
                   to_f32(x[a.x_start + bi * a.stride_b + j * a.stride_t + e]), acc);
    }
    return acc;
}

template <typename T>
__device__ void conv_fwd(const T* x, const float* w, const float* bias, float* y, ConvArgs a) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)a.b * a.l * a.e;
    if (idx >= total) return;
    const int e = idx % a.e;
    const int t = (idx / a.e) % a.l;
    const int bi = idx / ((long long)a.e * a.l);
    y[idx] = silu_f(preact(x, w, bias, a, bi, t, e));
}

// Pass 1: ga = grad * silu'(preact) into `ga` ([b, L, E]), and dW/dbias summed over a tile
// of `rows` time steps per thread, then added atomically into gwb = [gw (E*K) | gbias (E)].
template <typename T>
__device__ void conv_bwd_preact(const T* x, const float* w, const float* bias,
                                const float* grad, float* ga, float* gwb, ConvArgs a, int rows) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int bi = blockIdx.y;
    const int t0 = blockIdx.z * rows;
    if (e >= a.e) return;
    float gbias = 0.0f;
    const int t1 = min(a.l, t0 + rows);
    // K is small (4 in Mamba): the per-tap weight sums go straight to global atomics per
    // tile, accumulated locally first for up to 8 taps.
    float gw[8];
    for (int kk = 0; kk < 8; kk++) gw[kk] = 0.0f;
    for (int t = t0; t < t1; t++) {
        const long long row = ((long long)bi * a.l + t) * a.e + e;
        const float g = grad[row] * silu_grad_f(preact(x, w, bias, a, bi, t, e));
        ga[row] = g;
        gbias += g;
        for (int kk = 0; kk < a.k; kk++) {
            const int j = tap(a, t, kk);
            if (j < 0) continue;
            const float xv = to_f32(x[a.x_start + bi * a.stride_b + j * a.stride_t + e]);
            if (kk < 8)
                gw[kk] = fmaf(g, xv, gw[kk]);
            else
                atomicAdd(&gwb[(long long)e * a.k + kk], g * xv);
        }
    }
    for (int kk = 0; kk < a.k && kk < 8; kk++) atomicAdd(&gwb[(long long)e * a.k + kk], gw[kk]);
    atomicAdd(&gwb[(long long)a.e * a.k + e], gbias);
}

// Pass 2: gx[j] = sum_k w[k] * ga[t] over the output rows t whose tap k reads j (a gather,
// so no atomics). gx is [b, P + L, E], contiguous.
__device__ void conv_bwd_input(const float* w, const float* ga, float* gx, ConvArgs a) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int rows = a.p + a.l;
    const long long total = (long long)a.b * rows * a.e;
    if (idx >= total) return;
    const int e = idx % a.e;
    const int j = (idx / a.e) % rows;
    const int bi = idx / ((long long)a.e * rows);
    float acc = 0.0f;
    for (int kk = 0; kk < a.k; kk++) {
        const int t = tapped_by(a, j, kk);
        if (t >= 0)
            acc = fmaf(w[(long long)e * a.k + kk], ga[((long long)bi * a.l + t) * a.e + e], acc);
    }
    gx[idx] = acc;
}

#define CONV_KERNELS(TNAME, T)                                                                \
    extern "C" __global__ void conv_fwd_##TNAME(const T* x, const float* w, const float* bias, \
                                                float* y, int b, int l, int e, int k, int p,   \
                                                int rev, long long x_start,                    \
                                                long long stride_b, long long stride_t) {      \
        ConvArgs a = {b, l, e, k, p, rev, x_start, stride_b, stride_t};                        \
        conv_fwd<T>(x, w, bias, y, a);                                                         \
    }                                                                                          \
    extern "C" __global__ void conv_bwd_preact_##TNAME(                                        \
        const T* x, const float* w, const float* bias, const float* grad, float* ga,           \
        float* gwb, int b, int l, int e, int k, int p, int rev, long long x_start,             \
        long long stride_b, long long stride_t, int rows) {                                    \
        ConvArgs a = {b, l, e, k, p, rev, x_start, stride_b, stride_t};                        \
        conv_bwd_preact<T>(x, w, bias, grad, ga, gwb, a, rows);                                \
    }

CONV_KERNELS(f32, float)
CONV_KERNELS(f16, __half)
CONV_KERNELS(bf16, __nv_bfloat16)

extern "C" __global__ void conv_bwd_input(const float* w, const float* ga, float* gx, int b,
                                          int l, int e, int k, int p, int rev) {
    ConvArgs a = {b, l, e, k, p, rev, 0, 0, 0};
    conv_bwd_input(w, ga, gx, a);
}
