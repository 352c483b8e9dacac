//! The model's building blocks and the seams where PEFT methods attach.
//!
//! Every weight PEFT may touch is held as a frozen base tensor plus an optional adapter
//! behind a small trait object:
//! - [`Projection`] (in_proj, x_proj, dt_proj, out_proj) + [`LinearAdapter`]: LoRA, partial
//!   LoRA, DoRA, ProDiaL, parallel adapters, Additional-scan's extra x_proj rows.
//! - [`Param`] (A_log, D, conv1d weight/bias, dt bias) + [`ParamAdapter`]: partial tuning as
//!   `base + δ`, Additional-scan's extra A columns.
//! - [`Embedding`] + [`EmbeddingAdapter`]: LoRA on the token embedding (the tied head keeps
//!   reading the base matrix, as MambaPEFT does).
//!
//! Adapters are `Arc`s so one copy of the base weights can serve many adapted models: cloning
//! a model and swapping adapters copies no tensor data. The adapter is called on every
//! forward, so trainable tensors inside it (candle `Var`s) see each optimizer update.

use std::fmt;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Layout, Result, Shape, Tensor};

/// A plain linear layer `y = x Wᵀ + b` with PyTorch's `[out, in]` weight layout.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight in `dtype` (the activations' dtype, for arithmetic on the weight itself):
    /// the stored tensor when it already is, else a converted copy.
    pub fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        self.weight.to_dtype(dtype)
    }

    /// Keeps the weight in `dtype` (bf16 halves the bytes a product reads); the products
    /// still take and return the activations' dtype. The bias stays as it is (small).
    pub fn store_as(&mut self, dtype: DType) -> Result<()> {
        self.weight = self.weight.to_dtype(dtype)?;
        Ok(())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `x` is `[..., in]`. Leading dims are flattened so the product is one GEMM.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_forward(x, &self.weight, self.bias.as_ref())
    }
}

/// `x Wᵀ + b` for any weight, e.g. an adapter's merged weight.
pub fn linear_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_f, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_f))?;
    // The custom products below are CPU kernels for f32 activations and a weight outside
    // the graph; the weight may be stored in bf16 (`Linear::store_as`).
    let cpu_f32_frozen = !weight.track_op() && x2.device().is_cpu() && x2.dtype() == DType::F32;
    let inference = cpu_f32_frozen && !x2.track_op() && weight.is_contiguous();
    // Decode: a few rows against a whole weight, memory-bound (see kernels::gemv).
    let few_rows = inference
        && rows <= crate::kernels::gemv::MAX_ROWS
        && crate::kernels::gemv::enabled()
        && matches!(weight.dtype(), DType::F32 | DType::BF16);
    let y = if few_rows {
        crate::kernels::gemv::small_m_matmul(&x2, weight)?
    } else if inference && weight.dtype() == DType::BF16 {
        crate::kernels::gemv::bf16_weight_matmul(&x2, weight)?
    } else if cpu_f32_frozen && x2.track_op() && weight.dtype() == DType::F32 {
        x2.contiguous()?.apply_op1(FrozenWeightMatmul {
            weight: weight.clone(),
        })?
    } else if weight.dtype() != x2.dtype() {
        // A weight stored in another dtype than the activations, where no kernel above
        // reads it as it is (another device, or inside a training graph).
        x2.matmul(&weight.to_dtype(x2.dtype())?.t()?)?
    } else {
        x2.matmul(&weight.t()?)?
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(weight.dim(0)?);
    y.reshape(out_dims)
}

/// `x Wᵀ` with a frozen `W` inside a training graph (PEFT: gradients flow to the input, and
/// on to adapters, but not to `W`). Candle's matmul backward always computes the gradient of
/// both operands, which for a frozen weight is a wasted GEMM as large as the forward (the LM
/// head's is the biggest in the model); holding `W` inside the op instead of as an operand
/// keeps it out of the graph.
struct FrozenWeightMatmul {
    /// `[out, in]`.
    weight: Tensor,
}

impl CustomOp1 for FrozenWeightMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-weight-matmul: input must be contiguous");
        };
        let data = storage.as_slice::<f32>()?;
        // Copies x and y once each: O(rows·(in+out)) next to the GEMM's O(rows·in·out).
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// Replaces a projection's forward. It receives the frozen base layer, so it can add a
/// low-rank path (`base.forward(x) + s·B(Ax)`), transform the weight (`W' = f(W)`), or both.
pub trait LinearAdapter: Send + Sync + fmt::Debug {
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor>;

    /// The weight this adapted layer is equivalent to, when it is a plain linear map
    /// (used to merge adapters into a checkpoint). `None` when it cannot be merged.
    fn merged_weight(&self, _base: &Linear) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the adapter only adds terms to the frozen layer's output
    /// (`base(x) + f(x)`, same shape), so that [`Self::add_terms`] applies. Rows of such
    /// adapters can share one base matmul ([`RowSegments`]).
    fn is_additive(&self) -> bool {
        false
    }

    /// For an additive adapter: the adapted output given `y = base(x)`.
    fn add_terms(&self, _x: &Tensor, _y: Tensor) -> Result<Tensor> {
        candle_core::bail!("add_terms: this adapter changes the weight, not only the output")
    }

    /// When the adapter's added terms are exactly a sum of low-rank products (LoRA in
    /// evaluation mode): those terms, so that [`RowSegments`] can compute the rows of many
    /// adapters in two matmuls.
    fn low_rank_terms(&self) -> Option<Vec<LowRankTerm>> {
        None
    }
}

/// `y[.., start..start+len] += scale · (x Aᵀ) Bᵀ`, one low-rank term of an adapter.
#[derive(Clone, Debug)]
pub struct LowRankTerm {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[len, r]`.
    pub b: Tensor,
    pub scale: f64,
    /// `(start, len, total)`: the output columns the term adds to, of `total`.
    pub rows: (usize, usize, usize),
}

/// Every run's low-rank terms stacked, applied in one step per projection whatever the
/// number of adapters, instead of a few small ops per run.
#[derive(Debug)]
enum Stacked {
    /// f32 on the CPU: [`LowRankRows`].
    Fused(LowRankRows),
    /// Other devices and dtypes: `x A_allᵀ` gives all terms' inner products for all rows, a
    /// 0/1 mask keeps each row's own adapter's columns, and `(·) B_allᵀ` adds them. The
    /// price is every row against every adapter's rank.
    Matmul {
        /// `[R, in]`.
        a: Tensor,
        /// `[out, R]`, scales folded in, zero outside each term's columns.
        b: Tensor,
        /// `[rows, R]`.
        mask: Tensor,
    },
}

/// `y + ((x A_allᵀ) ⊙ mask) B_allᵀ` fused for f32 on the CPU: each row runs only its own
/// adapter's rank (no masked waste) and no small matmul pays a thread-pool dispatch, which
/// at decode batch sizes costs more than the arithmetic.
#[derive(Debug, Clone)]
struct LowRankRows {
    /// `[R, in]`.
    a: Arc<Vec<f32>>,
    /// `[R, out]` (B_allᵀ), scales folded in.
    bt: Arc<Vec<f32>>,
    /// Per batch row: its adapter's columns `start..end` of R.
    cols: Arc<Vec<(usize, usize)>>,
    inp: usize,
    out: usize,
}

impl LowRankRows {
    fn row(&self, (c0, c1): (usize, usize), x: &[f32], y: &mut [f32]) {
        for j in c0..c1 {
            let h = dot(&self.a[j * self.inp..(j + 1) * self.inp], x);
            let b = &self.bt[j * self.out..(j + 1) * self.out];
            for (y, b) in y.iter_mut().zip(b) {
                *y += h * b;
            }
        }
    }
}

/// `Σ aᵢ·bᵢ` with eight independent partial sums: a single running sum is one long chain of
/// dependent adds the compiler may not reorder (nor vectorise).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl candle_core::CustomOp2 for LowRankRows {
    fn name(&self) -> &'static str {
        "low-rank-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (Some((x0, x1)), Some((y0, y1))) = (xl.contiguous_offsets(), yl.contiguous_offsets())
        else {
            candle_core::bail!("low-rank-rows: inputs must be contiguous");
        };
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let mut y = ys.as_slice::<f32>()?[y0..y1].to_vec();
        let rows = self.cols.len();
        // Positions per row (1 when decoding, the chunk length when prefilling).
        let per = x.len() / (rows * self.inp).max(1);
        if x.len() != rows * per * self.inp || y.len() != rows * per * self.out {
            candle_core::bail!("low-rank-rows: shapes do not match the row segments");
        }
        let work = x.len() * (self.inp + self.out) / self.inp.max(1);
        let each = |(k, yv): (usize, &mut [f32])| {
            self.row(self.cols[k / per], &x[k * self.inp..(k + 1) * self.inp], yv);
        };
        if work < 1 << 16 {
            y.chunks_mut(self.out).enumerate().for_each(each);
        } else {
            y.par_chunks_mut(self.out).enumerate().for_each(each);
        }
        Ok((CpuStorage::F32(y), yl.shape().clone()))
    }
}

impl Stacked {
    /// `None` when there are no terms. `fused`: the [`LowRankRows`] form where the terms
    /// are f32 on the CPU.
    fn new(segments: &[(usize, Vec<LowRankTerm>)], fused: bool) -> Result<Option<Self>> {
        let terms: Vec<&LowRankTerm> = segments.iter().flat_map(|s| &s.1).collect();
        let Some(first) = terms.first() else {
            return Ok(None);
        };
        // Per batch row: its adapter's columns of R.
        let mut cols = Vec::new();
        let mut width = 0;
        for (n, ts) in segments {
            let r: usize = ts.iter().map(|t| t.a.dims()[0]).sum();
            cols.extend(std::iter::repeat_n((width, width + r), *n));
            width += r;
        }
        // `B·scale` of a term, zero outside its output columns: `[total, r]`.
        let padded = |t: &LowRankTerm| {
            let (start, len, total) = t.rows;
            (&t.b * t.scale)?.pad_with_zeros(0, start, total - start - len)
        };
        if fused && first.a.device().is_cpu() && first.a.dtype() == DType::F32 {
            let (mut a, mut bt) = (Vec::new(), Vec::new());
            for t in &terms {
                a.extend(t.a.flatten_all()?.to_vec1::<f32>()?);
                bt.extend(
                    padded(t)?
                        .t()?
                        .contiguous()?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            return Ok(Some(Stacked::Fused(LowRankRows {
                a: Arc::new(a),
                bt: Arc::new(bt),
                cols: Arc::new(cols),
                inp: first.a.dim(1)?,
                out: first.rows.2,
            })));
        }
        let a = Tensor::cat(&terms.iter().map(|t| &t.a).collect::<Vec<_>>(), 0)?;
        let b = terms
            .iter()
            .map(|t| padded(t))
            .collect::<Result<Vec<_>>>()?;
        let b = Tensor::cat(&b, 1)?;
        let mut mask = vec![0f32; cols.len() * width];
        for (i, (c0, c1)) in cols.iter().enumerate() {
            mask[i * width + c0..i * width + c1].fill(1.0);
        }
        let mask = Tensor::from_vec(mask, (cols.len(), width), a.device())?.to_dtype(a.dtype())?;
        Ok(Some(Stacked::Matmul { a, b, mask }))
    }

    /// `y` plus every row's terms; `None` when this form does not apply to `x` (the fused
    /// op takes untracked f32 only).
    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Stacked::Fused(op) => {
                if x.dtype() != DType::F32 || y.dtype() != DType::F32 || x.track_op() {
                    return Ok(None);
                }
                Ok(Some(
                    x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, op)?,
                ))
            }
            Stacked::Matmul { a, b, mask } => {
                let h = linear_forward(x, a, None)?;
                // `[rows, 1, .., R]` against `[rows, .., R]`.
                let mut shape = vec![1; h.rank()];
                shape[0] = mask.dim(0)?;
                shape[h.rank() - 1] = mask.dim(1)?;
                let h = h.broadcast_mul(&mask.reshape(shape)?)?;
                Ok(Some((y + linear_forward(&h, b, None)?)?))
            }
        }
    }
}

/// Different additive adapters (or none) on consecutive row ranges of one batch, sharing
/// the frozen layer's matmul: serving decodes the sequences of many tenants' adapters in one
/// step, paying one pass over the base weights instead of one per adapter.
#[derive(Debug)]
pub struct RowSegments {
    /// `(rows, adapter)` in row order; every adapter is additive.
    segments: Vec<(usize, Option<Arc<dyn LinearAdapter>>)>,
    /// Set when every adapter is made of low-rank terms; otherwise (and where it does not
    /// apply) each run adds its own adapter's terms.
    stacked: Option<Stacked>,
}

impl RowSegments {
    /// `Ok(None)` when an adapter is not additive. Neighbouring segments without an adapter
    /// are joined.
    pub fn new(segments: Vec<(usize, Option<Arc<dyn LinearAdapter>>)>) -> Result<Option<Self>> {
        let mut joined: Vec<(usize, Option<Arc<dyn LinearAdapter>>)> = Vec::new();
        for (rows, a) in segments {
            if a.as_ref().is_some_and(|a| !a.is_additive()) {
                return Ok(None);
            }
            match joined.last_mut() {
                Some((n, None)) if a.is_none() => *n += rows,
                _ => joined.push((rows, a)),
            }
        }
        let terms: Option<Vec<(usize, Vec<LowRankTerm>)>> = joined
            .iter()
            .map(|(n, a)| match a {
                Some(a) => a.low_rank_terms().map(|t| (*n, t)),
                None => Some((*n, Vec::new())),
            })
            .collect();
        let stacked = match terms {
            Some(t) => Stacked::new(&t, true)?,
            None => None,
        };
        Ok(Some(RowSegments {
            segments: joined,
            stacked,
        }))
    }
}

impl LinearAdapter for RowSegments {
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let y = base.forward(x)?;
        let total: usize = self.segments.iter().map(|s| s.0).sum();
        if total != x.dim(0)? {
            candle_core::bail!(
                "row segments cover {total} rows, the input has {}",
                x.dim(0)?
            );
        }
        if let Some(s) = &self.stacked
            && let Some(out) = s.add(x, &y)?
        {
            return Ok(out);
        }
        if let [(_, a)] = self.segments.as_slice() {
            return match a {
                Some(a) => a.add_terms(x, y),
                None => Ok(y),
            };
        }
        let mut parts = Vec::with_capacity(self.segments.len());
        let mut at = 0;
        for (rows, a) in &self.segments {
            let ys = y.narrow(0, at, *rows)?;
            parts.push(match a {
                Some(a) => a.add_terms(&x.narrow(0, at, *rows)?, ys)?,
                None => ys,
            });
            at += rows;
        }
        Tensor::cat(&parts, 0)
    }
}

/// A linear projection of the mixer, with an optional adapter.
#[derive(Clone, Debug)]
pub struct Projection {
    base: Linear,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Projection {
    pub fn new(base: Linear) -> Self {
        Projection {
            base,
            adapter: None,
        }
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The frozen layer, e.g. to change how its weight is stored ([`Linear::store_as`]).
    pub fn base_mut(&mut self) -> &mut Linear {
        &mut self.base
    }

    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Attaches (or, with `None`, removes) an adapter; returns the previous one.
    pub fn set_adapter(
        &mut self,
        adapter: Option<Arc<dyn LinearAdapter>>,
    ) -> Option<Arc<dyn LinearAdapter>> {
        std::mem::replace(&mut self.adapter, adapter)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            Some(a) => a.forward(&self.base, x),
            None => self.base.forward(x),
        }
    }
}

/// Re-parameterises a tensor parameter, e.g. `base + δ` with a trainable `δ` (partial
/// tuning with decay toward the pretrained value), or `cat(base, extra)` (extra state dims).
pub trait ParamAdapter: Send + Sync + fmt::Debug {
    fn value(&self, base: &Tensor) -> Result<Tensor>;
}

/// A depthwise conv's `[C, 1, K]` weight as the kernels take it (`[C, K]`), and its bias
/// (zeros when the checkpoint has none).
pub fn conv_weight_and_bias(weight: &Param, bias: Option<&Param>) -> Result<(Tensor, Tensor)> {
    let w = weight.value()?;
    let (c, _, k) = w.dims3()?;
    let w = w.reshape((c, k))?;
    let b = match bias {
        Some(b) => b.value()?,
        None => Tensor::zeros(c, w.dtype(), w.device())?,
    };
    Ok((w, b))
}

/// A tensor parameter (A_log, D, conv1d, dt bias) with an optional adapter.
#[derive(Clone, Debug)]
pub struct Param {
    base: Tensor,
    adapter: Option<Arc<dyn ParamAdapter>>,
    /// `-exp(base)` in f32, kept once computed ([`Self::neg_exp`]); shared by clones, which
    /// share `base`.
    neg_exp: Arc<std::sync::OnceLock<Tensor>>,
}

impl Param {
    pub fn new(base: Tensor) -> Self {
        Param {
            base,
            adapter: None,
            neg_exp: Arc::default(),
        }
    }

    /// `-exp(value)` in f32 (`A = -exp(A_log)`). Without an adapter and outside autograd the
    /// value never changes, so it is computed once: every decode step of every layer asks.
    pub fn neg_exp(&self) -> Result<Tensor> {
        let compute = |v: Tensor| v.to_dtype(DType::F32)?.exp()?.neg();
        if self.adapter.is_some() || self.base.track_op() {
            return compute(self.value()?);
        }
        if let Some(a) = self.neg_exp.get() {
            return Ok(a.clone());
        }
        let a = compute(self.base.clone())?;
        Ok(self.neg_exp.get_or_init(|| a).clone())
    }

    pub fn base(&self) -> &Tensor {
        &self.base
    }

    pub fn adapter(&self) -> Option<&Arc<dyn ParamAdapter>> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(
        &mut self,
        adapter: Option<Arc<dyn ParamAdapter>>,
    ) -> Option<Arc<dyn ParamAdapter>> {
        std::mem::replace(&mut self.adapter, adapter)
    }

    /// The value the model computes with (recomputed on every call, see the module docs).
    pub fn value(&self) -> Result<Tensor> {
        match &self.adapter {
            Some(a) => a.value(&self.base),
            None => Ok(self.base.clone()),
        }
    }
}

/// Replaces the token-embedding lookup. `ids` are `u32` of any shape; returns
/// `[..., hidden]`. `merged_weight` gets the base `[vocab, hidden]` matrix.
pub trait EmbeddingAdapter: Send + Sync + fmt::Debug {
    /// The adapted lookup; `base.lookup(ids)` is the frozen one.
    fn forward(&self, base: &Embedding, ids: &Tensor) -> Result<Tensor>;

    /// The embedding matrix this adapted lookup is equivalent to (for merging); `None`
    /// when it cannot be merged.
    fn merged_weight(&self, _weight: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    /// The dtype of the rows handed to the model (the weight's, unless [`Self::store_as`]
    /// changed how the weight is kept).
    dtype: DType,
    adapter: Option<Arc<dyn EmbeddingAdapter>>,
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Embedding {
            dtype: weight.dtype(),
            weight,
            adapter: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Keeps the matrix in `dtype`; looked-up rows keep the model's dtype.
    pub fn store_as(&mut self, dtype: DType) -> Result<()> {
        self.weight = self.weight.to_dtype(dtype)?;
        Ok(())
    }

    /// `weight[ids]` in the model's dtype, without the adapter.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        embedding_lookup(&self.weight, ids)?.to_dtype(self.dtype)
    }

    pub fn adapter(&self) -> Option<&Arc<dyn EmbeddingAdapter>> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(
        &mut self,
        adapter: Option<Arc<dyn EmbeddingAdapter>>,
    ) -> Option<Arc<dyn EmbeddingAdapter>> {
        std::mem::replace(&mut self.adapter, adapter)
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            Some(a) => a.forward(self, ids),
            None => self.lookup(ids),
        }
    }
}

/// `weight[ids]` for `ids` of any shape.
pub fn embedding_lookup(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = weight.index_select(&flat, 0)?;
    dims.push(weight.dim(1)?);
    rows.reshape(dims)
}

/// RMSNorm as HF's `MambaRMSNorm`: `x · rsqrt(mean(x²) + eps) · w`, computed in f32.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused rms_norm has no backward: it serves inference; training on CPU
        // gets our fused op (one graph node), other devices and dtypes the plain ops.
        let needs_grad = x.track_op() || self.weight.track_op();
        if !needs_grad && x.dtype() == DType::F32 && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return crate::kernels::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn linear_matches_manual() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let b = Tensor::new(&[0.5f32, 0., -1.], &dev)?;
        let x = Tensor::new(&[[[1f32, 1.], [0., 2.]]], &dev)?; // [1, 2, 2]
        let y = Linear::new(w, Some(b)).forward(&x)?;
        assert_eq!(y.dims(), &[1, 2, 3]);
        assert_eq!(
            y.to_vec3::<f32>()?,
            vec![vec![vec![3.5, 7., 10.], vec![4.5, 8., 11.]]]
        );
        Ok(())
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_input_grad_is_right() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?; // [3, 2]
        let xv = Var::from_tensor(&Tensor::new(&[[1f32, -1.], [0.5, 2.]], &dev)?)?;
        let y = linear_forward(xv.as_tensor(), &w, None)?;
        let plain = xv.as_tensor().detach().matmul(&w.t()?)?;
        assert_eq!(y.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        // d sum(x Wᵀ) / dx = 1·W summed over outputs = [9, 12] per row.
        let gx = grads.get(xv.as_tensor()).map(|g| g.to_vec2::<f32>());
        assert_eq!(gx.transpose()?, Some(vec![vec![9., 12.], vec![9., 12.]]));
        Ok(())
    }

    /// Low-rank terms only (what RowSegments stacks).
    #[derive(Debug)]
    struct Terms(Vec<LowRankTerm>);
    impl LinearAdapter for Terms {
        fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
            self.add_terms(x, base.forward(x)?)
        }
        fn is_additive(&self) -> bool {
            true
        }
        fn add_terms(&self, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
            for t in &self.0 {
                let (start, len, total) = t.rows;
                let low = (linear_forward(&linear_forward(x, &t.a, None)?, &t.b, None)? * t.scale)?;
                y = (y + low.pad_with_zeros(D::Minus1, start, total - start - len)?)?;
            }
            Ok(y)
        }
        fn low_rank_terms(&self) -> Option<Vec<LowRankTerm>> {
            Some(self.0.clone())
        }
    }

    #[test]
    fn stacked_low_rank_rows_fused_and_matmul_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out) = (6, 5);
        let term = |seed: u64, r: usize, rows: (usize, usize, usize)| -> Result<LowRankTerm> {
            let a = Tensor::randn(0f32, 1., (r, inp), &dev)?;
            let b = (Tensor::randn(0f32, 1., (rows.1, r), &dev)? + seed as f64)?;
            Ok(LowRankTerm {
                a,
                b,
                scale: 0.5,
                rows,
            })
        };
        let one: Arc<dyn LinearAdapter> = Arc::new(Terms(vec![term(1, 2, (0, out, out))?]));
        // Two terms, one on a slice of the outputs (partial LoRA).
        let two: Arc<dyn LinearAdapter> = Arc::new(Terms(vec![
            term(2, 3, (0, out, out))?,
            term(3, 1, (1, 2, out))?,
        ]));
        let segs = vec![(2, Some(one.clone())), (1, None), (3, Some(two.clone()))];
        let base = Linear::new(Tensor::randn(0f32, 1., (out, inp), &dev)?, None);
        // Decoding ([rows, in]) and prefilling ([rows, L, in]) inputs.
        for shape in [vec![6, inp], vec![6, 3, inp]] {
            let x = Tensor::randn(0f32, 1., shape.as_slice(), &dev)?;
            let Some(rs) = RowSegments::new(segs.clone())? else {
                panic!("additive adapters are accepted");
            };
            let fused = rs.forward(&base, &x)?;
            assert!(matches!(rs.stacked, Some(Stacked::Fused(_))));
            let y = base.forward(&x)?;
            // The matmul form, as on devices without the fused op.
            let terms: Vec<(usize, Vec<LowRankTerm>)> = segs
                .iter()
                .map(|(n, a)| {
                    (
                        *n,
                        a.as_ref()
                            .and_then(|a| a.low_rank_terms())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let Some(matmul @ Stacked::Matmul { .. }) = Stacked::new(&terms, false)? else {
                panic!("the matmul form is built when not fused");
            };
            let Some(masked) = matmul.add(&x, &y)? else {
                panic!("the matmul form applies to any input");
            };
            // Each run alone through its adapter's own forward.
            let runs = Tensor::cat(
                &[
                    one.forward(&base, &x.narrow(0, 0, 2)?)?,
                    y.narrow(0, 2, 1)?,
                    two.forward(&base, &x.narrow(0, 3, 3)?)?,
                ],
                0,
            )?;
            for got in [&fused, &masked] {
                let d = (got - &runs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4, "{d}");
            }
            let moved = (&fused - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(moved > 1e-2, "the terms change the output");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_fused_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, -2., 3., 0.5], [0.1, 0.2, -0.3, 4.]], &dev)?;
        let w = Tensor::new(&[1f32, 0.5, 2., -1.], &dev)?;
        let fused = RmsNorm::new(w.clone(), 1e-5).forward(&x)?;
        let wv = Var::from_tensor(&w)?;
        let slow = RmsNorm::new(wv.as_tensor().clone(), 1e-5).forward(&x)?;
        let diff = (fused - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let grads = slow.sum_all()?.backward()?;
        assert!(grads.get(wv.as_tensor()).is_some());
        Ok(())
    }
}
