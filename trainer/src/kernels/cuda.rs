//! CUDA launches for the fused kernels (`cuda/*.cu`, compiled to PTX by `build.rs`). Each
//! function here is the body of a custom op's `cuda_fwd`: it checks layouts, picks the
//! kernel instance for the storage dtype, allocates the output and launches on the device's
//! stream. The packed layouts are the CPU ops' (see `scan`, `conv`, `step`), so the ops'
//! `bwd` code is shared by both devices.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, bail};
use half::{bf16, f16};

use super::CUDA_MAX_N as MAX_N;
use super::conv::ConvDims;
use super::scan::{CHUNK, ScanDims};

/// One kernel file's PTX for each target (an empty string when nvcc could not build it).
struct Ptx {
    name: &'static str,
    sm80: &'static str,
    sm90: &'static str,
}

macro_rules! ptx {
    ($name:literal) => {
        Ptx {
            name: $name,
            sm80: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".compute_80.ptx")),
            sm90: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".compute_90.ptx")),
        }
    };
}

const SCAN: Ptx = ptx!("scan");
const CONV: Ptx = ptx!("conv");
const STEP: Ptx = ptx!("step");

/// Threads per block: a multiple of the warp size (the scan backward's warp reductions
/// need whole warps of one batch row).
const THREADS: u32 = 128;

/// Time rows per thread in the conv backward's weight-gradient pass.
const CONV_ROWS: usize = 64;

/// A loaded kernel and the device stream it launches on.
struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Loads `func` from `ptx`, choosing the compute_90 build on 9.x GPUs when there is one.
fn load(dev: &CudaDevice, ptx: &Ptx, func: &str) -> Result<Kernel> {
    let major = dev
        .cuda_stream()
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    if major < 8 {
        bail!("molt's CUDA kernels need compute capability 8.0 or later (this GPU: {major}.x)")
    }
    let (code, arch) = if major >= 9 && !ptx.sm90.is_empty() {
        (ptx.sm90, "90")
    } else {
        (ptx.sm80, "80")
    };
    let func = dev
        .get_or_load_custom_func(func, &format!("molt_{}_{arch}", ptx.name), code)?
        .into_cuda_function();
    Ok(Kernel {
        func,
        stream: dev.cuda_stream(),
    })
}

fn dtype_suffix(dtype: DType, what: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("{what}: unsupported dtype {d:?} on CUDA (use f32, f16 or bf16)"),
    })
}

/// A contiguous view of `s` as `T`, or an error naming `what`.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn len_check(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!("{what}: {got} values, expected {want}")
    }
    Ok(())
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: {v} is too large")))
}

fn grid_1d(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).max(1) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn wrap(slice: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

fn nmax(n: usize) -> Result<usize> {
    Ok(match n {
        0..=16 => 16,
        17..=32 => 32,
        33..=MAX_N => 64,
        _ => bail!("selective_scan: N = {n} has no CUDA kernel (at most {MAX_N})"),
    })
}

/// Number of f32 values of the scan forward's output: `y` then the stored states.
pub(crate) fn scan_out_len(dims: &ScanDims, keep_all: bool) -> usize {
    let nslabs = if keep_all {
        dims.l.div_ceil(CHUNK) + 1
    } else {
        1
    };
    dims.b * dims.l * dims.e + dims.b * nslabs * dims.e * dims.n
}

/// Scan forward: `u`, `delta` (f32/f16/bf16, same dtype) and the packed f32 `rest` →
/// `[y | states [b][slab][E][N]]` (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_fwd(
    dims: &ScanDims,
    keep_all: bool,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "selective_scan (cuda)";
    let dev = s1.device();
    if s1.dtype() != s2.dtype() {
        bail!(
            "{OP}: u and delta have dtypes {:?} and {:?}",
            s1.dtype(),
            s2.dtype()
        )
    }
    let ScanDims { b, l, e, n, .. } = *dims;
    let rest = view::<f32>(s3, l3, OP)?;
    let o = dims.offsets();
    len_check(OP, rest.len(), o.total - o.z)?;
    let out_len = scan_out_len(dims, keep_all);
    let mut out = dev.alloc_zeros::<f32>(out_len)?;
    if b * e > 0 {
        let func = load(
            dev,
            &SCAN,
            &format!("scan_fwd_{}_n{}", dtype_suffix(s1.dtype(), OP)?, nmax(n)?),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (e.div_ceil(THREADS as usize) as u32, b as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            i32_of(b, OP)?,
            i32_of(l, OP)?,
            i32_of(e, OP)?,
            i32_of(n, OP)?,
            dims.has_z as i32,
            dims.has_s0 as i32,
            keep_all as i32,
            dims.reverse as i32,
        ];
        fn launch<T: CudaDType + DeviceRepr>(
            func: &Kernel,
            cfg: LaunchConfig,
            (s1, l1, s2, l2): (&CudaStorage, &Layout, &CudaStorage, &Layout),
            rest: &CudaView<'_, f32>,
            out: &mut CudaSlice<f32>,
            ints: &[i32; 8],
            ble: usize,
        ) -> Result<()> {
            const OP: &str = "selective_scan (cuda)";
            let u = view::<T>(s1, l1, OP)?;
            let delta = view::<T>(s2, l2, OP)?;
            len_check(OP, u.len(), ble)?;
            len_check(OP, delta.len(), ble)?;
            let mut builder = func.builder();
            builder.arg(&u).arg(&delta).arg(rest).arg(out);
            for v in ints {
                builder.arg(v);
            }
            // SAFETY: argument types and buffer sizes match the kernel's signature (checked
            // above); the kernel writes only inside `out`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
        let io = (s1, l1, s2, l2);
        let ble = b * l * e;
        match s1.dtype() {
            DType::F32 => launch::<f32>(&func, cfg, io, &rest, &mut out, &ints, ble)?,
            DType::F16 => launch::<f16>(&func, cfg, io, &rest, &mut out, &ints, ble)?,
            _ => launch::<bf16>(&func, cfg, io, &rest, &mut out, &ints, ble)?,
        }
    }
    Ok((wrap(out, dev), Shape::from(out_len)))
}

/// Scan backward: the gradient of `sum(y · grad_y)` w.r.t. `[u, delta, rest]` as one f32
/// buffer laid out as `ScanDims::offsets`. `grad` starts with `grad_y` (`[b, L, E]`) and
/// `saved` is the forward's output (`y` then the chunk-boundary states).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_bwd(
    dims: &ScanDims,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    grad: (&CudaStorage, &Layout),
    saved: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "selective_scan backward (cuda)";
    let dev = s1.device();
    let ScanDims { b, l, e, n, .. } = *dims;
    let ble = b * l * e;
    let rest = view::<f32>(s3, l3, OP)?;
    let o = dims.offsets();
    len_check(OP, rest.len(), o.total - o.z)?;
    let grad_y = view::<f32>(grad.0, grad.1, OP)?;
    if grad_y.len() < ble {
        bail!(
            "{OP}: grad of y has {} values, expected {ble}",
            grad_y.len()
        )
    }
    let saved = view::<f32>(saved.0, saved.1, OP)?;
    len_check(
        &format!("{OP} (saved states; was the forward run without gradient tracking?)"),
        saved.len(),
        scan_out_len(dims, true),
    )?;
    let slabs = saved.slice(ble..);
    let mut grads = dev.alloc_zeros::<f32>(o.total)?;
    if b * e * l > 0 {
        let mut ws = dev.alloc_zeros::<f32>(b * CHUNK * n * e)?;
        let func = load(
            dev,
            &SCAN,
            &format!("scan_bwd_{}_n{}", dtype_suffix(s1.dtype(), OP)?, nmax(n)?),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (e.div_ceil(THREADS as usize) as u32, b as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            i32_of(b, OP)?,
            i32_of(l, OP)?,
            i32_of(e, OP)?,
            i32_of(n, OP)?,
            dims.has_z as i32,
            dims.has_s0 as i32,
            dims.reverse as i32,
        ];
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr>(
            func: &Kernel,
            cfg: LaunchConfig,
            (s1, l1, s2, l2): (&CudaStorage, &Layout, &CudaStorage, &Layout),
            rest: &CudaView<'_, f32>,
            grad_y: &CudaView<'_, f32>,
            slabs: &CudaView<'_, f32>,
            ws: &mut CudaSlice<f32>,
            grads: &mut CudaSlice<f32>,
            ints: &[i32; 7],
            ble: usize,
        ) -> Result<()> {
            const OP: &str = "selective_scan backward (cuda)";
            let u = view::<T>(s1, l1, OP)?;
            let delta = view::<T>(s2, l2, OP)?;
            len_check(OP, u.len(), ble)?;
            len_check(OP, delta.len(), ble)?;
            let mut builder = func.builder();
            builder
                .arg(&u)
                .arg(&delta)
                .arg(rest)
                .arg(grad_y)
                .arg(slabs)
                .arg(ws)
                .arg(grads);
            for v in ints {
                builder.arg(v);
            }
            // SAFETY: as in the forward; `grads` is zeroed (the kernel adds atomically).
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
        let io = (s1, l1, s2, l2);
        let args = (&rest, &grad_y, &slabs);
        match s1.dtype() {
            DType::F32 => launch::<f32>(
                &func, cfg, io, args.0, args.1, args.2, &mut ws, &mut grads, &ints, ble,
            )?,
            DType::F16 => launch::<f16>(
                &func, cfg, io, args.0, args.1, args.2, &mut ws, &mut grads, &ints, ble,
            )?,
            _ => launch::<bf16>(
                &func, cfg, io, args.0, args.1, args.2, &mut ws, &mut grads, &ints, ble,
            )?,
        }
    }
    Ok((wrap(grads, dev), Shape::from(o.total)))
}

/// The strided view of the conv input `x_ext` (`[b, P + L, E]`, channels contiguous):
/// `(start, stride_b, stride_t)` in elements.
fn conv_x_layout(dims: &ConvDims, l1: &Layout, what: &str) -> Result<(i64, i64, i64)> {
    let want = [dims.b, dims.p + dims.l, dims.e];
    if l1.dims() != want {
        bail!("{what}: x has shape {:?}, expected {want:?}", l1.dims())
    }
    let st = l1.stride();
    if dims.e > 1 && st[2] != 1 {
        bail!("{what}: x must be contiguous along channels")
    }
    Ok((l1.start_offset() as i64, st[0] as i64, st[1] as i64))
}

fn conv_ints(dims: &ConvDims, what: &str) -> Result<[i32; 6]> {
    Ok([
        i32_of(dims.b, what)?,
        i32_of(dims.l, what)?,
        i32_of(dims.e, what)?,
        i32_of(dims.k, what)?,
        i32_of(dims.p, what)?,
        dims.reverse as i32,
    ])
}

/// Launches a conv kernel over an `x` of any supported dtype, with the given leading
/// buffer arguments and trailing integers.
fn with_x<F>(x: &CudaStorage, what: &str, f: F) -> Result<()>
where
    F: FnOnce(XView<'_>) -> Result<()>,
{
    match x.dtype() {
        DType::F32 => f(XView::F32(x.as_cuda_slice::<f32>()?)),
        DType::F16 => f(XView::F16(x.as_cuda_slice::<f16>()?)),
        DType::BF16 => f(XView::BF16(x.as_cuda_slice::<bf16>()?)),
        d => bail!("{what}: unsupported dtype {d:?} on CUDA (use f32, f16 or bf16)"),
    }
}

/// The whole storage of the conv input (the kernel applies the layout's offset/strides).
enum XView<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<f16>),
    BF16(&'a CudaSlice<bf16>),
}

impl XView<'_> {
    fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>) {
        match self {
            XView::F32(s) => builder.arg(*s),
            XView::F16(s) => builder.arg(*s),
            XView::BF16(s) => builder.arg(*s),
        };
    }

    fn len(&self) -> usize {
        match self {
            XView::F32(s) => s.len(),
            XView::F16(s) => s.len(),
            XView::BF16(s) => s.len(),
        }
    }
}

/// Fails unless every element the strided `x` view reads lies inside its buffer.
fn conv_x_bounds(
    dims: &ConvDims,
    (start, sb, st): (i64, i64, i64),
    len: usize,
    what: &str,
) -> Result<()> {
    let rows = dims.p + dims.l;
    if dims.b * rows * dims.e > 0 {
        let last = start + (dims.b as i64 - 1) * sb + (rows as i64 - 1) * st + dims.e as i64;
        if last > len as i64 {
            bail!("{what}: x's layout reaches past its storage")
        }
    }
    Ok(())
}

/// Conv forward: `x_ext` (f32/f16/bf16, strided rows), f32 weight and bias → f32 `y`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_fwd(
    dims: &ConvDims,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "causal_conv1d_silu (cuda)";
    let dev = s1.device();
    let xl = conv_x_layout(dims, l1, OP)?;
    let w = view::<f32>(s2, l2, OP)?;
    let bias = view::<f32>(s3, l3, OP)?;
    len_check(OP, w.len(), dims.e * dims.k)?;
    len_check(OP, bias.len(), dims.e)?;
    let total = dims.b * dims.l * dims.e;
    let mut y = dev.alloc_zeros::<f32>(total)?;
    if total > 0 {
        let func = load(
            dev,
            &CONV,
            &format!("conv_fwd_{}", dtype_suffix(s1.dtype(), OP)?),
        )?;
        let ints = conv_ints(dims, OP)?;
        with_x(s1, OP, |x| {
            conv_x_bounds(dims, xl, x.len(), OP)?;
            let mut builder = func.builder();
            x.push(&mut builder);
            builder.arg(&w).arg(&bias).arg(&mut y);
            for v in &ints {
                builder.arg(v);
            }
            builder.arg(&xl.0).arg(&xl.1).arg(&xl.2);
            // SAFETY: the strided reads stay inside x (checked above); writes inside y.
            unsafe { builder.launch(grid_1d(total)) }.w()?;
            Ok(())
        })?;
    }
    Ok((wrap(y, dev), Shape::from((dims.b, dims.l, dims.e))))
}

/// Conv backward: (`x_ext`, `[weight; bias]`, grad y) → `[grad x_ext; grad weight; grad
/// bias]` (f32), as the CPU grad op.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_bwd(
    dims: &ConvDims,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "causal_conv1d_silu backward (cuda)";
    let dev = s1.device();
    let ConvDims { b, l, e, k, p, .. } = *dims;
    let xl = conv_x_layout(dims, l1, OP)?;
    let wb = view::<f32>(s2, l2, OP)?;
    len_check(OP, wb.len(), e * (k + 1))?;
    let grad = view::<f32>(s3, l3, OP)?;
    len_check(OP, grad.len(), b * l * e)?;
    let nx = b * (p + l) * e;
    let total = nx + e * (k + 1);
    let mut out = dev.alloc_zeros::<f32>(total)?;
    if b * l * e > 0 {
        let w = wb.slice(..e * k);
        let bias = wb.slice(e * k..);
        let mut ga = dev.alloc_zeros::<f32>(b * l * e)?;
        let ints = conv_ints(dims, OP)?;
        let rows = CONV_ROWS as i32;
        {
            let func = load(
                dev,
                &CONV,
                &format!("conv_bwd_preact_{}", dtype_suffix(s1.dtype(), OP)?),
            )?;
            let mut gwb = out.slice_mut(nx..);
            let cfg = LaunchConfig {
                grid_dim: (
                    e.div_ceil(THREADS as usize) as u32,
                    b as u32,
                    l.div_ceil(CONV_ROWS) as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            with_x(s1, OP, |x| {
                conv_x_bounds(dims, xl, x.len(), OP)?;
                let mut builder = func.builder();
                x.push(&mut builder);
                builder
                    .arg(&w)
                    .arg(&bias)
                    .arg(&grad)
                    .arg(&mut ga)
                    .arg(&mut gwb);
                for v in &ints {
                    builder.arg(v);
                }
                builder.arg(&xl.0).arg(&xl.1).arg(&xl.2).arg(&rows);
                // SAFETY: reads inside x (checked), grad and ga; gwb is zeroed and sized
                // E·(K+1).
                unsafe { builder.launch(cfg) }.w()?;
                Ok(())
            })?;
        }
        let func = load(dev, &CONV, "conv_bwd_input")?;
        let mut gx = out.slice_mut(..nx);
        let mut builder = func.builder();
        builder.arg(&w).arg(&ga).arg(&mut gx);
        for v in &ints {
            builder.arg(v);
        }
        // SAFETY: gx is [b, P + L, E]; ga [b, L, E]; w [E, K].
        unsafe { builder.launch(grid_1d(nx)) }.w()?;
    }
    Ok((wrap(out, dev), Shape::from(total)))
}

/// Scan decode step: (state `[b, E, N]`, A `[E, N]`, packed small inputs) → `[y | state]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_step(
    (b, e, n, has_z): (usize, usize, usize, bool),
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "selective_scan_step (cuda)";
    let dev = s1.device();
    let state = view::<f32>(s1, l1, OP)?;
    let a = view::<f32>(s2, l2, OP)?;
    let small = view::<f32>(s3, l3, OP)?;
    len_check(OP, state.len(), b * e * n)?;
    len_check(OP, a.len(), e * n)?;
    let zs = if has_z { b * e } else { 0 };
    len_check(OP, small.len(), 2 * b * e + zs + 2 * b * n + 2 * e)?;
    let total = b * e * (1 + n);
    let mut out = dev.alloc_zeros::<f32>(total)?;
    if b * e > 0 {
        let func = load(dev, &STEP, "scan_step")?;
        let ints = [i32_of(b, OP)?, i32_of(e, OP)?, i32_of(n, OP)?, has_z as i32];
        let mut builder = func.builder();
        builder.arg(&state).arg(&a).arg(&small).arg(&mut out);
        for v in &ints {
            builder.arg(v);
        }
        // SAFETY: sizes checked above.
        unsafe { builder.launch(grid_1d(b * e)) }.w()?;
    }
    Ok((wrap(out, dev), Shape::from(total)))
}

/// Conv decode step: (state `[b, E, K]`, x `[b, E]`, `[weight; bias]`) → `[y | state]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_step(
    (b, e, k): (usize, usize, usize),
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "causal_conv1d_step (cuda)";
    let dev = s1.device();
    let state = view::<f32>(s1, l1, OP)?;
    let x = view::<f32>(s2, l2, OP)?;
    let wb = view::<f32>(s3, l3, OP)?;
    len_check(OP, state.len(), b * e * k)?;
    len_check(OP, x.len(), b * e)?;
    len_check(OP, wb.len(), e * (k + 1))?;
    let total = b * e * (1 + k);
    let mut out = dev.alloc_zeros::<f32>(total)?;
    if b * e > 0 {
        let func = load(dev, &STEP, "conv_step")?;
        let ints = [i32_of(b, OP)?, i32_of(e, OP)?, i32_of(k, OP)?];
        let mut builder = func.builder();
        builder.arg(&state).arg(&x).arg(&wb).arg(&mut out);
        for v in &ints {
            builder.arg(v);
        }
        // SAFETY: sizes checked above.
        unsafe { builder.launch(grid_1d(b * e)) }.w()?;
    }
    Ok((wrap(out, dev), Shape::from(total)))
}
