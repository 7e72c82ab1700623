//! Worker threads that build host batches ahead of the trainer.
//!
//! The trainer hands out *tickets* (step numbers) through one channel; each
//! worker takes a ticket, builds that step's local batch (decode, augment,
//! tokenise) straight into the batch's buffers and sends it through a bounded
//! result channel. At most `prefetch` batches are in flight or ready, so memory
//! stays bounded; batches are returned in step order whatever the timing. A
//! panicking worker becomes an error on the trainer's side; dropping the
//! pipeline stops and joins the workers.
//!
//! Batch buffers are recycled: the trainer hands a consumed batch back with
//! [`Pipeline::recycle`] and a worker fills the same allocations for a later
//! step, so a steady-state run allocates no batch memory (every element is
//! overwritten, so a recycled buffer cannot leak old values).
//!
//! An epoch is drawn by a [`Sampling`] (uniform, per-item weights, or
//! pseudo-classes). A *gated* epoch ([`PipelineConfig::gated_epochs`]) gets its
//! sampling from the trainer after the method's start of the epoch
//! ([`Pipeline::open_epoch`]); until then no ticket of it is issued, so
//! prefetch stops at its first step.

use crate::augment::Augmenter;
use crate::idx::Images;
use crate::mix::MixConfig;
use crate::rgb::{RgbAugParams, RgbAugmenter};
use crate::sampler::{Sampler, Sampling};
use crate::source::Source;
use crate::text;
use crate::DataError;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a batch holds.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Augmented views of each image: two for IDX input; one per augmentation
    /// of the preset for file input (two for SimCLR, 2 + N for multi-crop).
    Views,
    /// One view of each image and a caption (the sample's own, or from its class name) (CLIP).
    ImageText {
        /// Tokens per caption.
        context: usize,
        /// Byte-level or Hugging Face tokenizer.
        tokenizer: Arc<text::Tokenizer>,
        /// Class names, indexed by label.
        class_names: Vec<String>,
        /// Caption augmentation.
        text: TextAug,
    },
    /// Sentences and no view ([`Input::Lines`]): one caption per row, or two
    /// (a sentence and the next one of its group) for pairs.
    Text {
        /// Tokens per caption.
        context: usize,
        /// Byte-level or Hugging Face tokenizer.
        tokenizer: Arc<text::Tokenizer>,
        /// Caption augmentation.
        text: TextAug,
    },
}

/// Caption augmentation of [`Mode::ImageText`], keyed on (seed, epoch, global index).
#[derive(Debug, Clone, Default)]
pub struct TextAug {
    /// EDA with this synonym table and strength α.
    pub eda: Option<(Arc<crate::textaug::Synonyms>, f64)>,
    /// Cutoff of this kind and ratio, on the tokens.
    pub cutoff: Option<(crate::textaug::Cutoff, f64)>,
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
    /// Image views, each `[B, C, H, W]` row major (C = 1 for IDX, 3 for decoded
    /// files; multi-crop views have their own H and W).
    pub views: Vec<Vec<f32>>,
    /// Class label of each row.
    pub labels: Vec<i64>,
    /// Caption tokens `[B, m, context]`, m captions per row (empty without captions).
    pub tokens: Vec<i64>,
    /// Position of each caption's last token `[B, m]`, where the text tower pools (empty without captions).
    pub text_end: Vec<i64>,
    /// Time the trainer waited for this batch.
    pub wait: Duration,
    /// Source indices that could not be read or decoded while this batch was
    /// built (sorted, distinct): a function of (seed, step, rank) only, whatever
    /// the worker count or timing. The trainer gathers them into the run's
    /// [`BadBudget`].
    pub bad: Vec<usize>,
    /// The mixing of the whole global batch, when mixing is on: partner π(i) and λ_i of every global row.
    pub mix: Option<(Vec<i64>, Vec<f64>)>,
}

/// Where samples come from and how they are augmented (a clone shares the data).
#[derive(Clone)]
pub enum Input {
    /// IDX images (grayscale, 28×28) with the grayscale augmenter.
    Idx {
        /// The images.
        images: Arc<Images>,
        /// One augmentation per view (output sizes may differ: multi-crop).
        augment: Vec<Augmenter>,
    },
    /// Encoded image files (folder, CSV, WebDataset) decoded to RGB.
    Files {
        /// The files.
        source: Arc<dyn Source>,
        /// One augmentation per view (output `3 × size × size`, sizes may differ: multi-crop).
        augment: Vec<RgbAugParams>,
        /// Stop with an error when more than this fraction of the samples is bad.
        max_bad_fraction: f64,
    },
    /// Sentences ([`Mode::Text`]): an item is a sentence, or with `pairs` a
    /// sentence followed by one of its group (the items are `corpus.anchors`).
    Lines {
        /// The sentences.
        corpus: Arc<crate::lines::Corpus>,
        /// Items are adjacent pairs (Quick-Thought).
        pairs: bool,
    },
}

impl Input {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            Input::Idx { images, .. } => images.len(),
            Input::Files { source, .. } => source.len(),
            Input::Lines { corpus, pairs: true } => corpus.anchors.len(),
            Input::Lines { corpus, pairs: false } => corpus.len(),
        }
    }

    /// Captions of one row in [`Mode::Text`]: 2 for pairs, else 1.
    pub fn captions_per_row(&self) -> usize {
        match self {
            Input::Lines { pairs: true, .. } => 2,
            _ => 1,
        }
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the ranks must agree on: the dataset's fingerprint (for IDX, its
    /// sizes, labels and pixels; for files, [`Source::fingerprint`]).
    pub fn fingerprint(&self) -> u64 {
        match self {
            Input::Idx { images, .. } => {
                let dims = [images.len() as u64, images.height as u64, images.width as u64].map(u64::to_le_bytes);
                crate::fingerprint(dims.iter().map(|d| &d[..]).chain([&images.labels[..], &images.pixels[..]]))
            }
            Input::Files { source, .. } => source.fingerprint(),
            Input::Lines { corpus, pairs } => corpus.fingerprint() ^ u64::from(*pairs),
        }
    }

    /// `data.max_bad_fraction` of a file input (0 for IDX, which has no bad samples).
    pub fn max_bad_fraction(&self) -> f64 {
        match self {
            Input::Idx { .. } | Input::Lines { .. } => 0.0,
            Input::Files { max_bad_fraction, .. } => *max_bad_fraction,
        }
    }

    /// Views per sample in [`Mode::Views`].
    pub fn views(&self) -> usize {
        match self {
            Input::Idx { augment, .. } => augment.len(),
            Input::Files { augment, .. } => augment.len(),
            Input::Lines { .. } => 0,
        }
    }

    /// Floats of view `k` of one sample (channels × height × width).
    pub fn view_len(&self, k: usize) -> usize {
        let (c, h, w) = self.view_shape(k);
        c * h * w
    }

    /// Shape of view `k`: channels, height, width.
    pub fn view_shape(&self, k: usize) -> (usize, usize, usize) {
        match self {
            Input::Idx { augment, .. } => {
                let a = &augment[k.min(augment.len() - 1)];
                (1, a.out_height, a.out_width)
            }
            Input::Files { augment, .. } => {
                let s = augment[k.min(augment.len() - 1)].size as usize;
                (3, s, s)
            }
            Input::Lines { .. } => (0, 0, 0),
        }
    }
}

/// The bad samples this process has logged (shared by a pipeline's workers,
/// so each is logged once; the count that matters is [`BadBudget`]'s).
#[derive(Default)]
struct BadFiles {
    seen: Mutex<HashSet<usize>>,
}

impl BadFiles {
    /// Log sample `i` the first time it is met.
    fn log(&self, i: usize, what: &str) {
        if self.seen.lock().unwrap().insert(i) {
            tracing::warn!("skipping unreadable sample {i} ({what}); a deterministic replacement takes its place");
        }
    }
}

/// The run's budget of unreadable samples: the distinct source indices met by
/// every rank since the run began, against `data.max_bad_fraction` of the
/// dataset. Every rank adds the same gathered indices at the same step, so
/// every rank stops at the same step, whatever the worker timing.
#[derive(Debug, Clone, Default)]
pub struct BadBudget {
    seen: std::collections::BTreeSet<usize>,
    limit: f64,
    len: usize,
}

impl BadBudget {
    /// A budget of `limit` × `len` samples, starting from those `seen` before (a resume).
    pub fn new(limit: f64, len: usize, seen: impl IntoIterator<Item = usize>) -> Self {
        Self { seen: seen.into_iter().collect(), limit, len }
    }

    /// Add the bad samples of one step (all ranks'); an error once more than the budget are bad.
    pub fn add(&mut self, indices: impl IntoIterator<Item = usize>) -> Result<(), String> {
        self.seen.extend(indices);
        if self.seen.len() as f64 > self.limit * self.len as f64 {
            return Err(format!(
                "{} of {} samples are unreadable (limit data.max_bad_fraction = {})",
                self.seen.len(),
                self.len,
                self.limit
            ));
        }
        Ok(())
    }

    /// Distinct bad samples so far.
    pub fn count(&self) -> usize {
        self.seen.len()
    }

    /// The bad samples so far, ascending (checkpointed so a resume keeps counting).
    pub fn seen(&self) -> Vec<usize> {
        self.seen.iter().copied().collect()
    }
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
    /// Batch-level Mixup/CutMix of the first `views` views (None: no mixing).
    pub mix: Option<(MixConfig, usize)>,
    /// Shuffle-BN: this view's rows are those of [`Sampler::shuffle_order`]
    /// (rank r gets the view of global rows `order[r·B..(r+1)·B]`); None: no shuffle.
    pub shuffle_view: Option<usize>,
    /// Epochs whose batches wait for [`Pipeline::open_epoch`]: none is built
    /// (prefetch stops at the epoch's first step) until the trainer has run the
    /// method's start of that epoch and hands over the epoch's [`Sampling`].
    /// Every other epoch is a uniform permutation, prefetched across the boundary.
    pub gated_epochs: BTreeSet<usize>,
}

/// A step to build, with the sampling of its epoch.
type Ticket = (usize, Arc<Sampling>);

type Produced = (usize, Result<HostBatch, String>);

/// The allocations of one batch, handed back by the trainer for reuse.
#[derive(Default)]
struct Buffers {
    indices: Vec<usize>,
    views: Vec<Vec<f32>>,
    labels: Vec<i64>,
    tokens: Vec<i64>,
    text_end: Vec<i64>,
}

/// The running pipeline; iterate it for batches in step order.
pub struct Pipeline {
    tickets: Option<Sender<Ticket>>,
    results: Option<Receiver<Produced>>,
    pending: BTreeMap<usize, Result<HostBatch, String>>,
    next_step: usize,
    next_ticket: usize,
    end_step: usize,
    prefetch: usize,
    sampler: Sampler,
    /// Epochs that wait for [`Pipeline::open_epoch`], and the samplings handed over.
    gated: BTreeSet<usize>,
    opened: BTreeMap<usize, Arc<Sampling>>,
    workers: Vec<JoinHandle<()>>,
    pool: Sender<Buffers>,
    allocated: Arc<AtomicUsize>,
}

impl Pipeline {
    /// Start `cfg.workers` worker threads over `images` (IDX input), two views with `augment`.
    pub fn start(images: Arc<Images>, augment: Augmenter, cfg: PipelineConfig) -> Result<Self, DataError> {
        Self::start_input(Input::Idx { images, augment: vec![augment; 2] }, cfg)
    }

    /// Start `cfg.workers` worker threads over any input.
    pub fn start_input(input: Input, cfg: PipelineConfig) -> Result<Self, DataError> {
        Self::start_scheduled(input, cfg, None)
    }

    /// [`Pipeline::start_input`] with a RandAugment schedule: the views of
    /// step s take RandAugment's (N, M) of `schedule.at(s)` instead of their own.
    pub fn start_scheduled(
        input: Input,
        cfg: PipelineConfig,
        schedule: Option<Arc<crate::schedule::RandAugSchedule>>,
    ) -> Result<Self, DataError> {
        if let Some((m, _)) = &cfg.mix {
            let b = cfg.global_batch / cfg.world_size.max(1);
            if m.group == 0 || b % m.group != 0 || !(m.alpha > 0.0) {
                return Err(DataError::Size(format!(
                    "mixing groups of {} rows must divide the local batch {b} (and alpha {} must be > 0)",
                    m.group, m.alpha
                )));
            }
        }
        if cfg.world_size == 0 || cfg.global_batch % cfg.world_size != 0 {
            return Err(DataError::Size(format!(
                "global batch {} is not divisible by world size {}",
                cfg.global_batch, cfg.world_size
            )));
        }
        let sampler = Sampler::new(input.len(), cfg.global_batch, cfg.seed)?;
        let input = Arc::new(input);
        let bad = Arc::new(BadFiles::default());
        let prefetch = cfg.prefetch.max(1);
        let (ticket_tx, ticket_rx) = unbounded::<Ticket>();
        let (result_tx, result_rx) = bounded::<Produced>(prefetch);
        // Room for every batch that can be alive at once: ready, being built, and held by the trainer.
        let (pool_tx, pool_rx) = bounded::<Buffers>(prefetch + cfg.workers.max(1) + 1);
        let allocated = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..cfg.workers.max(1) {
            let rgb = match &*input {
                Input::Files { augment, .. } => augment.iter().cloned().map(RgbAugmenter::new).collect(),
                Input::Idx { .. } | Input::Lines { .. } => Vec::new(),
            };
            let worker = Worker {
                input: input.clone(),
                rgb,
                bad: bad.clone(),
                batch_bad: Vec::new(),
                sampler: sampler.clone(),
                cfg: cfg.clone(),
                schedule: schedule.clone(),
                step: 0,
                perm: None,
                pool: pool_rx.clone(),
                allocated: allocated.clone(),
            };
            let (rx, tx) = (ticket_rx.clone(), result_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("data-{w}"))
                .spawn(move || worker.serve(w, rx, tx))
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
            prefetch,
            sampler,
            gated: cfg.gated_epochs.clone(),
            opened: BTreeMap::new(),
            workers,
            pool: pool_tx,
            allocated,
        };
        p.fill();
        Ok(p)
    }

    /// The sampling of `epoch`, or None while it waits for [`Pipeline::open_epoch`].
    fn sampling_of(&self, epoch: usize) -> Option<Arc<Sampling>> {
        match self.gated.contains(&epoch) {
            true => self.opened.get(&epoch).cloned(),
            false => Some(Arc::new(Sampling::Uniform)),
        }
    }

    /// Keep `prefetch` steps in flight or ready, up to the first step whose epoch waits.
    fn fill(&mut self) {
        // The sampling of the epoch the last ticket fell in, so one Arc serves a whole epoch.
        let mut current: Option<(usize, Arc<Sampling>)> = None;
        while self.next_ticket < self.end_step && self.next_ticket < self.next_step + self.prefetch {
            let epoch = self.sampler.epoch_of(self.next_ticket);
            let sampling = match &current {
                Some((e, s)) if *e == epoch => s.clone(),
                _ => match self.sampling_of(epoch) {
                    Some(s) => s,
                    None => return,
                },
            };
            current = Some((epoch, sampling.clone()));
            if let Some(t) = &self.tickets {
                let _ = t.send((self.next_ticket, sampling));
            }
            self.next_ticket += 1;
        }
    }

    /// Whether `epoch` still waits for [`Pipeline::open_epoch`].
    pub fn waits_for(&self, epoch: usize) -> bool {
        self.gated.contains(&epoch) && !self.opened.contains_key(&epoch)
    }

    /// Let the batches of a gated epoch be built, drawn by `sampling` (checked
    /// against the training set). An epoch that is not gated, or was opened
    /// already, is refused: some of its batches may have been built.
    pub fn open_epoch(&mut self, epoch: usize, sampling: Sampling) -> Result<(), DataError> {
        if !self.waits_for(epoch) {
            return Err(DataError::Pipeline(format!(
                "epoch {epoch} does not wait for a sampling (it is not gated, or was opened before)"
            )));
        }
        sampling.check(self.sampler.dataset_len())?;
        self.opened.retain(|&e, _| e + 1 >= epoch);
        self.opened.insert(epoch, Arc::new(sampling));
        self.fill();
        Ok(())
    }

    /// Hand a consumed batch back: a worker refills its buffers for a later step.
    pub fn recycle(&self, batch: HostBatch) {
        let HostBatch { indices, views, labels, tokens, text_end, .. } = batch;
        let _ = self.pool.try_send(Buffers { indices, views, labels, tokens, text_end });
    }

    /// Batch buffer sets allocated so far (not recycled ones); bounded by
    /// `prefetch + workers + 1` when every batch is recycled.
    pub fn allocated_batches(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// The next batch in step order, `None` after the last step.
    pub fn next_batch(&mut self) -> Option<Result<HostBatch, DataError>> {
        match self.next_batch_or(|| false) {
            Next::Batch(b) => Some(b),
            Next::Done | Next::Interrupted => None,
        }
    }

    /// The next batch, or [`Next::Interrupted`] when `interrupt` (polled every
    /// 100 ms while waiting) says to stop waiting; the step is then still the next.
    pub fn next_batch_or(&mut self, mut interrupt: impl FnMut() -> bool) -> Next {
        if self.next_step >= self.end_step {
            return Next::Done;
        }
        let epoch = self.sampler.epoch_of(self.next_step);
        if self.waits_for(epoch) {
            let why =
                format!("step {} waits for epoch {epoch} to be opened (Pipeline::open_epoch)", self.next_step + 1);
            return Next::Batch(Err(DataError::Pipeline(why)));
        }
        let start = Instant::now();
        let got = loop {
            if let Some(b) = self.pending.remove(&self.next_step) {
                break b;
            }
            match self.results.as_ref().expect("results").recv_timeout(std::time::Duration::from_millis(100)) {
                Ok((step, b)) => {
                    self.pending.insert(step, b);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if interrupt() => return Next::Interrupted,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err("all workers stopped".into()),
            }
        };
        self.next_step += 1;
        self.fill();
        Next::Batch(got.map_err(DataError::Pipeline).map(|mut b| {
            b.wait = start.elapsed();
            b
        }))
    }

    /// Stop without waiting for the workers: a worker blocked in a read that
    /// never returns would make a join (and so `Drop`) wait forever. The
    /// workers end when they next look at their channels, or with the process.
    pub fn abandon(mut self) {
        self.tickets.take();
        self.results.take();
        self.workers.clear();
    }
}

/// What [`Pipeline::next_batch_or`] found.
pub enum Next {
    /// The next step's batch (or why it could not be built).
    Batch(Result<HostBatch, DataError>),
    /// Every step's batch was handed out.
    Done,
    /// The wait was interrupted; the step is still the next.
    Interrupted,
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
mod tests;
mod worker;

use worker::Worker;
