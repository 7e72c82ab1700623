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

use crate::augment::Augmenter;
use crate::idx::Images;
use crate::mix::{apply_mix, mix_plan, MixConfig};
use crate::rgb::{decode, RgbAugParams, RgbAugmenter};
use crate::rng::{key, sample_rng, Stream};
use crate::sampler::Sampler;
use crate::source::Source;
use crate::text;
use crate::DataError;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::collections::{BTreeMap, HashSet};
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
    /// Image views, each `[B, 1, H, W]` row major.
    pub views: Vec<Vec<f32>>,
    /// Class label of each row.
    pub labels: Vec<i64>,
    /// Caption tokens `[B, context]` (empty unless [`Mode::ImageText`]).
    pub tokens: Vec<i64>,
    /// Position of each caption's last token, where the text tower pools (empty unless [`Mode::ImageText`]).
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

/// Where samples come from and how they are augmented.
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
}

impl Input {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            Input::Idx { images, .. } => images.len(),
            Input::Files { source, .. } => source.len(),
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
        }
    }

    /// `data.max_bad_fraction` of a file input (0 for IDX, which has no bad samples).
    pub fn max_bad_fraction(&self) -> f64 {
        match self {
            Input::Idx { .. } => 0.0,
            Input::Files { max_bad_fraction, .. } => *max_bad_fraction,
        }
    }

    /// Views per sample in [`Mode::Views`].
    pub fn views(&self) -> usize {
        match self {
            Input::Idx { augment, .. } => augment.len(),
            Input::Files { augment, .. } => augment.len(),
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
}

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
    tickets: Option<Sender<usize>>,
    results: Option<Receiver<Produced>>,
    pending: BTreeMap<usize, Result<HostBatch, String>>,
    next_step: usize,
    next_ticket: usize,
    end_step: usize,
    workers: Vec<JoinHandle<()>>,
    pool: Sender<Buffers>,
    allocated: Arc<AtomicUsize>,
}

struct Worker {
    input: Arc<Input>,
    rgb: Vec<RgbAugmenter>,
    bad: Arc<BadFiles>,
    /// Source indices that failed while building the current batch.
    batch_bad: Vec<usize>,
    sampler: Sampler,
    cfg: PipelineConfig,
    perm: Option<(usize, Vec<usize>)>,
    pool: Receiver<Buffers>,
    allocated: Arc<AtomicUsize>,
}

/// Replacements tried for a bad sample before giving up.
const MAX_REPLACEMENTS: u64 = 16;

impl Worker {
    /// Views, label and caption of sample `idx` written into `views` (one slice per view).
    fn sample(&mut self, idx: usize, epoch: usize, views: &mut [&mut [f32]]) -> Result<(i64, Option<String>), String> {
        let seed = self.cfg.seed;
        let view_rng = |v: usize| sample_rng(seed, epoch as u64, idx as u64, Stream::View as u64 + v as u64);
        match &*self.input {
            Input::Idx { images, augment } => {
                let src = images.image(idx);
                for (v, buf) in views.iter_mut().enumerate() {
                    augment[v.min(augment.len() - 1)].apply(src, &mut view_rng(v), buf);
                }
                Ok((images.labels[idx] as i64, None))
            }
            Input::Files { source, .. } => {
                let raw = source.fetch(idx)?;
                let img = decode(&raw.bytes).map_err(|e| format!("{}: {e}", source.locate(idx)))?;
                for (v, buf) in views.iter_mut().enumerate() {
                    let last = self.rgb.len() - 1;
                    let aug = &mut self.rgb[v.min(last)];
                    aug.apply(&img, &mut view_rng(v), buf).map_err(|e| format!("{}: {e}", source.locate(idx)))?;
                }
                Ok((raw.label, raw.caption))
            }
        }
    }

    /// Sample `idx`, or its replacements when it cannot be read (chosen from (seed,
    /// epoch, index, attempt) only); `sample` fills the buffers of one source index.
    fn with_replacement<T>(
        &mut self,
        idx: usize,
        epoch: usize,
        mut sample: impl FnMut(&mut Self, usize) -> Result<T, String>,
    ) -> Result<T, String> {
        let n = self.input.len();
        let (mut source_idx, mut attempt) = (idx, 0u64);
        loop {
            match sample(self, source_idx) {
                Ok(x) => return Ok(x),
                Err(what) => {
                    self.bad.log(source_idx, &what);
                    self.batch_bad.push(source_idx);
                    if attempt >= MAX_REPLACEMENTS {
                        return Err(format!(
                            "sample {idx} and its {MAX_REPLACEMENTS} replacements are all unreadable; last: {what}"
                        ));
                    }
                    attempt += 1;
                    source_idx = (key(&[self.cfg.seed, epoch as u64, idx as u64, attempt]) % n as u64) as usize;
                }
            }
        }
    }

    /// Shuffle-BN: overwrite view `k` with the view of the rows `order[r·B..(r+1)·B]`
    /// of the global batch (each made from its own (seed, epoch, index) as its owner would).
    fn shuffle_view(
        &mut self,
        k: usize,
        step: usize,
        epoch: usize,
        global: &[usize],
        view: &mut [f32],
    ) -> Result<(), String> {
        let (n, r) = (global.len(), self.cfg.rank);
        let b = n / self.cfg.world_size;
        let len = self.input.view_len(k);
        let mut scratch: Vec<Vec<f32>> = (0..self.input.views()).map(|v| vec![0.0; self.input.view_len(v)]).collect();
        let order = Sampler::shuffle_order(self.cfg.seed, step, n);
        for row in 0..b {
            let idx = global[order[r * b + row]];
            self.with_replacement(idx, epoch, |w, src| {
                let mut slices: Vec<&mut [f32]> = scratch.iter_mut().map(|v| v.as_mut_slice()).collect();
                w.sample(src, epoch, &mut slices)
            })?;
            view[row * len..(row + 1) * len].copy_from_slice(&scratch[k]);
        }
        Ok(())
    }

    /// Build the batches of the steps that arrive on `tickets` until the pipeline
    /// is dropped. A panic while building becomes that batch's error (a bad
    /// sample never takes the worker down).
    fn serve(mut self, w: usize, tickets: Receiver<usize>, results: Sender<Produced>) {
        // Its log lines (a skipped sample) carry the rank, as the main thread's do.
        let _rank = tracing::error_span!("rank", rank = self.cfg.rank).entered();
        while let Ok(step) = tickets.recv() {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build(step))).unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("worker data-{w} panicked on step {step}: {msg}"))
            });
            if results.send((step, out)).is_err() {
                break;
            }
        }
    }

    /// Tokenise sample `idx`'s caption (its own, or a random template of its
    /// class name) with the text augmentation into `row`; returns its end.
    fn caption_row(
        &self,
        idx: usize,
        epoch: usize,
        label: i64,
        caption: Option<String>,
        row: &mut [i64],
    ) -> Result<i64, String> {
        let Mode::ImageText { class_names, text: aug, tokenizer, .. } = &self.cfg.mode else { return Ok(0) };
        let stream = |k: u64| sample_rng(self.cfg.seed, epoch as u64, idx as u64, Stream::Caption as u64 + k);
        let cap = match caption {
            Some(c) => c,
            None => {
                let name = usize::try_from(label).ok().and_then(|l| class_names.get(l));
                text::random_caption(&mut stream(0), name.map(String::as_str).unwrap_or(&label.to_string()))
            }
        };
        let mut rng = stream(1);
        let cap = match &aug.eda {
            Some((syn, alpha)) => crate::textaug::eda(&cap, syn, *alpha, &mut rng),
            None => cap,
        };
        let end = tokenizer.encode_into(&cap, row)?;
        if let Some((kind, ratio)) = aug.cutoff {
            crate::textaug::cutoff(row, end, tokenizer.pad_id(), kind, ratio, &mut rng);
        }
        Ok(end as i64)
    }

    /// The distinct bad samples met while building the current batch, sorted.
    fn take_bad(&mut self) -> Vec<usize> {
        let mut bad = std::mem::take(&mut self.batch_bad);
        bad.sort_unstable();
        bad.dedup();
        bad
    }

    fn build(&mut self, step: usize) -> Result<HostBatch, String> {
        let epoch = self.sampler.epoch_of(step);
        self.batch_bad.clear();
        if self.perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.perm = Some((epoch, self.sampler.permutation(epoch)));
        }
        let perm = &self.perm.as_ref().unwrap().1;
        let global = self.sampler.global_batch_of(step, perm);
        let Buffers { mut indices, mut views, mut labels, mut tokens, mut text_end } =
            self.pool.try_recv().unwrap_or_else(|_| {
                self.allocated.fetch_add(1, Ordering::Relaxed);
                Buffers::default()
            });
        indices.clear();
        indices.extend_from_slice(Sampler::local_rows(&global, self.cfg.rank, self.cfg.world_size));
        let b = indices.len();
        let n_views = match self.cfg.mode {
            Mode::Views => self.input.views(),
            Mode::ImageText { .. } => 1,
        };
        let lens: Vec<usize> = (0..n_views).map(|k| self.input.view_len(k)).collect();
        // Every element of a view is written below, so a recycled buffer keeps no stale values.
        views.resize_with(n_views, Vec::new);
        for (v, l) in views.iter_mut().zip(&lens) {
            v.resize(b * l, 0.0);
        }
        labels.clear();
        text_end.clear();
        let ctx = match &self.cfg.mode {
            Mode::ImageText { context, .. } => *context,
            Mode::Views => 0,
        };
        // Each caption row is rewritten whole by the tokenizer.
        tokens.resize(b * ctx, 0);
        for row in 0..b {
            let idx = indices[row];
            let (label, caption) = self.with_replacement(idx, epoch, |w, src| {
                let mut slices: Vec<&mut [f32]> =
                    views.iter_mut().zip(&lens).map(|(v, &l)| &mut v[row * l..(row + 1) * l]).collect();
                w.sample(src, epoch, &mut slices)
            })?;
            labels.push(label);
            if ctx > 0 {
                text_end.push(self.caption_row(idx, epoch, label, caption, &mut tokens[row * ctx..(row + 1) * ctx])?);
            }
        }
        if let Some(k) = self.cfg.shuffle_view.filter(|&k| k < views.len()) {
            self.shuffle_view(k, step, epoch, &global, &mut views[k])?;
        }
        let mix = self.cfg.mix.map(|(mc, mixed_views)| {
            let (_, h, w) = self.input.view_shape(0);
            let plan = mix_plan(&mc, self.cfg.seed, step, self.cfg.global_batch, h, w);
            for (k, v) in views.iter_mut().enumerate().take(mixed_views) {
                let (c, vh, vw) = self.input.view_shape(k);
                assert_eq!((vh, vw), (h, w), "mixed views must share one size");
                apply_mix(&plan, v, self.cfg.rank * b, c, h, w);
            }
            (plan.partner, plan.lambda)
        });
        Ok(HostBatch {
            step,
            epoch,
            indices,
            views,
            labels,
            tokens,
            text_end,
            wait: Duration::ZERO,
            bad: self.take_bad(),
            mix,
        })
    }
}

impl Pipeline {
    /// Start `cfg.workers` worker threads over `images` (IDX input), two views with `augment`.
    pub fn start(images: Arc<Images>, augment: Augmenter, cfg: PipelineConfig) -> Result<Self, DataError> {
        Self::start_input(Input::Idx { images, augment: vec![augment; 2] }, cfg)
    }

    /// Start `cfg.workers` worker threads over any input.
    pub fn start_input(input: Input, cfg: PipelineConfig) -> Result<Self, DataError> {
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
        let (ticket_tx, ticket_rx) = unbounded::<usize>();
        let (result_tx, result_rx) = bounded::<Produced>(prefetch);
        // Room for every batch that can be alive at once: ready, being built, and held by the trainer.
        let (pool_tx, pool_rx) = bounded::<Buffers>(prefetch + cfg.workers.max(1) + 1);
        let allocated = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..cfg.workers.max(1) {
            let rgb = match &*input {
                Input::Files { augment, .. } => augment.iter().cloned().map(RgbAugmenter::new).collect(),
                Input::Idx { .. } => Vec::new(),
            };
            let worker = Worker {
                input: input.clone(),
                rgb,
                bad: bad.clone(),
                batch_bad: Vec::new(),
                sampler: sampler.clone(),
                cfg: cfg.clone(),
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
            workers,
            pool: pool_tx,
            allocated,
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

    /// A test pipeline layout; tests override the fields they care about.
    fn layout(rank: usize, world_size: usize, global_batch: usize, workers: usize, end_step: usize) -> PipelineConfig {
        PipelineConfig {
            seed: 0,
            rank,
            world_size,
            global_batch,
            workers,
            prefetch: 2,
            start_step: 0,
            end_step,
            mode: Mode::Views,
            mix: None,
            shuffle_view: None,
        }
    }

    use crate::augment::AugParams;

    fn images(n: usize) -> Arc<Images> {
        let pixels = (0..n * 64).map(|i| ((i * 37) % 251) as u8).collect();
        Arc::new(Images { pixels, labels: (0..n).map(|i| (i % 10) as u8).collect(), height: 8, width: 8 })
    }

    fn aug() -> Augmenter {
        let params = AugParams { jitter_prob: 0.8, mean_std: (0.5, 0.5), ..crate::augment::tests::all_ops() };
        Augmenter::new(params, 8, 8)
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
                    mix: None,
                    shuffle_view: None,
                };
                Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
            })
            .collect()
    }

    #[test]
    fn shuffle_bn_views_are_those_of_the_permuted_rows() {
        let run_with = |world: usize, shuffle: Option<usize>| -> Vec<Vec<HostBatch>> {
            (0..world)
                .map(|rank| {
                    let cfg = PipelineConfig { seed: 11, shuffle_view: shuffle, ..layout(rank, world, 12, 2, 3) };
                    Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
                })
                .collect()
        };
        let plain = run_with(1, None);
        let len = plain[0][0].views[1].len() / 12;
        for world in [1usize, 3] {
            let shuffled = run_with(world, Some(1));
            for step in 0..3 {
                let order = Sampler::shuffle_order(11, step, 12);
                for (r, rank) in shuffled.iter().enumerate() {
                    let b = 12 / world;
                    let batch = &rank[step];
                    // The other view and the rows' indices are unchanged.
                    assert_eq!(batch.views[0], plain[0][step].views[0][r * b * len..(r + 1) * b * len]);
                    for row in 0..b {
                        let g = order[r * b + row];
                        assert_eq!(
                            batch.views[1][row * len..(row + 1) * len],
                            plain[0][step].views[1][g * len..(g + 1) * len]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batches_are_identical_whatever_world_size_and_workers() {
        let one = run(1, 1, Mode::Views);
        for (world, workers) in [(2, 1), (3, 3), (4, 2)] {
            let many = run(world, workers, Mode::Views);
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
        let mode = Mode::ImageText {
            context: 48,
            tokenizer: Arc::new(text::Tokenizer::Bytes),
            class_names: (0..10).map(|c| format!("class{c}")).collect(),
            text: TextAug::default(),
        };
        let b = &run(1, 2, mode)[0][0];
        assert_eq!(b.views.len(), 1);
        for (row, &label) in b.labels.iter().enumerate() {
            let toks = &b.tokens[row * 48..(row + 1) * 48];
            assert_eq!(toks[b.text_end[row] as usize], text::EOT, "the text ends at its EOT");
            let text: String = toks[1..].iter().take_while(|&&t| t < 256 && t > 0).map(|&t| t as u8 as char).collect();
            assert!(text.contains(&format!("class{label}")), "{text}");
        }
    }

    #[test]
    fn early_drop_does_not_hang() {
        let cfg = layout(0, 1, 4, 2, 1000);
        let mut p = Pipeline::start(images(50), aug(), cfg).unwrap();
        assert!(p.next_batch().unwrap().is_ok());
        drop(p);
    }

    #[test]
    fn worker_panic_becomes_an_error() {
        // Images whose pixel buffer is shorter than their size says: the worker panics slicing it.
        let broken = Arc::new(Images { pixels: vec![0; 10], labels: vec![0; 50], height: 8, width: 8 });
        let cfg = PipelineConfig { prefetch: 1, ..layout(0, 1, 4, 1, 3) };
        let mut p = Pipeline::start(broken, aug(), cfg).unwrap();
        let err = p.next_batch().unwrap().unwrap_err().to_string();
        assert!(err.contains("panicked"), "{err}");
    }

    fn folder(n: usize, corrupt: &[usize]) -> (tempfile::TempDir, Arc<dyn Source>) {
        let dir = tempfile::tempdir().unwrap();
        for c in 0..2 {
            std::fs::create_dir(dir.path().join(format!("class{c}"))).unwrap();
        }
        for i in 0..n {
            let path = dir.path().join(format!("class{}", i % 2)).join(format!("{i:03}.png"));
            if corrupt.contains(&i) {
                std::fs::write(path, b"this is not a png").unwrap();
            } else {
                let img = image::RgbImage::from_fn(20 + i as u32 % 7, 16, |x, y| {
                    image::Rgb([(x * 9) as u8, (y * 13) as u8, i as u8])
                });
                img.save(path).unwrap();
            }
        }
        let src: Arc<dyn Source> = Arc::new(crate::source::ImageFolder::open(dir.path()).unwrap());
        (dir, src)
    }

    fn run_files(
        src: &Arc<dyn Source>,
        world: usize,
        workers: usize,
        max_bad: f64,
    ) -> Vec<Vec<Result<HostBatch, DataError>>> {
        (0..world)
            .map(|rank| {
                let cfg = PipelineConfig {
                    seed: 5,
                    rank,
                    world_size: world,
                    global_batch: 8,
                    workers,
                    prefetch: 2,
                    start_step: 0,
                    end_step: 4,
                    mode: Mode::Views,
                    mix: None,
                    shuffle_view: None,
                };
                let input = Input::Files {
                    source: src.clone(),
                    augment: vec![RgbAugParams::simclr(12); 2],
                    max_bad_fraction: max_bad,
                };
                Pipeline::start_input(input, cfg).unwrap().collect()
            })
            .collect()
    }

    #[test]
    fn file_batches_are_identical_whatever_world_size_and_workers() {
        let (_dir, src) = folder(20, &[]);
        let one = run_files(&src, 1, 1, 0.0);
        let two = run_files(&src, 2, 2, 0.0);
        for s in 0..4 {
            let b1 = one[0][s].as_ref().unwrap();
            assert_eq!(b1.views[0].len(), 8 * 3 * 12 * 12);
            let joined: Vec<f32> = two.iter().flat_map(|r| r[s].as_ref().unwrap().views[1].clone()).collect();
            assert_eq!(joined, b1.views[1]);
        }
    }

    #[test]
    fn corrupt_files_are_skipped_replaced_counted_and_bounded() {
        let (_dir, src) = folder(20, &[3, 11]);
        let a = run_files(&src, 1, 2, 0.2);
        let b = run_files(&src, 2, 1, 0.2);
        let c = run_files(&src, 2, 3, 0.2);
        let bad_of = |runs: &[Vec<Result<HostBatch, DataError>>], s: usize| -> Vec<usize> {
            let mut all: Vec<usize> = runs.iter().flat_map(|r| r[s].as_ref().unwrap().bad.clone()).collect();
            all.sort_unstable();
            all
        };
        for s in 0..4 {
            let joined: Vec<f32> = b.iter().flat_map(|r| r[s].as_ref().unwrap().views[0].clone()).collect();
            assert_eq!(joined, a[0][s].as_ref().unwrap().views[0], "replacement depends on the layout");
            // Each step reports the same bad samples whatever the ranks, workers or timing.
            assert_eq!(bad_of(&a, s), bad_of(&b, s), "step {s}");
            assert_eq!(bad_of(&b, s), bad_of(&c, s), "step {s}");
        }
        let mut budget = BadBudget::new(0.2, 20, []);
        for s in 0..4 {
            budget.add(bad_of(&a, s)).unwrap();
        }
        assert_eq!(budget.count(), 2, "both corrupt files are met in 4 steps of 8 over 20 samples");
        let mut strict = BadBudget::new(0.05, 20, []);
        let err = (0..4).find_map(|s| strict.add(bad_of(&a, s)).err()).expect("a bad fraction above the limit stops");
        assert!(err.contains("2 of 20") && err.contains("max_bad_fraction"), "{err}");
        // A resume keeps counting from the checkpointed set.
        assert_eq!(BadBudget::new(0.05, 20, budget.seen()).add([]).unwrap_err(), err);
    }

    #[test]
    fn mixed_batches_are_identical_whatever_world_size() {
        use crate::mix::{MixConfig, MixKind};
        let run_mix = |world: usize, kind: MixKind| -> Vec<Vec<HostBatch>> {
            (0..world)
                .map(|rank| {
                    let cfg = PipelineConfig {
                        seed: 2,
                        rank,
                        world_size: world,
                        global_batch: 12,
                        workers: 2,
                        prefetch: 2,
                        start_step: 0,
                        end_step: 3,
                        mode: Mode::Views,
                        mix: Some((MixConfig { kind, alpha: 1.0, group: 3 }, 1)),
                        shuffle_view: None,
                    };
                    Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
                })
                .collect()
        };
        for kind in [MixKind::Mixup, MixKind::CutMix] {
            let one = run_mix(1, kind);
            let four = run_mix(4, kind);
            for s in 0..3 {
                let joined: Vec<f32> = four.iter().flat_map(|r| r[s].views[0].clone()).collect();
                assert_eq!(joined, one[0][s].views[0]);
                assert_eq!(four[3][s].mix, one[0][s].mix);
            }
        }
        // A group that does not divide the local batch is refused before any work.
        let cfg = PipelineConfig {
            seed: 2,
            prefetch: 1,
            mix: Some((MixConfig { kind: MixKind::Mixup, alpha: 1.0, group: 4 }, 1)),
            ..layout(0, 2, 12, 1, 1)
        };
        let err = Pipeline::start(images(50), aug(), cfg).err().unwrap().to_string();
        assert!(err.contains("must divide the local batch 6"), "{err}");
    }

    #[test]
    fn recycled_buffers_give_the_same_bytes_and_bound_allocations() {
        let cfg = || PipelineConfig { seed: 4, ..layout(0, 1, 12, 2, 20) };
        let fresh: Vec<HostBatch> = Pipeline::start(images(50), aug(), cfg()).unwrap().map(|b| b.unwrap()).collect();
        let mut p = Pipeline::start(images(50), aug(), cfg()).unwrap();
        let mut n = 0;
        while let Some(b) = p.next_batch() {
            let b = b.unwrap();
            assert_eq!(b.views, fresh[n].views, "step {n}: a recycled buffer changed the bytes");
            assert_eq!((&b.indices, &b.labels), (&fresh[n].indices, &fresh[n].labels));
            p.recycle(b);
            n += 1;
        }
        assert_eq!(n, 20);
        // prefetch 2 + workers 2 + the one the trainer holds.
        assert!(p.allocated_batches() <= 5, "{} allocations for 20 steps", p.allocated_batches());
        // Captions too: a recycled token buffer holding longer captions is rewritten whole.
        let mode = Mode::ImageText {
            context: 32,
            tokenizer: Arc::new(text::Tokenizer::Bytes),
            class_names: (0..10)
                .map(|c| {
                    if c % 2 == 0 {
                        format!("class {c} with a name longer than the context {c}")
                    } else {
                        format!("c{c}")
                    }
                })
                .collect(),
            text: TextAug::default(),
        };
        let text_cfg = || PipelineConfig { mode: mode.clone(), ..cfg() };
        let fresh: Vec<HostBatch> =
            Pipeline::start(images(50), aug(), text_cfg()).unwrap().map(|b| b.unwrap()).collect();
        let mut p = Pipeline::start(images(50), aug(), text_cfg()).unwrap();
        for want in &fresh {
            let b = p.next_batch().unwrap().unwrap();
            assert_eq!(b.tokens, want.tokens);
            p.recycle(b);
        }
    }

    #[test]
    fn idx_multi_crop_views_have_their_own_sizes() {
        let small = Augmenter::new(AugParams { crop_scale: Some([0.05, 0.3]), ..aug().params }, 8, 8).resized(4, 4);
        let augment = vec![aug(), aug(), small.clone(), small];
        let run = |world: usize| -> Vec<HostBatch> {
            (0..world)
                .flat_map(|rank| {
                    let input = Input::Idx { images: images(50), augment: augment.clone() };
                    Pipeline::start_input(input, layout(rank, world, 6, 2, 1)).unwrap().map(|b| b.unwrap())
                })
                .collect()
        };
        let one = run(1);
        let lens: Vec<usize> = one[0].views.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![6 * 64, 6 * 64, 6 * 16, 6 * 16]);
        assert_ne!(one[0].views[2], one[0].views[3]);
        let two = run(2);
        let joined: Vec<f32> = two.iter().flat_map(|b| b.views[3].clone()).collect();
        assert_eq!(joined, one[0].views[3]);
    }

    #[test]
    fn multi_crop_views_have_their_own_sizes() {
        let (_dir, src) = folder(16, &[]);
        let cfg = PipelineConfig { seed: 1, ..layout(0, 1, 4, 2, 2) };
        let augment = RgbAugParams::preset("swav", 16, 8, 3).unwrap();
        let input = Input::Files { source: src, augment, max_bad_fraction: 0.0 };
        let b = Pipeline::start_input(input, cfg).unwrap().next().unwrap().unwrap();
        let lens: Vec<usize> = b.views.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![4 * 3 * 256, 4 * 3 * 256, 4 * 3 * 64, 4 * 3 * 64, 4 * 3 * 64]);
        assert_ne!(b.views[2], b.views[3]);
    }
}
