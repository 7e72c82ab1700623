//! The start of an epoch: the method's `on_epoch`, with a feature pass over the
//! un-augmented training set when it asks for one, then the epoch's sampling
//! handed to the pipeline when the method gates the epoch (its batches are not
//! built before, so they may depend on what `on_epoch` computed; every rank
//! must hand over the same sampling, which is checked). The pass splits the
//! items as `Layout::ItemSharded` does (item i on rank i mod P) and gathers
//! nothing: each rank hands its method its own rows.

use super::Trainer;
use anyhow::{Context, Result};
use contrast_comm::Collective;
use contrast_data::Pipeline;
use contrast_nn::method::EpochCtx;
use contrast_nn::state::item_indices;
use std::collections::BTreeSet;
use tch::{Kind, Tensor};

/// Images per forward pass of the feature pass.
const CHUNK: usize = 500;

impl<C: Collective> Trainer<'_, C> {
    /// Before the batch of step `step` (0-based) is asked for: when it opens an
    /// epoch, run the method's start of it (every rank at the same step); when
    /// the pipeline waits for that epoch (a gated epoch, or a resume into one),
    /// hand it the method's sampling.
    pub(super) fn prepare_epoch(&mut self, step: usize, pipeline: &mut Pipeline) -> Result<()> {
        let epoch = self.sampler.epoch_of(step);
        let context = || format!("epoch {epoch} starting at step {}", step + 1);
        if self.progress.epoch != Some(epoch) {
            self.start_epoch(epoch).with_context(context)?;
        }
        if pipeline.waits_for(epoch) {
            let sampling = self.method.sampling(self.comm).with_context(context)?.unwrap_or_default();
            // Ranks drawing different batches would train on no global batch at all: refuse.
            let all = self.comm.all_gather(&[sampling.fingerprint() as i64]);
            if let Some(r) = all.iter().position(|&h| h != all[0]) {
                anyhow::bail!(
                    "{}: rank {r}'s sampling differs from rank 0's (a method's sampling must be equal on every rank)",
                    context()
                );
            }
            pipeline.open_epoch(epoch, sampling).with_context(context)?;
        }
        Ok(())
    }

    /// The epochs from `start_step` on whose batches wait for the method's start of the epoch.
    pub fn gated_epochs(&self, start_step: usize) -> BTreeSet<usize> {
        let steps = self.plan.steps;
        let epochs = match start_step < steps {
            true => self.sampler.epoch_of(start_step)..=self.sampler.epoch_of(steps - 1),
            false => return BTreeSet::new(),
        };
        epochs.filter(|&e| self.method.gates_epoch(e)).collect()
    }

    /// Run the method's start of `epoch` (every rank at the same step).
    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        let features = match self.method.wants_features(epoch) {
            true => Some(self.feature_pass()?),
            false => None,
        };
        let (rank, world_size) = (self.comm.rank(), self.comm.world_size());
        let mut ctx = EpochCtx { epoch, rank, world_size, comm: self.comm, features };
        self.method.on_epoch(&mut ctx)?;
        self.opt.restart(&self.method.restarts()).map_err(|e| anyhow::anyhow!("method {}: {e}", self.method.name()))?;
        self.progress.epoch = Some(epoch);
        Ok(())
    }

    /// This rank's L2-normalised features of items rank, rank + P, … of the
    /// training set through the evaluation transform (`[item_rows, D]`).
    fn feature_pass(&mut self) -> Result<Tensor> {
        if self.train_set.is_none() {
            self.train_set = Some(crate::data::embed_set(&self.plan, false)?.0);
        }
        let set = self.train_set.as_ref().expect("opened above");
        let (n, rank, p) = (set.len(), self.comm.rank(), self.comm.world_size());
        anyhow::ensure!(
            n == self.sampler.dataset_len(),
            "the feature pass sees {n} training items, the sampler {}",
            self.sampler.dataset_len()
        );
        let items: Vec<usize> = item_indices(n, rank, p).collect();
        let (method, device) = (self.method.as_ref(), self.device);
        let parts: Vec<Tensor> = tch::no_grad(|| {
            items
                .chunks(CHUNK)
                .map(|which| {
                    // An unreadable item (logged by the set) is a blank image; its label is no guide
                    // (a caption CSV has none), so nothing else marks it.
                    let (x, _labels) = set.batch_of(which, device);
                    contrast_nn::loss::l2_normalize(&method.pass_features(&x).to_kind(Kind::Float))
                })
                .collect()
        });
        Ok(match parts.is_empty() {
            // A rank with no item (fewer items than ranks): no rows, of the width one image gives.
            true => tch::no_grad(|| {
                method.pass_features(&set.batch_of(&[0], device).0).narrow(0, 0, 0).to_kind(Kind::Float)
            }),
            false => Tensor::cat(&parts, 0),
        })
    }
}
