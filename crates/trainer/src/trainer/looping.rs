//! The training loop: wait for a batch (watched, and interruptible by a stop
//! signal), agree at the opening of each step whether any rank must stop,
//! step, and stop at an agreed step with a checkpoint.

use super::{StepRecord, Trainer};
use crate::watchdog::{self, Phase};
use crate::Summary;
use anyhow::Result;
use contrast_comm::Collective;
use contrast_data::{Next, Pipeline};

impl<C: Collective> Trainer<'_, C> {
    /// Train on every batch of `pipeline`, then write the last checkpoint and
    /// evaluate; returns the summary.
    pub fn run(mut self, pipeline: Pipeline) -> Result<Summary> {
        if self.comm.rank() == 0 && crate::plain_logs() {
            crate::progress::start(self.plan.steps, self.progress.start_step);
        }
        if let Ran::Stopped { done, loss, ranks } = self.train_until(pipeline, self.plan.steps)? {
            return self.stop(done, loss, ranks);
        }
        watchdog::enter(Phase::End, self.plan.steps);
        let p = &self.progress;
        if p.trained_steps > 0 || p.start_step < self.plan.steps {
            self.save(self.plan.steps, p.last_loss)?;
        }
        self.finish(None)
    }

    /// Train on every batch of `pipeline`, whose last step is `until` (a
    /// stretch of the run: population-based augmentation runs each member in
    /// stretches); a stop signal ends it early, every rank after the same step.
    pub fn train_until(&mut self, mut pipeline: Pipeline, until: usize) -> Result<Ran> {
        // The step line's samples/s counts from here, not from the evaluation or stretch before.
        self.log.window = (std::time::Instant::now(), 0);
        loop {
            let done = self.progress.start_step + self.progress.trained_steps;
            if done < until {
                watchdog::enter(Phase::EpochStart, done);
                self.prepare_epoch(done, &mut pipeline)?;
            }
            watchdog::enter(Phase::DataWait, done);
            // A stop signal while this rank waits for data is acted on within 100 ms.
            let next = pipeline.next_batch_or(|| crate::signals::received().is_some());
            watchdog::enter(Phase::Step, done);
            let batch = match next {
                Next::Done => break,
                Next::Batch(b) => Some(b?),
                Next::Interrupted => None,
            };
            // Every step opens with the stop flag of every rank, so that a rank that
            // stopped waiting is met by the others before any collective of the step.
            let stop = [(batch.is_none() || crate::signals::received().is_some()) as u8 as f64];
            let mut ranks = stop;
            self.comm.all_reduce_sum(&mut ranks);
            let Some(batch) = batch.filter(|_| ranks[0] == 0.0) else {
                pipeline.abandon();
                return Ok(Ran::Stopped { done, loss: self.progress.last_loss, ranks: ranks[0].round() as usize });
            };
            let _step = tracing::error_span!("step", step = batch.step + 1).entered();
            let record: StepRecord = self.step(batch, &mut pipeline)?;
            self.after(&record)?;
            if record.stop_ranks > 0 {
                pipeline.abandon();
                return Ok(Ran::Stopped { done: record.done, loss: record.loss, ranks: record.stop_ranks });
            }
        }
        Ok(Ran::Through)
    }

    /// A stop signal reached some rank: every rank is here after the same step,
    /// `done`. Checkpoint it (unless one was just written, or none is new) and
    /// end without the final evaluation.
    fn stop(self, done: usize, loss: f64, ranks: usize) -> Result<Summary> {
        self.checkpoint_stop(done, loss, ranks)?;
        self.finish(Some(done))
    }

    /// [`Trainer::stop`]'s checkpoint and warning, without the summary.
    pub(crate) fn checkpoint_stop(&self, done: usize, loss: f64, ranks: usize) -> Result<()> {
        if let Some(sig) = crate::signals::received() {
            tracing::warn!("rank {} received {}", self.comm.rank(), crate::signals::name(sig));
        }
        let fresh = self.progress.trained_steps > 0 || done == 0;
        if fresh && !self.checkpointer.cadence.due(done, self.plan.steps) {
            self.save(done, loss)?;
        }
        if self.comm.rank() == 0 {
            tracing::warn!(
                "stop signal on {ranks} of {} ranks: stopped after step {done}/{} with a checkpoint; \
                 rerun with train.resume=true to continue",
                self.plan.world_size,
                self.plan.steps
            );
        }
        watchdog::enter(Phase::End, done);
        Ok(())
    }
}

/// How a stretch of training ended.
pub enum Ran {
    /// Every batch of the stretch was trained.
    Through,
    /// A stop signal: every rank stopped after step `done` (`ranks` of them received one).
    Stopped {
        /// The last step trained.
        done: usize,
        /// Its loss.
        loss: f64,
        /// Ranks that received the signal.
        ranks: usize,
    },
}
