//! The start of an epoch: the method's `on_epoch`, with a feature pass over the
//! un-augmented training set when it asks for one. The pass splits the items
//! as `Layout::ItemSharded` does (item i on rank i mod P) and gathers nothing:
//! each rank hands its method its own rows.

use super::Trainer;
use anyhow::Result;
use contrast_comm::Collective;
use contrast_nn::method::EpochCtx;
use contrast_nn::state::{item_indices, item_rows};
use tch::{Kind, Tensor};

/// Images per forward pass of the feature pass.
const CHUNK: usize = 500;

impl<C: Collective> Trainer<'_, C> {
    /// Run the method's start of `epoch` (every rank at the same step).
    pub(super) fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        let features = match self.method.wants_features(epoch) {
            true => Some(self.feature_pass()?),
            false => None,
        };
        let (rank, world_size) = (self.comm.rank(), self.comm.world_size());
        let mut ctx = EpochCtx { epoch, rank, world_size, comm: self.comm, features };
        self.method.on_epoch(&mut ctx)?;
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
                    contrast_nn::loss::l2_normalize(&method.features(&x).to_kind(Kind::Float))
                })
                .collect()
        });
        let dim = self.method.backbone().out_dim();
        Ok(match parts.is_empty() {
            true => Tensor::zeros([item_rows(n, rank, p) as i64, dim], (Kind::Float, device)),
            false => Tensor::cat(&parts, 0),
        })
    }
}
