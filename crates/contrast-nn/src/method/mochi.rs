//! MoCHi (Kalantidis et al. 2020): hard negative mixing on MoCo-v2, switched
//! on by `method.hard_negatives` > 0 (`moco_v2`'s keys; MoCo's file calls this one).
//!
//! For each query q (L2-normalised) the H = `method.hard_negatives` queue keys
//! with the highest q·n are its hard negatives, over the **whole sharded
//! queue**: each rank takes its shard's top H, the candidates' scores and
//! canonical queue rows are all-gathered, and every rank picks the same global
//! top H (ties broken by the lower queue row). From them:
//! - `method.mix_negatives` synthetic negatives h = normalise(α·n_a + (1−α)·n_b),
//!   α ∈ (0, 1), a and b among the hard negatives;
//! - `method.mix_query` synthetic negatives h′ = normalise(β·q + (1−β)·n_j),
//!   β ∈ (0, ½), with q detached (a synthetic point is a constant negative).
//!
//! The choices and coefficients come from (seed, step, global row) alone, so
//! any world size mixes alike. The mixed keys' rows live on their owners: each
//! rank writes the rows it holds into a `[N, M, d]` table (M = 2·mix_negatives
//! + mix_query), zeros elsewhere, and one all-reduce gives every rank the table
//! (the plan line states its bytes). The synthetic logits of a rank's own
//! queries join its share through [`ShardedQueue::infonce_share_with`].

use crate::loss::Ctx;
use crate::queue::ShardedQueue;
use crate::Result;
use tch::{Kind, Tensor};

/// MoCHi's counts (from `method.*`).
#[derive(Debug, Clone, Copy)]
pub struct Mochi {
    /// Hard negatives H per query.
    pub hard: usize,
    /// Synthetic negatives mixed among the hard ones.
    pub mix_negatives: usize,
    /// Synthetic negatives mixed with the query.
    pub mix_query: usize,
}

/// The mixing of one query: (a, b, α) for each negative pair and (j, β) for
/// each query mix, as positions in its hard-negative list.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    /// Pairs of hard negatives and α ∈ (0, 1).
    pub pairs: Vec<(usize, usize, f64)>,
    /// Hard negatives mixed with the query and β ∈ (0, ½).
    pub query: Vec<(usize, f64)>,
}

/// Stream tag of MoCHi's draws.
const STREAM: u64 = 0x4D6F_4348_694D_6978;

/// A uniform draw in (0, 1) and an index below `n`, from (seed, step, row, k).
fn draw(seed: u64, step: usize, row: usize, k: u64) -> u64 {
    contrast_data::rng::key(&[seed, STREAM, step as u64, row as u64, k])
}

fn unit(x: u64) -> f64 {
    // 53 bits, then kept away from 0.
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

impl Mochi {
    /// Whether MoCHi is on.
    pub fn on(&self) -> bool {
        self.hard > 0 && self.mix_negatives + self.mix_query > 0
    }

    /// Mixed rows per query: two per synthetic negative, one per query mix.
    pub fn mixed(&self) -> usize {
        2 * self.mix_negatives + self.mix_query
    }

    /// Bytes all-reduced per step for a global batch of `n` at width `d` (the f64 table).
    pub fn bytes_per_step(&self, n: usize, d: usize) -> usize {
        n * self.mixed() * d * 8
    }

    /// The mixing of global row `row` at `step` with `hard` hard negatives.
    pub fn plan(&self, seed: u64, step: usize, row: usize, hard: usize) -> RowPlan {
        let h = hard.max(1) as u64;
        let pairs = (0..self.mix_negatives as u64)
            .map(|k| {
                let (a, b) = (draw(seed, step, row, 3 * k) % h, draw(seed, step, row, 3 * k + 1) % h);
                (a as usize, b as usize, unit(draw(seed, step, row, 3 * k + 2)))
            })
            .collect();
        let base = 3 * self.mix_negatives as u64;
        let query = (0..self.mix_query as u64)
            .map(|k| {
                let j = draw(seed, step, row, base + 2 * k) % h;
                (j as usize, 0.5 * unit(draw(seed, step, row, base + 2 * k + 1)))
            })
            .collect();
        RowPlan { pairs, query }
    }

    /// The global top-H queue rows of every query `[N][H]`, hardest first.
    fn hardest(&self, qn: &Tensor, queue: &ShardedQueue, ctx: &Ctx) -> Vec<Vec<i64>> {
        let (n, shard) = (qn.size()[0] as usize, ctx.shard);
        let keys = queue.shard().to_kind(qn.kind());
        let h = self.hard.min(keys.size()[0] as usize);
        let (vals, idx) = qn.detach().matmul(&keys.tr()).topk(h as i64, 1, true, true);
        let rows: Vec<i64> = crate::state::row_shard_indices(queue.blocks() * n, n, shard.rank, shard.world_size)
            .map(|i| i as i64)
            .collect();
        let idx = crate::to_host::<i64>(&idx);
        let ids: Vec<f64> = idx.iter().map(|&j| rows[j as usize] as f64).collect();
        let vals = crate::to_host::<f64>(&vals.to_kind(Kind::Double));
        let all_vals = ctx.reduce.gather_rows(&Tensor::from_slice(&vals).view([1, -1]));
        let all_ids = ctx.reduce.gather_rows(&Tensor::from_slice(&ids).view([1, -1]));
        let (all_vals, all_ids) = (crate::to_host::<f64>(&all_vals), crate::to_host::<f64>(&all_ids));
        let p = shard.world_size;
        (0..n)
            .map(|i| {
                let mut cands: Vec<(f64, i64)> = (0..p)
                    .flat_map(|r| (0..h).map(move |j| r * n * h + i * h + j))
                    .map(|at| (all_vals[at], all_ids[at] as i64))
                    .collect();
                cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                cands.into_iter().take(self.hard).map(|(_, id)| id).collect()
            })
            .collect()
    }

    /// The synthetic logits `[B, mix_negatives + mix_query]` of this rank's own
    /// queries (divided by t; the gradient flows through q·h only).
    pub fn logits(
        &self,
        qn: &Tensor,
        queue: &ShardedQueue,
        seed: u64,
        step: usize,
        t: f64,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (n, d, shard) = (qn.size()[0] as usize, qn.size()[1], ctx.shard);
        let hard = self.hardest(qn, queue, ctx);
        let m = self.mixed();
        let plans: Vec<RowPlan> = (0..n).map(|i| self.plan(seed, step, i, hard[i].len())).collect();
        // The canonical queue row behind each mixed slot, row by row.
        let wanted: Vec<i64> = plans
            .iter()
            .zip(&hard)
            .flat_map(|(p, hd)| {
                let pairs = p.pairs.iter().flat_map(|&(a, b, _)| [hd[a], hd[b]]);
                pairs.chain(p.query.iter().map(|&(j, _)| hd[j])).collect::<Vec<_>>()
            })
            .collect();
        let table = self.gather_rows_of(queue, &wanted, n, d, ctx).view([n as i64, m as i64, d]);
        let (b, off) = (shard.local_batch, shard.offset());
        let own = table.narrow(0, off as i64, b as i64).to_kind(qn.kind());
        let q_own = qn.narrow(0, off as i64, b as i64);
        let (mn, mq) = (self.mix_negatives as i64, self.mix_query as i64);
        // Every own query at once: [B, mix_negatives] α and [B, mix_query] β, as the plans drew them.
        let coef = |f: &dyn Fn(&RowPlan) -> Vec<f64>, k: i64| {
            let v: Vec<f64> = plans[off..off + b].iter().flat_map(f).collect();
            Tensor::from_slice(&v).view([b as i64, k, 1]).to_kind(qn.kind()).to_device(qn.device())
        };
        let alpha = coef(&|p| p.pairs.iter().map(|x| x.2).collect(), mn);
        let beta = coef(&|p| p.query.iter().map(|x| x.1).collect(), mq);
        let pairs = own.narrow(1, 0, 2 * mn).view([b as i64, mn, 2, d]);
        let mixed_pairs = pairs.select(2, 0) * &alpha + pairs.select(2, 1) * (1.0 - &alpha);
        let q = q_own.detach().unsqueeze(1);
        let mixed_query = &q * &beta + own.narrow(1, 2 * mn, mq) * (1.0 - &beta);
        let h = l2_normalize_last(&Tensor::cat(&[mixed_pairs, mixed_query], 1)).detach(); // [B, M', d]
        Ok(h.matmul(&q_own.unsqueeze(2)).squeeze_dim(2) / t)
    }

    /// The queue rows `wanted` (canonical ids) as a `[len, d]` f64 table on every
    /// rank: each owner writes its rows, one all-reduce sums them.
    fn gather_rows_of(&self, queue: &ShardedQueue, wanted: &[i64], n: usize, d: i64, ctx: &Ctx) -> Tensor {
        let shard = ctx.shard;
        let local: std::collections::HashMap<i64, i64> =
            crate::state::row_shard_indices(queue.blocks() * n, n, shard.rank, shard.world_size)
                .enumerate()
                .map(|(j, id)| (id as i64, j as i64))
                .collect();
        // Only the wanted rows this rank holds leave the device.
        let (slots, rows): (Vec<usize>, Vec<i64>) =
            wanted.iter().enumerate().filter_map(|(slot, id)| local.get(id).map(|&j| (slot, j))).unzip();
        let index = Tensor::from_slice(&rows).to_device(queue.shard().device());
        let keys = crate::to_host::<f64>(&queue.shard().index_select(0, &index).to_kind(Kind::Double));
        let (d, mut table) = (d as usize, vec![0f64; wanted.len() * d as usize]);
        for (k, slot) in slots.into_iter().enumerate() {
            table[slot * d..(slot + 1) * d].copy_from_slice(&keys[k * d..(k + 1) * d]);
        }
        ctx.reduce.sum(&mut table);
        Tensor::from_slice(&table).view([wanted.len() as i64, d as i64]).to_device(queue.shard().device())
    }
}

/// L2 normalisation of the last dimension (as `l2_normalize` does for rows).
fn l2_normalize_last(x: &Tensor) -> Tensor {
    let shape = x.size();
    let d = *shape.last().expect("a vector dimension");
    crate::loss::l2_normalize(&x.reshape([-1, d])).view(shape.as_slice())
}
