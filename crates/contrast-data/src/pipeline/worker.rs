//! A data worker: takes a ticket (a step), builds that step's local batch
//! (decode, augment, replace unreadable samples, mix, tokenise) into recycled
//! buffers, and sends it back.

use super::*;
use crate::mix::{apply_mix, mix_plan};
use crate::rgb::{decode, RgbAugmenter};
use crate::rng::{key, sample_rng, Stream};
use crate::sampler::{Sampler, Sampling};
use crate::text;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) struct Worker {
    pub(super) input: Arc<Input>,
    pub(super) rgb: Vec<RgbAugmenter>,
    pub(super) bad: Arc<BadFiles>,
    /// Source indices that failed while building the current batch.
    pub(super) batch_bad: Vec<usize>,
    pub(super) sampler: Sampler,
    pub(super) cfg: PipelineConfig,
    /// A RandAugment schedule over the steps, and the step being built.
    pub(super) schedule: Option<Arc<crate::schedule::RandAugSchedule>>,
    pub(super) step: usize,
    pub(super) perm: Option<(usize, Vec<usize>)>,
    pub(super) pool: Receiver<Buffers>,
    pub(super) allocated: Arc<AtomicUsize>,
}

/// Replacements tried for a bad sample before giving up.
const MAX_REPLACEMENTS: u64 = 16;

impl Worker {
    /// Views, label and captions of sample `idx` written into `views` (one
    /// slice per view); no caption: the caption comes from the class name.
    pub(super) fn sample(
        &mut self,
        idx: usize,
        epoch: usize,
        views: &mut [&mut [f32]],
    ) -> Result<(i64, Vec<String>), String> {
        let seed = self.cfg.seed;
        let view_rng = |v: usize| sample_rng(seed, epoch as u64, idx as u64, Stream::View as u64 + v as u64);
        let scheduled = self.schedule.as_ref().map(|s| s.at(self.step));
        match &*self.input {
            Input::Idx { images, augment } => {
                let src = images.image(idx);
                for (v, buf) in views.iter_mut().enumerate() {
                    let aug = &augment[v.min(augment.len() - 1)];
                    aug.apply_with(src, &mut view_rng(v), buf, scheduled.or(aug.params.randaugment));
                }
                Ok((images.labels[idx] as i64, Vec::new()))
            }
            Input::Lines { corpus, pairs } => {
                let first = if *pairs { corpus.anchors[idx] } else { idx };
                let texts = corpus.texts[first..=first + usize::from(*pairs)].to_vec();
                Ok((corpus.labels[first], texts))
            }
            Input::Files { source, .. } => {
                let raw = source.fetch(idx)?;
                let img = decode(&raw.bytes).map_err(|e| format!("{}: {e}", source.locate(idx)))?;
                for (v, buf) in views.iter_mut().enumerate() {
                    let last = self.rgb.len() - 1;
                    let aug = &mut self.rgb[v.min(last)];
                    if scheduled.is_some() {
                        aug.params.randaugment = scheduled;
                    }
                    aug.apply(&img, &mut view_rng(v), buf).map_err(|e| format!("{}: {e}", source.locate(idx)))?;
                }
                Ok((raw.label, raw.caption.into_iter().collect()))
            }
        }
    }

    /// Sample `idx`, or its replacements when it cannot be read (chosen from (seed,
    /// epoch, index, attempt) only); `sample` fills the buffers of one source index.
    /// Returns what `sample` returned and the source index that filled the buffers
    /// (the replacement's, so a memory bank files the row under the item it shows).
    pub(super) fn with_replacement<T>(
        &mut self,
        idx: usize,
        epoch: usize,
        mut sample: impl FnMut(&mut Self, usize) -> Result<T, String>,
    ) -> Result<(T, usize), String> {
        let n = self.input.len();
        let (mut source_idx, mut attempt) = (idx, 0u64);
        loop {
            match sample(self, source_idx) {
                Ok(x) => return Ok((x, source_idx)),
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
    pub(super) fn shuffle_view(
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
    pub(super) fn serve(mut self, w: usize, tickets: Receiver<Ticket>, results: Sender<Produced>) {
        // Its log lines (a skipped sample) carry the rank, as the main thread's do.
        let _rank = tracing::error_span!("rank", rank = self.cfg.rank).entered();
        let stall = stall_hook(self.cfg.rank);
        while let Ok((step, sampling)) = tickets.recv() {
            if stall == Some(step + 1) {
                // A read that never returns (a hung network filesystem), for the tests.
                std::thread::sleep(Duration::from_secs(3600));
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build(step, &sampling)))
                .unwrap_or_else(|e| {
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

    /// Tokenise caption `k` of sample `idx` (its own, or a random template of
    /// its class name) with the text augmentation into `row`; returns its end.
    /// Caption k draws from the streams (seed, epoch, index, caption + 1000·k + j).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn caption_row(
        &self,
        idx: usize,
        epoch: usize,
        label: i64,
        k: usize,
        caption: Option<String>,
        row: &mut [i64],
    ) -> Result<i64, String> {
        let (aug, tokenizer, class_names) = match &self.cfg.mode {
            Mode::ImageText { class_names, text, tokenizer, .. } => (text, tokenizer, &class_names[..]),
            Mode::Text { text, tokenizer, .. } => (text, tokenizer, &[][..]),
            Mode::Views => return Ok(0),
        };
        let base = Stream::Caption as u64 + 1000 * k as u64;
        let stream = |j: u64| sample_rng(self.cfg.seed, epoch as u64, idx as u64, base + j);
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
    pub(super) fn take_bad(&mut self) -> Vec<usize> {
        let mut bad = std::mem::take(&mut self.batch_bad);
        bad.sort_unstable();
        bad.dedup();
        bad
    }

    /// Build step `step`'s batch of this rank, its epoch drawn by `sampling`.
    pub(super) fn build(&mut self, step: usize, sampling: &Sampling) -> Result<HostBatch, String> {
        let epoch = self.sampler.epoch_of(step);
        self.step = step;
        self.batch_bad.clear();
        if self.perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.perm = Some((epoch, self.sampler.order(epoch, sampling)));
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
        let (n_views, ctx, per_row) = match &self.cfg.mode {
            Mode::Views => (self.input.views(), 0, 0),
            Mode::ImageText { context, .. } => (1, *context, 1),
            Mode::Text { context, .. } => (0, *context, self.input.captions_per_row()),
        };
        let lens: Vec<usize> = (0..n_views).map(|k| self.input.view_len(k)).collect();
        // Every element of a view is written below, so a recycled buffer keeps no stale values.
        views.resize_with(n_views, Vec::new);
        for (v, l) in views.iter_mut().zip(&lens) {
            v.resize(b * l, 0.0);
        }
        labels.clear();
        text_end.clear();
        // Each caption row is rewritten whole by the tokenizer.
        tokens.resize(b * per_row * ctx, 0);
        for row in 0..b {
            let idx = indices[row];
            let ((label, captions), shown) = self.with_replacement(idx, epoch, |w, src| {
                let mut slices: Vec<&mut [f32]> =
                    views.iter_mut().zip(&lens).map(|(v, &l)| &mut v[row * l..(row + 1) * l]).collect();
                w.sample(src, epoch, &mut slices)
            })?;
            // The row shows item `shown`: a replaced sample carries its replacement's index.
            indices[row] = shown;
            labels.push(label);
            let mut captions = captions.into_iter();
            for k in 0..per_row {
                let at = (row * per_row + k) * ctx;
                text_end.push(self.caption_row(idx, epoch, label, k, captions.next(), &mut tokens[at..at + ctx])?);
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

/// `CONTRAST_FAULT_DATA_STALL=RANK:STEP` (test hook): the worker building that
/// rank's batch of step STEP (1-based) blocks for an hour, as a hung read would.
fn stall_hook(rank: usize) -> Option<usize> {
    let v = std::env::var("CONTRAST_FAULT_DATA_STALL").ok()?;
    let (r, step) = v.split_once(':')?;
    (r.trim().parse::<usize>().ok()? == rank).then(|| step.trim().parse().ok()).flatten()
}
