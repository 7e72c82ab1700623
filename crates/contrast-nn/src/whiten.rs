//! Whitening of embeddings (Su et al. 2021, "Whitening sentence
//! representations"; the PCA-whitening DeepCluster applies before k-means):
//! x ↦ (x − μ)·W with W = U·Λ^(−1/2), where U Λ Uᵀ is the covariance of the
//! fitted rows, optionally keeping the first k columns (the directions of
//! largest variance).
//!
//! The statistics are sums over every rank's rows in f64 — the count, Σx and
//! Σxxᵀ in one all-reduce — so P ranks fit the whitening of one rank holding
//! every row. As in Su et al.'s code the covariance is the unbiased one
//! (`np.cov`), decomposed by a symmetric eigensolver (their SVD of a symmetric
//! matrix). Where we chose: each eigenvector's sign is fixed so that its
//! largest component is positive (a solver may return either sign, and two
//! layouts must agree), and eigenvalues below 1e-12 of the largest are raised
//! to that floor, so a rank-deficient covariance gives large finite scales
//! instead of infinities.

use crate::loss::GlobalSum;
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// The floor of an eigenvalue, relative to the largest.
const FLOOR: f64 = 1e-12;

/// A fitted whitening: the mean `[D]` and the transform `[D, k]`, in f64.
pub struct Whitening {
    /// μ.
    pub mean: Tensor,
    /// W = U·Λ^(−1/2), columns by decreasing variance.
    pub transform: Tensor,
    /// The covariance's eigenvalues, decreasing `[D]` (for reports).
    pub variances: Tensor,
}

impl Whitening {
    /// Fit on every rank's rows `local` (`[rows, D]`), keeping `dims` output
    /// dimensions (None: all D). Collective: every rank calls it.
    pub fn fit(local: &Tensor, comm: &dyn GlobalSum, dims: Option<usize>) -> Result<Self> {
        let x = local.detach().to_kind(Kind::Double);
        let (rows, d) = match x.size()[..] {
            [r, d] => (r, d),
            _ => return Err(NnError::Shape(format!("whitening takes [rows, dim] embeddings, got {:?}", x.size()))),
        };
        let k = dims.unwrap_or(d as usize);
        if k == 0 || k > d as usize {
            return Err(NnError::Param(format!("a whitening to {k} dimensions of {d}-dimensional embeddings")));
        }
        let mut sums = vec![rows as f64];
        sums.extend(crate::to_host::<f64>(&x.sum_dim_intlist([0i64].as_slice(), false, Kind::Double)));
        sums.extend(crate::to_host::<f64>(&x.tr().matmul(&x).view([-1])));
        comm.sum(&mut sums);
        let n = sums[0];
        if n < 2.0 {
            return Err(NnError::Shape(format!("whitening needs at least 2 rows over all ranks, got {n}")));
        }
        let device = x.device();
        let sum = Tensor::from_slice(&sums[1..1 + d as usize]).to_device(device);
        let outer = Tensor::from_slice(&sums[1 + d as usize..]).view([d, d]).to_device(device);
        let mean = &sum / n;
        let cov = (outer - mean.unsqueeze(1).matmul(&mean.unsqueeze(0)) * n) / (n - 1.0);
        let cov = (&cov + cov.tr()) / 2.0;
        let (values, vectors) = cov.linalg_eigh("L");
        // Decreasing variance, each column's largest component positive.
        let values = values.flip([0]);
        let vectors = vectors.flip([1]);
        let (_, at) = vectors.abs().max_dim(0, true);
        let vectors = &vectors * vectors.gather(0, &at, false).sign();
        let top = values.max().double_value(&[]).max(0.0);
        let scale = values.clamp_min((top * FLOOR).max(f64::MIN_POSITIVE)).rsqrt();
        let transform = (vectors * scale.unsqueeze(0)).narrow(1, 0, k as i64);
        Ok(Self { mean, transform, variances: values })
    }

    /// Whitened rows `[rows, k]` of `x` (`[rows, D]`), in `x`'s kind.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let w = (x.to_kind(Kind::Double) - &self.mean).matmul(&self.transform);
        w.to_kind(x.kind())
    }
}
