// Fused selective scan, forward and backward (see trainer/src/kernels/scan.rs for the math
// and the packed-input layout, which these kernels share with the CPU op).
//
// One thread owns one (batch row, channel) and keeps that channel's N states in registers
// (N <= NMAX, a template bound), in f32. The forward stores the state every CHUNK steps
// (plus the last one); the backward walks the chunks in reverse, recomputes each chunk's
// states from its stored boundary into a global workspace laid out so that a warp's
// accesses are coalesced, then runs the reverse recurrence over the chunk. Sums over
// channels (dB, dC) are warp-reduced then added atomically; sums over the batch (dA, dD,
// d delta_bias) are kept per thread over time and added atomically at the end.
#include "common.cuh"

#define CHUNK 64

struct ScanArgs {
    int b, l, e, n;
    int has_z, has_s0;
    // Scan step t reads and writes time row l-1-t (Vim's backward branch); states and
    // chunks stay in scan order.
    int reverse;
};

__device__ __forceinline__ int time_row(const ScanArgs& s, int t) {
    return s.reverse ? s.l - 1 - t : t;
}

// Offsets inside `rest` (the packed f32 inputs after u and delta).
struct RestOffsets {
    long long z, bm, cm, a, d, bias, s0;
};

__device__ __forceinline__ RestOffsets rest_offsets(const ScanArgs& s) {
    long long ble = (long long)s.b * s.l * s.e, bln = (long long)s.b * s.l * s.n;
    RestOffsets o;
    o.z = 0;
    o.bm = s.has_z ? ble : 0;
    o.cm = o.bm + bln;
    o.a = o.cm + bln;
    o.d = o.a + (long long)s.e * s.n;
    o.bias = o.d + s.e;
    o.s0 = o.bias + s.e;
    return o;
}

// out = [y (b*l*e) | states [b][nslabs][e][n]], nslabs = nchunks + 1 when keep_all, else 1.
template <typename T, int NMAX>
__device__ void scan_fwd(const T* __restrict__ u, const T* __restrict__ delta,
                         const float* __restrict__ rest, float* __restrict__ out, ScanArgs s,
                         int keep_all) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int bi = blockIdx.y;
    if (e >= s.e) return;
    const RestOffsets o = rest_offsets(s);
    const int n = s.n;
    const int nchunks = (s.l + CHUNK - 1) / CHUNK;
    const int nslabs = keep_all ? nchunks + 1 : 1;
    float a[NMAX], st[NMAX];
#pragma unroll
    for (int i = 0; i < NMAX; i++) {
        a[i] = i < n ? rest[o.a + (long long)e * n + i] : 0.0f;
        st[i] = (i < n && s.has_s0) ? rest[o.s0 + ((long long)bi * s.e + e) * n + i] : 0.0f;
    }
    const float dd = rest[o.d + e], bias = rest[o.bias + e];
    float* slabs = out + (long long)s.b * s.l * s.e;
    auto store = [&](int slab) {
        float* dst = slabs + (((long long)bi * nslabs + slab) * s.e + e) * n;
#pragma unroll
        for (int i = 0; i < NMAX; i++)
            if (i < n) dst[i] = st[i];
    };
    if (keep_all) store(0);
    for (int t = 0; t < s.l; t++) {
        const long long row = ((long long)bi * s.l + time_row(s, t)) * s.e + e;
        const long long brow = ((long long)bi * s.l + time_row(s, t)) * n;
        const float uu = to_f32(u[row]);
        const float dt = softplus_f(to_f32(delta[row]) + bias);
        const float du = dt * uu;
        float y = 0.0f;
#pragma unroll
        for (int i = 0; i < NMAX; i++) {
            if (i < n) {
                const float da = expf(dt * a[i]);
                st[i] = fmaf(da, st[i], du * rest[o.bm + brow + i]);
                y = fmaf(st[i], rest[o.cm + brow + i], y);
            }
        }
        y = fmaf(dd, uu, y);
        if (s.has_z) y *= silu_f(rest[o.z + row]);
        out[row] = y;
        if (keep_all && (t + 1) % CHUNK == 0 && t + 1 < s.l) store((t + 1) / CHUNK);
    }
    if (!keep_all || s.l > 0) store(nslabs - 1);
}

// grads = [gu | gdelta | gz? | gB | gC | gA | gD | gbias | gs0?] (f32, zero-initialised),
// the layout of ScanDims::offsets. `slabs` holds the forward's nchunks + 1 states;
// `ws` is a [b][CHUNK][n][e] workspace.
template <typename T, int NMAX>
__device__ void scan_bwd(const T* __restrict__ u, const T* __restrict__ delta,
                         const float* __restrict__ rest, const float* __restrict__ grad_y,
                         const float* __restrict__ slabs, float* __restrict__ ws,
                         float* __restrict__ grads, ScanArgs s) {
    const int e_raw = blockIdx.x * blockDim.x + threadIdx.x;
    const int bi = blockIdx.y;
    // Threads past E stay alive (with zero contributions) for the warp reductions.
    const bool valid = e_raw < s.e;
    const int e = valid ? e_raw : s.e - 1;
    const RestOffsets o = rest_offsets(s);
    const int n = s.n;
    const long long ble = (long long)s.b * s.l * s.e, bln = (long long)s.b * s.l * s.n;
    float* gu = grads;
    float* gdelta = grads + ble;
    float* gz = grads + 2 * ble;
    float* gb = gz + (s.has_z ? ble : 0);
    float* gc = gb + bln;
    float* ga_out = gc + bln;
    float* gd_out = ga_out + (long long)s.e * n;
    float* gbias_out = gd_out + s.e;
    float* gs0 = gbias_out + s.e;
    const int nchunks = (s.l + CHUNK - 1) / CHUNK;
    const int nslabs = nchunks + 1;
    const int lane = threadIdx.x & 31;

    float a[NMAX], h[NMAX], ga[NMAX], st[NMAX];
#pragma unroll
    for (int i = 0; i < NMAX; i++) {
        a[i] = i < n ? rest[o.a + (long long)e * n + i] : 0.0f;
        h[i] = 0.0f;
        ga[i] = 0.0f;
    }
    const float dd = rest[o.d + e], bias = rest[o.bias + e];
    float gd_acc = 0.0f, gbias_acc = 0.0f;
    const long long wstride = s.e;  // ws index: ((bi*CHUNK + j)*n + i)*e + e
    auto wsi = [&](int j, int i) { return (((long long)bi * CHUNK + j) * n + i) * wstride + e; };

    for (int c = nchunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK;
        const int len = min(CHUNK, s.l - t0);
        const float* slab = slabs + (((long long)bi * nslabs + c) * s.e + e) * n;
#pragma unroll
        for (int i = 0; i < NMAX; i++) st[i] = i < n ? slab[i] : 0.0f;
        // Recompute the chunk forward: store states, and the parts of the gradient that
        // need s_t (dC, dz) or nothing from the future (dD).
        for (int j = 0; j < len; j++) {
            const int t = t0 + j;
            const long long row = ((long long)bi * s.l + time_row(s, t)) * s.e + e;
            const long long brow = ((long long)bi * s.l + time_row(s, t)) * n;
            const float uu = to_f32(u[row]);
            const float dt = softplus_f(to_f32(delta[row]) + bias);
            const float du = dt * uu;
            const float g = valid ? grad_y[row] : 0.0f;
            float gy = g, gate = 0.0f;
            if (s.has_z) {
                const float zz = rest[o.z + row];
                gy = g * silu_f(zz);
                gate = g * silu_grad_f(zz);
            }
            float y = 0.0f;
#pragma unroll
            for (int i = 0; i < NMAX; i++) {
                if (i < n) {
                    const float da = expf(dt * a[i]);
                    st[i] = fmaf(da, st[i], du * rest[o.bm + brow + i]);
                    y = fmaf(st[i], rest[o.cm + brow + i], y);
                    if (valid) ws[wsi(j, i)] = st[i];
                    const float gcv = warp_sum(gy * st[i]);
                    if (lane == 0) atomicAdd(&gc[brow + i], gcv);
                }
            }
            if (valid && s.has_z) gz[row] = fmaf(dd, uu, y) * gate;
            gd_acc = fmaf(gy, uu, gd_acc);
        }
        // Reverse recurrence over the chunk; h is dL/ds carried from the future.
        for (int j = len - 1; j >= 0; j--) {
            const int t = t0 + j;
            const long long row = ((long long)bi * s.l + time_row(s, t)) * s.e + e;
            const long long brow = ((long long)bi * s.l + time_row(s, t)) * n;
            const float uu = to_f32(u[row]);
            const float v = to_f32(delta[row]) + bias;
            const float dt = softplus_f(v);
            const float du = dt * uu;
            const float g = valid ? grad_y[row] : 0.0f;
            const float gy = s.has_z ? g * silu_f(rest[o.z + row]) : g;
            float ddt = 0.0f, hb_sum = 0.0f;
#pragma unroll
            for (int i = 0; i < NMAX; i++) {
                if (i < n) {
                    const float bv = rest[o.bm + brow + i], cv = rest[o.cm + brow + i];
                    const float sp = !valid ? 0.0f : j > 0 ? ws[wsi(j - 1, i)] : slab[i];
                    const float da = expf(dt * a[i]);
                    const float hn = fmaf(gy, cv, h[i]);
                    const float q = hn * sp * da;
                    ddt = fmaf(q, a[i], ddt);
                    ga[i] = fmaf(q, dt, ga[i]);
                    const float hb = hn * bv;
                    ddt = fmaf(hb, uu, ddt);
                    hb_sum += hb;
                    const float gbv = warp_sum(valid ? hn * du : 0.0f);
                    if (lane == 0) atomicAdd(&gb[brow + i], gbv);
                    h[i] = hn * da;
                }
            }
            const float gdl = ddt * softplus_slope_f(v);
            gbias_acc += gdl;
            if (valid) {
                gu[row] = fmaf(gy, dd, hb_sum * dt);
                gdelta[row] = gdl;
            }
        }
    }
    if (!valid) return;
#pragma unroll
    for (int i = 0; i < NMAX; i++) {
        if (i < n) {
            atomicAdd(&ga_out[(long long)e * n + i], ga[i]);
            if (s.has_s0) gs0[((long long)bi * s.e + e) * n + i] = h[i];
        }
    }
    atomicAdd(&gd_out[e], gd_acc);
    atomicAdd(&gbias_out[e], gbias_acc);
}

#define SCAN_KERNELS(TNAME, T, NMAX)                                                          \
    extern "C" __global__ void scan_fwd_##TNAME##_n##NMAX(                                     \
        const T* u, const T* delta, const float* rest, float* out, int b, int l, int e, int n, \
        int has_z, int has_s0, int keep_all, int reverse) {                                    \
        ScanArgs s = {b, l, e, n, has_z, has_s0, reverse};                                     \
        scan_fwd<T, NMAX>(u, delta, rest, out, s, keep_all);                                   \
    }                                                                                          \
    extern "C" __global__ void scan_bwd_##TNAME##_n##NMAX(                                     \
        const T* u, const T* delta, const float* rest, const float* grad_y,                    \
        const float* slabs, float* ws, float* grads, int b, int l, int e, int n, int has_z,    \
        int has_s0, int reverse) {                                                             \
        ScanArgs s = {b, l, e, n, has_z, has_s0, reverse};                                     \
        scan_bwd<T, NMAX>(u, delta, rest, grad_y, slabs, ws, grads, s);                        \
    }

#define SCAN_ALL_N(TNAME, T) \
    SCAN_KERNELS(TNAME, T, 16) SCAN_KERNELS(TNAME, T, 32) SCAN_KERNELS(TNAME, T, 64)

SCAN_ALL_N(f32, float)
SCAN_ALL_N(f16, __half)
SCAN_ALL_N(bf16, __nv_bfloat16)
