//! CLIP's symmetric contrastive loss.
//!
//! # Conventions (open_clip `ClipLoss`)
//! - Image and text embeddings are L2-normalised; logits are
//!   `exp(logit_scale) · I Tᵀ`, with `logit_scale` a learnable log-scale
//!   (initialised at ln(1/0.07), clamped to [0, ln 100] after every step).
//! - Loss = ½ (CE(image→text) + CE(text→image)), each a mean over the N
//!   pairs; the label of row i is column i.
//!
//! # Shapes
//! - `img`, `txt`: `[N, d]` gathered embeddings (global rows, rank order).
//! - `logit_scale`: scalar (0-dimensional) tensor.
//! - returns: scalar, this rank's share: the terms of its B image rows and B
//!   text rows, divided by 2N.
//!
//! [`clip_share`] streams each direction in blocks of anchor rows
//! (loss/stream.rs), so logits never exceed `[R, N]`; [`clip_dense_share`]
//! materialises the `[B, N]` logits of each direction (the reference form).

use super::stream::{with_gradients, SoftmaxCe};
use super::{l2_normalize, Shard};
use crate::{NnError, Result};
use tch::{Kind, Reduction, Tensor};

fn check(img: &Tensor, txt: &Tensor, n: i64) -> Result<()> {
    if img.size() != txt.size() || img.dim() != 2 || img.size()[0] != n {
        return Err(NnError::Shape(format!(
            "CLIP towers must both be [N={n}, d], got image {:?} and text {:?}",
            img.size(),
            txt.size()
        )));
    }
    Ok(())
}

/// This rank's share of the CLIP loss (streamed).
pub fn clip_share(img: &Tensor, txt: &Tensor, logit_scale: &Tensor, shard: Shard) -> Result<Tensor> {
    clip_share_blocked(img, txt, logit_scale, shard, 0)
}

/// [`clip_share`] with `rows` anchors per block (0: the default size).
pub fn clip_share_blocked(img: &Tensor, txt: &Tensor, logit_scale: &Tensor, shard: Shard, rows: i64) -> Result<Tensor> {
    let n = shard.global() as i64;
    check(img, txt, n)?;
    let (i, t) = (l2_normalize(img), l2_normalize(txt));
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let labels = Tensor::arange_start(off, off + b, (Kind::Int64, img.device()));
    let scale = logit_scale.exp();
    let s = scale.double_value(&[]);
    let (id, td) = (i.detach(), t.detach());
    let grad = i.requires_grad() || t.requires_grad() || scale.requires_grad();
    // One direction: the local rows of `x` against every row of `y`.
    let direction = |x: &Tensor, y: &Tensor| {
        let anchors = x.narrow(0, off, b) * s;
        SoftmaxCe {
            anchors: &anchors,
            columns: y,
            positive: &labels,
            skip: None,
            exclude_positive: false,
            positive_weight: None,
            rows,
        }
        .run(grad)
    };
    let (it, ti) = (direction(&id, &td), direction(&td, &id));
    let w = 1.0 / (2 * n) as f64;
    let loss = (it.loss + ti.loss) * w;
    let grads = match (it.d_anchors, it.d_columns, ti.d_anchors, ti.d_columns) {
        (Some(dai), Some(dct), Some(dat), Some(dci)) => {
            // ∂/∂s of Σ CE(s·X Yᵀ) is Σ_rows ⟨∂/∂anchor, x⟩ (the anchors are s·x).
            let ds = (&dai * id.narrow(0, off, b)).sum(Kind::Double) + (&dat * td.narrow(0, off, b)).sum(Kind::Double);
            let gi = add_rows(dci, &labels, dai * s, w);
            let gt = add_rows(dct, &labels, dat * s, w);
            let gs = (ds * w).to_kind(scale.kind());
            vec![(&i, gi), (&t, gt), (&scale, gs)]
        }
        _ => vec![],
    };
    Ok(with_gradients(loss, &grads))
}

/// `(columns + rows added at labels) · w`, in place.
fn add_rows(mut columns: Tensor, labels: &Tensor, rows: Tensor, w: f64) -> Tensor {
    let _ = columns.index_add_(0, labels, &rows);
    columns *= w;
    columns
}

/// The CLIP loss with each direction's `[B, N]` logits materialised (the reference form).
pub fn clip_dense_share(img: &Tensor, txt: &Tensor, logit_scale: &Tensor, shard: Shard) -> Result<Tensor> {
    let n = shard.global() as i64;
    check(img, txt, n)?;
    let (i, t) = (l2_normalize(img), l2_normalize(txt));
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let labels = Tensor::arange_start(off, off + b, (Kind::Int64, img.device()));
    let scale = logit_scale.exp();
    let li = i.narrow(0, off, b).matmul(&t.tr()) * &scale; // [B, N]
    let lt = t.narrow(0, off, b).matmul(&i.tr()) * &scale; // [B, N]
    let ce = |logits: &Tensor| logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0);
    Ok((ce(&li) + ce(&lt)) / (2 * n) as f64)
}
