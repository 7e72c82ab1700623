//! Worker threads that build host batches ahead of the trainer.
//!
//! The trainer hands out *tickets* (step numbers) through one channel; each
//! worker takes a ticket, builds that step's local batch (decode, augment,
//! tokenise) straight into the batch's buffers and sends it through a bounded
//! result channel. At most `prefetch` batches are in flight or ready, so memory
//! stays bounded; batches are returned in step order whatever the timing. A
//! panicking worker becomes an error on the trainer's side; dropping the
//! pipeline stops and joins the workers.

use crate::augment::Augmenter;
use crate::idx::Images;
use crate::rng::{sample_rng, Stream};
use crate::sampler::Sampler;
use crate::text;
use crate::DataError;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a batch holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Two augmented views of each image (SimCLR).
    TwoViews,
    /// One view of each image and a caption from its class name (CLIP).
    ImageText {
        /// Tokens per caption.
        context: usize,
        /// Class names, indexed by label.
        class_names: Vec<String>,
    },
}

/// One rank's share of one global batch, on the host.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// Global step.
    pub step: usize,
    /// Epoch of the step.
    pub epoch: usize,
    /// Global sample index of each local row.
    pub indices: Vec<usize>,
    /// Image views, each `[B, 1, H, W]` row major.
    pub views: Vec<Vec<f32>>,
    /// Class label of each row.
    pub labels: Vec<i64>,
    /// Caption tokens `[B, context]` (empty unless [`Mode::ImageText`]).
    pub tokens: Vec<i64>,
    /// Time the trainer waited for this batch.
    pub wait: Duration,
}

/// Everything a pipeline needs to know.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Master seed.
    pub seed: u64,
    /// This rank.
    pub rank: usize,
    /// Ranks P.
    pub world_size: usize,
    /// Global batch N.
    pub global_batch: usize,
    /// Worker threads.
    pub workers: usize,
    /// Batches in flight or ready.
    pub prefetch: usize,
    /// First step to produce.
    pub start_step: usize,
    /// One past the last step.
    pub end_step: usize,
    /// Batch contents.
    pub mode: Mode,
}

type Produced = (usize, Result<HostBatch, String>);

/// The running pipeline; iterate it for batches in step order.
pub struct Pipeline {
    tickets: Option<Sender<usize>>,
    results: Option<Receiver<Produced>>,
    pending: BTreeMap<usize, Result<HostBatch, String>>,
    next_step: usize,
    next_ticket: usize,
    end_step: usize,
    workers: Vec<JoinHandle<()>>,
}

struct Worker {
    images: Arc<Images>,
    augment: Augmenter,
    sampler: Sampler,
    cfg: PipelineConfig,
    perm: Option<(usize, Vec<usize>)>,
}

impl Worker {
    fn build(&mut self, step: usize) -> HostBatch {
        let epoch = self.sampler.epoch_of(step);
        if self.perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.perm = Some((epoch, self.sampler.permutation(epoch)));
        }
        let perm = &self.perm.as_ref().unwrap().1;
        let global = self.sampler.global_batch_of(step, perm);
        let indices = Sampler::local_rows(&global, self.cfg.rank, self.cfg.world_size).to_vec();
        let b = indices.len();
        let pix = self.images.height * self.images.width;
        let n_views = match self.cfg.mode {
            Mode::TwoViews => 2,
            Mode::ImageText { .. } => 1,
        };
        let mut views = vec![vec![0f32; b * pix]; n_views];
        let mut labels = Vec::with_capacity(b);
        let ctx = match &self.cfg.mode {
            Mode::ImageText { context, .. } => *context,
            Mode::TwoViews => 0,
        };
        let mut tokens = vec![0i64; b * ctx];
        for (row, &idx) in indices.iter().enumerate() {
            let src = self.images.image(idx);
            for (v, buf) in views.iter_mut().enumerate() {
                let mut rng = sample_rng(self.cfg.seed, epoch as u64, idx as u64, Stream::View as u64 + v as u64);
                self.augment.apply(src, &mut rng, &mut buf[row * pix..(row + 1) * pix]);
            }
            let label = self.images.labels[idx];
            labels.push(label as i64);
            if let Mode::ImageText { class_names, .. } = &self.cfg.mode {
                let mut rng = sample_rng(self.cfg.seed, epoch as u64, idx as u64, Stream::Caption as u64);
                let cap = text::random_caption(&mut rng, &class_names[label as usize % class_names.len()]);
                text::tokenize_into(&cap, &mut tokens[row * ctx..(row + 1) * ctx]);
            }
        }
        HostBatch { step, epoch, indices, views, labels, tokens, wait: Duration::ZERO }
    }
}

impl Pipeline {
    /// Start `cfg.workers` worker threads over `images`.
    pub fn start(images: Arc<Images>, augment: Augmenter, cfg: PipelineConfig) -> Result<Self, DataError> {
        if cfg.world_size == 0 || cfg.global_batch % cfg.world_size != 0 {
            return Err(DataError::Size(format!(
                "global batch {} is not divisible by world size {}",
                cfg.global_batch, cfg.world_size
            )));
        }
        let sampler = Sampler::new(images.len(), cfg.global_batch, cfg.seed)?;
        let prefetch = cfg.prefetch.max(1);
        let (ticket_tx, ticket_rx) = unbounded::<usize>();
        let (result_tx, result_rx) = bounded::<Produced>(prefetch);
        let mut workers = Vec::new();
        for w in 0..cfg.workers.max(1) {
            let mut worker = Worker {
                images: images.clone(),
                augment: augment.clone(),
                sampler: sampler.clone(),
                cfg: cfg.clone(),
                perm: None,
            };
            let (rx, tx) = (ticket_rx.clone(), result_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("data-{w}"))
                .spawn(move || {
                    while let Ok(step) = rx.recv() {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.build(step)))
                            .map_err(|e| {
                                let msg = e
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_else(|| "unknown panic".into());
                                format!("worker data-{w} panicked on step {step}: {msg}")
                            });
                        if tx.send((step, out)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| DataError::Pipeline(format!("cannot spawn worker: {e}")))?;
            workers.push(handle);
        }
        let mut p = Pipeline {
            tickets: Some(ticket_tx),
            results: Some(result_rx),
            pending: BTreeMap::new(),
            next_step: cfg.start_step,
            next_ticket: cfg.start_step,
            end_step: cfg.end_step,
            workers,
        };
        for _ in 0..prefetch {
            p.issue();
        }
        Ok(p)
    }

    fn issue(&mut self) {
        if self.next_ticket < self.end_step {
            if let Some(t) = &self.tickets {
                let _ = t.send(self.next_ticket);
            }
            self.next_ticket += 1;
        }
    }

    /// The next batch in step order, `None` after the last step.
    pub fn next_batch(&mut self) -> Option<Result<HostBatch, DataError>> {
        if self.next_step >= self.end_step {
            return None;
        }
        let start = Instant::now();
        let got = loop {
            if let Some(b) = self.pending.remove(&self.next_step) {
                break b;
            }
            match self.results.as_ref().expect("results").recv() {
                Ok((step, b)) => {
                    self.pending.insert(step, b);
                }
                Err(_) => break Err("all workers stopped".into()),
            }
        };
        self.next_step += 1;
        self.issue();
        Some(got.map_err(DataError::Pipeline).map(|mut b| {
            b.wait = start.elapsed();
            b
        }))
    }
}

impl Iterator for Pipeline {
    type Item = Result<HostBatch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.tickets.take();
        self.results.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::AugParams;

    fn images(n: usize) -> Arc<Images> {
        let pixels = (0..n * 64).map(|i| ((i * 37) % 251) as u8).collect();
        Arc::new(Images { pixels, labels: (0..n).map(|i| (i % 10) as u8).collect(), height: 8, width: 8 })
    }

    fn aug() -> Augmenter {
        let params = AugParams {
            crop_scale: Some([0.3, 1.0]),
            crop_ratio: [0.75, 1.33],
            flip_prob: 0.5,
            jitter_prob: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            blur_prob: 0.5,
            blur_sigma: [0.1, 1.0],
            mean_std: (0.5, 0.5),
        };
        Augmenter { params, height: 8, width: 8 }
    }

    fn run(world: usize, workers: usize, mode: Mode) -> Vec<Vec<HostBatch>> {
        (0..world)
            .map(|rank| {
                let cfg = PipelineConfig {
                    seed: 11,
                    rank,
                    world_size: world,
                    global_batch: 12,
                    workers,
                    prefetch: 3,
                    start_step: 2,
                    end_step: 9,
                    mode: mode.clone(),
                };
                Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
            })
            .collect()
    }

    #[test]
    fn batches_are_identical_whatever_world_size_and_workers() {
        let one = run(1, 1, Mode::TwoViews);
        for (world, workers) in [(2, 1), (3, 3), (4, 2)] {
            let many = run(world, workers, Mode::TwoViews);
            for (s, b1) in one[0].iter().enumerate() {
                let mut idx: Vec<usize> = Vec::new();
                let mut v0: Vec<f32> = Vec::new();
                for rank in &many {
                    assert_eq!(rank[s].step, b1.step);
                    idx.extend(&rank[s].indices);
                    v0.extend(&rank[s].views[0]);
                }
                assert_eq!(idx, b1.indices);
                assert_eq!(v0, b1.views[0], "view bytes differ at world {world}, workers {workers}");
            }
        }
        let steps: Vec<usize> = one[0].iter().map(|b| b.step).collect();
        assert_eq!(steps, (2..9).collect::<Vec<_>>());
        assert_ne!(one[0][0].views[0], one[0][0].views[1]);
    }

    #[test]
    fn captions_follow_labels() {
        let mode = Mode::ImageText { context: 48, class_names: (0..10).map(|c| format!("class{c}")).collect() };
        let b = &run(1, 2, mode)[0][0];
        assert_eq!(b.views.len(), 1);
        for (row, &label) in b.labels.iter().enumerate() {
            let toks = &b.tokens[row * 48..(row + 1) * 48];
            let text: String = toks[1..].iter().take_while(|&&t| t < 256 && t > 0).map(|&t| t as u8 as char).collect();
            assert!(text.contains(&format!("class{label}")), "{text}");
        }
    }

    #[test]
    fn early_drop_does_not_hang() {
        let cfg = PipelineConfig {
            seed: 0,
            rank: 0,
            world_size: 1,
            global_batch: 4,
            workers: 2,
            prefetch: 2,
            start_step: 0,
            end_step: 1000,
            mode: Mode::TwoViews,
        };
        let mut p = Pipeline::start(images(50), aug(), cfg).unwrap();
        assert!(p.next_batch().unwrap().is_ok());
        drop(p);
    }

    #[test]
    fn worker_panic_becomes_an_error() {
        // Labels beyond the class list are fine; an empty class list panics (modulo by zero).
        let mode = Mode::ImageText { context: 8, class_names: vec![] };
        let cfg = PipelineConfig {
            seed: 0,
            rank: 0,
            world_size: 1,
            global_batch: 4,
            workers: 1,
            prefetch: 1,
            start_step: 0,
            end_step: 3,
            mode,
        };
        let mut p = Pipeline::start(images(50), aug(), cfg).unwrap();
        let err = p.next_batch().unwrap().unwrap_err().to_string();
        assert!(err.contains("panicked"), "{err}");
    }
}
