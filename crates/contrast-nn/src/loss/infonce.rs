//! InfoNCE (van den Oord et al. 2018): categorical cross-entropy that picks the
//! positive key of each query among the keys of the global batch; and CPC's
//! bilinear form f_k(z, c) = exp(zᵀ W_k c).
//!
//! # Conventions
//! - [`infonce_share`]: logits q_i·k_j / t (optionally on L2-normalised q, k,
//!   as the `info-nce-pytorch` package does by default); the positive of query
//!   i is key i, all other keys are its negatives; mean over the N queries.
//! - [`cpc_share`]: logits z_jᵀ W c_i (no normalisation, no temperature, as in
//!   CPC); W `[d_z, d_c]` is a head parameter whose gradient joins the all-reduce.
//!
//! # Shapes
//! `q`/`c`: `[N, d_q]`, `k`/`z`: `[N, d_k]`; returns this rank's share
//! (its B queries against all N keys, / N).

use super::{check_temperature, l2_normalize, Shard};
use crate::{NnError, Result};
use tch::{Kind, Reduction, Tensor};

fn check_pairs(what: &str, q: &Tensor, k: &Tensor, shard: Shard) -> Result<()> {
    let n = shard.global() as i64;
    if q.dim() != 2 || k.dim() != 2 || q.size()[0] != n || k.size()[0] != n {
        return Err(NnError::Shape(format!(
            "{what}: queries and keys must be [N={n}, d], got {:?} and {:?}",
            q.size(),
            k.size()
        )));
    }
    Ok(())
}

fn local_ce(logits: &Tensor, shard: Shard) -> Tensor {
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let labels = Tensor::arange_start(off, off + b, (Kind::Int64, logits.device()));
    logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0) / shard.global() as f64
}

/// This rank's share of InfoNCE.
pub fn infonce_share(q: &Tensor, k: &Tensor, temperature: f64, normalize: bool, shard: Shard) -> Result<Tensor> {
    check_temperature("InfoNCE", temperature)?;
    check_pairs("InfoNCE", q, k, shard)?;
    if q.size()[1] != k.size()[1] {
        return Err(NnError::Shape(format!("InfoNCE: query dim {} ≠ key dim {}", q.size()[1], k.size()[1])));
    }
    let (q, k) = if normalize { (l2_normalize(q), l2_normalize(k)) } else { (q.shallow_clone(), k.shallow_clone()) };
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    Ok(local_ce(&(q.narrow(0, off, b).matmul(&k.tr()) / temperature), shard))
}

/// This rank's share of CPC's InfoNCE with bilinear scores zᵀ W c, or with
/// `temperature` the cosine of the prediction W c and z over it.
pub fn cpc_share(c: &Tensor, z: &Tensor, w: &Tensor, temperature: Option<f64>, shard: Shard) -> Result<Tensor> {
    check_pairs("CPC", c, z, shard)?;
    if w.size() != [z.size()[1], c.size()[1]] {
        return Err(NnError::Shape(format!(
            "CPC: W must be [d_z={}, d_c={}], got {:?}",
            z.size()[1],
            c.size()[1],
            w.size()
        )));
    }
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let pred = c.narrow(0, off, b).matmul(&w.tr()); // [B, d_z] = (W c_i)ᵀ
    Ok(match temperature {
        Some(t) => {
            check_temperature("CPC", t)?;
            local_ce(&(l2_normalize(&pred).matmul(&l2_normalize(z).tr()) / t), shard)
        }
        None => local_ce(&pred.matmul(&z.tr()), shard),
    })
}
