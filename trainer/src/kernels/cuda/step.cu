// Single-token decode steps (see trainer/src/kernels/step.rs for the packed layouts). One
// thread per (batch row, channel); all f32.
#include "common.cuh"

// small = [x (b*E) | delta (b*E) | z (b*E)? | B (b*N) | C (b*N) | D (E) | bias (E)].
// out = [y (b*E) | new state (b*E*N)].
extern "C" __global__ void scan_step(const float* state, const float* a, const float* small,
                                     float* out, int b, int e, int n, int has_z) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)b * e) return;
    const int ch = idx % e;
    const int bi = idx / e;
    const long long be = (long long)b * e;
    const float* x = small;
    const float* delta = x + be;
    const float* z = delta + be;
    const float* bm = z + (has_z ? be : 0);
    const float* cm = bm + (long long)b * n;
    const float* d = cm + (long long)b * n;
    const float* bias = d + e;
    const float xv = x[idx];
    const float dt = softplus_f(delta[idx] + bias[ch]);
    const float du = dt * xv;
    const float* srow = state + idx * n;
    float* nrow = out + be + idx * n;
    float y = 0.0f;
    for (int i = 0; i < n; i++) {
        const float da = expf(dt * a[(long long)ch * n + i]);
        const float sn = fmaf(da, srow[i], du * bm[(long long)bi * n + i]);
        nrow[i] = sn;
        y = fmaf(sn, cm[(long long)bi * n + i], y);
    }
    y = fmaf(d[ch], xv, y);
    if (has_z) y *= silu_f(z[idx]);
    out[idx] = y;
}

// state [b, E, K] (oldest first), x [b, E], wb = [weight (E*K) | bias (E)].
// out = [y (b*E) | new state (b*E*K)]: the state shifted by one with x appended.
extern "C" __global__ void conv_step(const float* state, const float* x, const float* wb,
                                     float* out, int b, int e, int k) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)b * e) return;
    const int ch = idx % e;
    const long long be = (long long)b * e;
    const float* srow = state + idx * k;
    float* nrow = out + be + idx * k;
    float acc = wb[(long long)e * k + ch];
    for (int kk = 0; kk < k; kk++) {
        const float v = kk + 1 < k ? srow[kk + 1] : x[idx];
        nrow[kk] = v;
        acc = fmaf(wb[(long long)ch * k + kk], v, acc);
    }
    out[idx] = silu_f(acc);
}
