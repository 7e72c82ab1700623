//! Streaming loss heads: exact losses and gradients over blocks of anchor rows,
//! with memory linear in the global batch.
//!
//! A materialised head builds the whole `[rows, N]` logit matrix, then a mask,
//! a log-sum-exp, a gather and autograd's copies of each: a dozen buffers of
//! that size and some 28 passes over them. A streaming head takes R anchor
//! rows at a time:
//!
//! ```text
//! S = A_R Cᵀ                    one GEMM, [R, N]; −∞ on the block's self entries only
//! ℓ += Σ (logsumexp(S) − S_pos)
//! S ← softmax(S) − onehot(pos)  in place: ∂ℓ/∂S
//! dA_R = S C ;  dC += Sᵀ A_R    two GEMMs
//! ```
//!
//! and hands the gradients to autograd through a surrogate
//! (`value + Σ x·g − stopgrad(Σ x·g)`, see [`with_gradients`]), the same trick
//! the engine uses for the encoder. The materialised forms stay as the
//! reference the parity tests compare with (`ntxent_dense_share`, …).

use tch::Tensor;

/// Logits a block may hold (8 MiB of f32): R = max([`MIN_BLOCK_ROWS`], this / N).
pub const BLOCK_ELEMENTS: i64 = 1 << 21;
/// The fewest anchor rows per block (GEMMs thinner than this run slowly).
pub const MIN_BLOCK_ROWS: i64 = 32;

/// Anchor rows per block for `cols` columns, or `requested` when it is positive.
pub fn block_rows(cols: i64, requested: i64) -> i64 {
    if requested > 0 {
        requested
    } else {
        (BLOCK_ELEMENTS / cols.max(1)).max(MIN_BLOCK_ROWS)
    }
}

/// A scalar whose value is `value` (detached) and whose gradient with respect
/// to each `x` of `grads` is the matching `g` (`x` keeps its graph). Values are
/// exact: `s − stopgrad(s)` is exactly zero in floating point.
pub fn with_gradients(value: Tensor, grads: &[(&Tensor, Tensor)]) -> Tensor {
    let mut out = value.detach();
    for (x, g) in grads {
        if x.requires_grad() {
            // A dot product: no temporary the size of x.
            let s = x.reshape([-1]).dot(&g.detach().reshape([-1])).to_kind(out.kind());
            out += &s - s.detach();
        }
    }
    out
}

/// The gradient of `z` (`[V·N, d]`) when the anchors were `z[own] · anchor_scale`
/// and the columns `z` itself: `(dC + dA·anchor_scale at the rows own) · weight`.
/// `None` when the stream computed no gradient.
pub fn own_rows_gradient(
    d_anchors: Option<Tensor>,
    d_columns: Option<Tensor>,
    own: &Tensor,
    anchor_scale: f64,
    weight: f64,
) -> Option<Tensor> {
    let (mut da, mut dc) = (d_anchors?, d_columns?);
    da *= anchor_scale;
    let _ = dc.index_add_(0, own, &da);
    dc *= weight;
    Some(dc)
}

/// Cross-entropy of anchors against columns, streamed:
/// Σ_i (logsumexp_{k ∈ K_i} S_ik − w_i·S_i,pos_i) with `S = A Cᵀ`, where K_i
/// leaves out column `skip_i` (if given) and, with `exclude_positive`, `pos_i`.
pub struct SoftmaxCe<'a> {
    /// `[M, d]` anchors, any scale already applied (detached).
    pub anchors: &'a Tensor,
    /// `[K, d]` columns (detached).
    pub columns: &'a Tensor,
    /// `[M]` the positive column of each anchor.
    pub positive: &'a Tensor,
    /// `[M]` a column each anchor does not see (itself), or none.
    pub skip: Option<&'a Tensor>,
    /// Leave the positive out of the log-sum-exp too (DCL's decoupled denominator).
    pub exclude_positive: bool,
    /// `[M]` a weight w_i on each anchor's positive term (DCLW; no gradient), or 1.
    pub positive_weight: Option<&'a Tensor>,
    /// Anchor rows per block (0: [`block_rows`] decides).
    pub rows: i64,
}

/// What [`SoftmaxCe::run`] returns: the summed loss and, when asked, the
/// gradients of that sum with respect to the anchors and the columns.
pub struct CeOut {
    /// Σ over anchors, a 0-dimensional tensor of the inputs' kind.
    pub loss: Tensor,
    /// `[M, d]` ∂/∂anchors (with `grad`).
    pub d_anchors: Option<Tensor>,
    /// `[K, d]` ∂/∂columns (with `grad`).
    pub d_columns: Option<Tensor>,
}

impl SoftmaxCe<'_> {
    /// Stream the blocks; gradients only when `grad`.
    pub fn run(&self, grad: bool) -> CeOut {
        let (m, kind) = (self.anchors.size()[0], self.anchors.kind());
        let r = block_rows(self.columns.size()[0], self.rows);
        let mut loss = Tensor::zeros([], (kind, self.anchors.device()));
        let mut d_anchors = grad.then(|| self.anchors.zeros_like());
        let mut d_columns = grad.then(|| self.columns.zeros_like());
        let mut start = 0;
        while start < m {
            let len = r.min(m - start);
            let a = self.anchors.narrow(0, start, len);
            let pos = self.positive.narrow(0, start, len).unsqueeze(1);
            let mut s = a.matmul(&self.columns.tr()); // [R, K]
            let positive = s.gather(1, &pos, false); // before any masking
            if let Some(skip) = self.skip {
                let _ = s.scatter_value_(1, &skip.narrow(0, start, len).unsqueeze(1), f64::NEG_INFINITY);
            }
            if self.exclude_positive {
                let _ = s.scatter_value_(1, &pos, f64::NEG_INFINITY);
            }
            let lse = s.logsumexp([1i64].as_slice(), true); // [R, 1]
            let w = match self.positive_weight {
                Some(w) => w.narrow(0, start, len).unsqueeze(1).to_kind(kind),
                None => Tensor::ones([len, 1], (kind, s.device())),
            };
            loss += (&lse - &positive * &w).sum(kind);
            if let (Some(da), Some(dc)) = (d_anchors.as_mut(), d_columns.as_mut()) {
                s -= &lse;
                let _ = s.exp_(); // softmax; the left-out entries are exp(−∞) = 0
                let _ = s.scatter_add_(1, &pos, &-w);
                da.narrow(0, start, len).copy_(&s.matmul(self.columns));
                let _ = dc.addmm_(&s.tr(), &a);
            }
            start += len;
        }
        CeOut { loss, d_anchors, d_columns }
    }
}

/// Pairwise sigmoid loss of anchors against columns, streamed:
/// −Σ_ik log σ(y_ik (s·A_i·C_k + b)), y = +1 at column `positive_i`, −1 elsewhere,
/// column `skip_i` (if given) left out (SigLIP; binary NCE).
pub struct SigmoidPairs<'a> {
    /// `[M, d]` anchors (detached, unscaled).
    pub anchors: &'a Tensor,
    /// `[K, d]` columns (detached).
    pub columns: &'a Tensor,
    /// `[M]` the matching column of each anchor.
    pub positive: &'a Tensor,
    /// The logit scale s and bias b.
    pub scale: f64,
    /// The logit bias b.
    pub bias: f64,
    /// `[M]` a column each anchor leaves out of its sum (itself), or none.
    pub skip: Option<&'a Tensor>,
    /// Anchor rows per block (0: [`block_rows`] decides).
    pub rows: i64,
}

/// [`SigmoidPairs::run`]'s loss and gradients (anchors, columns, scale, bias).
pub struct SigmoidOut {
    /// The summed loss (0-dimensional).
    pub loss: Tensor,
    /// ∂/∂anchors, ∂/∂columns, ∂/∂s, ∂/∂b (with `grad`).
    pub grads: Option<(Tensor, Tensor, Tensor, Tensor)>,
}

impl SigmoidPairs<'_> {
    /// Stream the blocks; gradients only when `grad`.
    pub fn run(&self, grad: bool) -> SigmoidOut {
        let (m, kind, device) = (self.anchors.size()[0], self.anchors.kind(), self.anchors.device());
        let r = block_rows(self.columns.size()[0], self.rows);
        let mut loss = Tensor::zeros([], (kind, device));
        let da = self.anchors.zeros_like();
        let mut dc = self.columns.zeros_like();
        let (mut ds, mut db) = (Tensor::zeros([], (kind, device)), Tensor::zeros([], (kind, device)));
        let mut start = 0;
        while start < m {
            let len = r.min(m - start);
            let a = self.anchors.narrow(0, start, len);
            let pos = self.positive.narrow(0, start, len).unsqueeze(1);
            let x = a.matmul(&self.columns.tr()); // [R, K], unscaled similarities
            let mut z = &x * self.scale + self.bias; // logits
                                                     // y·z: the positives' sign flips back to +.
            let _ = z.scatter_(1, &pos, &(z.gather(1, &pos, false) * -1.0));
            let mut neg_yz = z; // −y·z everywhere
            if let Some(skip) = self.skip {
                // −log σ(+∞) = 0 and σ(−∞) = 0: a left-out column adds nothing, nor its gradient.
                let _ = neg_yz.scatter_value_(1, &skip.narrow(0, start, len).unsqueeze(1), f64::NEG_INFINITY);
            }
            loss -= neg_yz.neg().log_sigmoid().sum(kind);
            if grad {
                // ∂ℓ/∂z = −y·σ(−y·z): +σ(z) off the diagonal, −σ(−z) at the positives.
                let mut g = neg_yz.sigmoid();
                let flip = g.gather(1, &pos, false) * -1.0;
                let _ = g.scatter_(1, &pos, &flip);
                ds += (&g * &x).sum(kind);
                db += g.sum(kind);
                g *= self.scale;
                da.narrow(0, start, len).copy_(&g.matmul(self.columns));
                let _ = dc.addmm_(&g.tr(), &a);
            }
            start += len;
        }
        SigmoidOut { loss, grads: grad.then_some((da, dc, ds, db)) }
    }
}

/// Multi-positive cross-entropy of anchors against columns, streamed (SupCon,
/// multi-positive NT-Xent): per anchor
/// ℓ_i = −Σ_{k ∈ P_i} (S_ik − logsumexp_{k≠i} S_ik) / (|P_i| + tiny), where P_i
/// holds the columns whose id equals the anchor's, itself (`skip_i`) left out.
pub struct MultiPositiveCe<'a> {
    /// `[M, d]` anchors, temperature applied (detached).
    pub anchors: &'a Tensor,
    /// `[K, d]` columns (detached).
    pub columns: &'a Tensor,
    /// `[M]` the anchors' ids.
    pub anchor_ids: &'a Tensor,
    /// `[K]` the columns' ids.
    pub column_ids: &'a Tensor,
    /// `[M]` the column each anchor does not see (itself).
    pub skip: &'a Tensor,
    /// Added to |P_i| (pytorch-metric-learning's smallest positive float).
    pub tiny: f64,
    /// Anchor rows per block (0: [`block_rows`] decides).
    pub rows: i64,
}

/// [`MultiPositiveCe::run`]'s per-anchor terms and, when asked, the gradients
/// of their sum with respect to the anchors and the columns.
pub struct MultiOut {
    /// `[M]` ℓ_i.
    pub per_anchor: Tensor,
    /// `[M, d]` ∂Σℓ/∂anchors (with `grad`).
    pub d_anchors: Option<Tensor>,
    /// `[K, d]` ∂Σℓ/∂columns (with `grad`).
    pub d_columns: Option<Tensor>,
}

impl MultiPositiveCe<'_> {
    /// Stream the blocks; gradients only when `grad`.
    pub fn run(&self, grad: bool) -> MultiOut {
        let (m, kind) = (self.anchors.size()[0], self.anchors.kind());
        let r = block_rows(self.columns.size()[0], self.rows);
        let mut terms = Vec::new();
        let mut d_anchors = grad.then(|| self.anchors.zeros_like());
        let mut d_columns = grad.then(|| self.columns.zeros_like());
        let mut start = 0;
        while start < m {
            let len = r.min(m - start);
            let a = self.anchors.narrow(0, start, len);
            let skip = self.skip.narrow(0, start, len).unsqueeze(1);
            let positive = self.anchor_ids.narrow(0, start, len).unsqueeze(1).eq_tensor(&self.column_ids.unsqueeze(0));
            let mut positive = positive.to_kind(kind);
            let _ = positive.scatter_value_(1, &skip, 0.0); // not its own positive
            let count = positive.sum_dim_intlist([1i64].as_slice(), true, kind); // [R, 1]
            let mut s = a.matmul(&self.columns.tr()); // [R, K]
            let pos_sum = (&s * &positive).sum_dim_intlist([1i64].as_slice(), true, kind); // before the −∞
            let _ = s.scatter_value_(1, &skip, f64::NEG_INFINITY);
            let lse = s.logsumexp([1i64].as_slice(), true);
            let denom = &count + self.tiny;
            terms.push(((&count * &lse - pos_sum) / &denom).squeeze_dim(1));
            if let (Some(da), Some(dc)) = (d_anchors.as_mut(), d_columns.as_mut()) {
                s -= &lse;
                let _ = s.exp_(); // softmax (0 at self)
                s *= &(&count / &denom);
                s -= &(positive / &denom);
                da.narrow(0, start, len).copy_(&s.matmul(self.columns));
                let _ = dc.addmm_(&s.tr(), &a);
            }
            start += len;
        }
        MultiOut { per_anchor: Tensor::cat(&terms, 0), d_anchors, d_columns }
    }
}
