//! What population-based augmentation asks of a member's loop besides
//! training: where it stands, a checkpoint at a round's step, its kNN top-1 on
//! the held-out images, taking over another member's state, and its summary.

use super::{Evaluator, Trainer};
use crate::checkpoint;
use crate::eval::{self, EvalData, EvalSet};
use crate::Summary;
use anyhow::{Context, Result};
use contrast_comm::Collective;
use std::path::Path;
use tch::Tensor;

impl<C: Collective> Trainer<'_, C> {
    /// The communicator the loop trains on.
    pub fn comm(&self) -> &C {
        self.comm
    }

    /// Steps trained so far (resumed and this invocation's).
    pub fn done(&self) -> usize {
        self.progress.start_step + self.progress.trained_steps
    }

    /// The loss of the last step (NaN before any).
    pub fn last_loss(&self) -> f64 {
        self.progress.last_loss
    }

    /// Checkpoint the step reached, unless the checkpointer's cadence wrote it already.
    pub fn checkpoint_now(&self) -> Result<()> {
        let done = self.done();
        if !self.checkpointer.cadence.due(done, self.plan.steps) || self.progress.trained_steps == 0 {
            self.save(done, self.progress.last_loss)?;
        }
        Ok(())
    }

    /// Weighted kNN top-1 of the backbone on `queries` with `memory` as the
    /// neighbours (`eval.knn_k`, `eval.knn_t`); 0 when either has no label.
    pub fn knn_top1_on(&self, memory: &EvalSet, queries: &EvalSet) -> f64 {
        let (e, method) = (&self.plan.config.eval, self.method.as_ref());
        let dim = method.backbone().out_dim();
        let f = |x: &Tensor| method.features(x);
        eval::knn_of(self.comm, memory, queries, self.device, dim, e.knn_k, e.knn_t, f).map_or(0.0, |(a, _)| a[0])
    }

    /// Take the weights and optimiser state of the checkpoint `from` (another
    /// member's, at this member's step), then checkpoint them as this member's.
    pub fn adopt(&mut self, from: &Path) -> Result<()> {
        let (model, optim) = (self.method.state(), super::optim_items(&self.opt));
        let done = self.done();
        let accept = |st: &checkpoint::State| {
            anyhow::ensure!(st.step == done, "{} is at step {}, this member at {done}", from.display(), st.step);
            Ok(())
        };
        let find = || Ok(Some(from.to_path_buf()));
        let loaded = checkpoint::load(self.comm, find, accept, &model, Some(&optim))?
            .with_context(|| format!("no checkpoint at {}", from.display()))?;
        let (rank, p) = (self.comm.rank(), self.comm.world_size());
        self.method.load_state(&loaded.model, rank, p).with_context(|| from.display().to_string())?;
        let optim: Vec<(String, Tensor)> = loaded.optim.into_iter().collect();
        self.opt.load_state(&optim).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
        self.save(done, self.progress.last_loss)
    }

    /// Evaluate at the end with `data` (the run's evaluation), as a run that evaluates would.
    pub fn evaluate_at_end(&mut self, data: EvalData) {
        self.evaluator = Some(Evaluator { data, cadence: super::Cadence { every: 0 }, at_end: true });
    }

    /// The member's summary (with the final evaluation when one was attached),
    /// written to its own directory without a word on the console; `stopped_at`
    /// is where a stop signal ended it.
    pub fn summary(self, stopped_at: Option<usize>) -> Result<Summary> {
        let (comm, dir) = (self.comm, self.plan.config.checkpoint.dir.clone());
        let summary = self.final_summary(stopped_at)?;
        if comm.rank() == 0 {
            let path = dir.join(crate::rundir::SUMMARY_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(summary)
    }
}
