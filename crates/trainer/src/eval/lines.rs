//! Sentences as evaluation sets (`data.dataset: lines`): tokenised for the
//! text encoder, counted into a bag of words for the baseline, and paired with
//! the next sentence of their group for alignment and uniformity.

use super::EvalSet;
use contrast_data::lines::Corpus;
use contrast_data::text::Tokenizer;
use std::sync::Arc;
use tch::{Device, Tensor};

/// Buckets of the bag-of-words baseline: words are hashed into this many counts.
pub const BOW_DIM: usize = 4096;

/// Sentences of a corpus (a strided subset), with the tokenizer of the run.
#[derive(Clone)]
pub struct LineSet {
    /// The corpus.
    pub corpus: Arc<Corpus>,
    /// Which sentences, in order.
    pub indices: Vec<usize>,
    /// The run's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Tokens per sentence (`model.text.context`).
    pub context: usize,
}

impl LineSet {
    /// At most `max` sentences of `corpus` (0 = all) at an even stride.
    pub fn new(corpus: Arc<Corpus>, max: usize, tokenizer: Arc<Tokenizer>, context: usize) -> Self {
        let n = corpus.len();
        let m = if max == 0 { n } else { max.min(n) };
        let indices = (0..m).map(|i| i * n / m.max(1)).collect();
        Self { corpus, indices, tokenizer, context }
    }

    /// Packed captions `[n, context + 1]` of sentences `which` (positions in
    /// `indices`) and their labels; a sentence the tokenizer refuses is logged and labelled −1.
    pub fn tokens(&self, which: &[usize], device: Device) -> (Tensor, Vec<i64>) {
        let sentences: Vec<usize> = which.iter().map(|&i| self.indices[i]).collect();
        self.tokens_of(&sentences, device)
    }

    /// [`LineSet::tokens`] of corpus sentences `sentences` (corpus indices).
    pub fn tokens_of(&self, sentences: &[usize], device: Device) -> (Tensor, Vec<i64>) {
        let c = self.context;
        let mut rows = vec![0i64; sentences.len() * (c + 1)];
        let mut labels = Vec::with_capacity(sentences.len());
        for (row, &i) in rows.chunks_mut(c + 1).zip(sentences) {
            match self.tokenizer.encode_into(&self.corpus.texts[i], &mut row[..c]) {
                Ok(end) => {
                    row[c] = end as i64;
                    labels.push(self.corpus.labels[i]);
                }
                Err(e) => {
                    tracing::warn!("evaluation skips line {i} of {}: {e}", self.corpus.path.display());
                    labels.push(super::UNREADABLE);
                }
            }
        }
        (Tensor::from_slice(&rows).view([sentences.len() as i64, c as i64 + 1]).to_device(device), labels)
    }

    /// Word counts `[n, BOW_DIM]` of sentences `which` (positions in `indices`).
    pub fn words(&self, which: &[usize], device: Device) -> (Tensor, Vec<i64>) {
        let sentences: Vec<usize> = which.iter().map(|&i| self.indices[i]).collect();
        self.words_of(&sentences, device)
    }

    /// Word counts `[n, BOW_DIM]` of corpus sentences `sentences`: lower-cased
    /// runs of letters, digits and apostrophes, each hashed (FNV-1a) into a bucket.
    pub fn words_of(&self, sentences: &[usize], device: Device) -> (Tensor, Vec<i64>) {
        let mut counts = vec![0f32; sentences.len() * BOW_DIM];
        for (row, &i) in counts.chunks_mut(BOW_DIM).zip(sentences) {
            let text = self.corpus.texts[i].to_lowercase();
            for word in text.split(|ch: char| !(ch.is_alphanumeric() || ch == '\'')).filter(|w| !w.is_empty()) {
                row[fnv1a(word.as_bytes()) as usize % BOW_DIM] += 1.0;
            }
        }
        let labels = sentences.iter().map(|&i| self.corpus.labels[i]).collect();
        (Tensor::from_slice(&counts).view([sentences.len() as i64, BOW_DIM as i64]).to_device(device), labels)
    }

    /// The corpus's sentences followed by one of their group (corpus indices
    /// of the first of each adjacent pair), the first `max` of them, whatever
    /// subset `indices` holds (`eval.max_test` does not thin the pairs).
    pub fn pairs(&self, max: usize) -> Vec<usize> {
        self.corpus.anchors.iter().copied().take(max).collect()
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl EvalSet {
    /// The bag-of-words view of a sentence set (None for images).
    pub fn bag_of_words(&self) -> Option<EvalSet> {
        match self {
            EvalSet::Lines(s) => Some(EvalSet::Words(s.clone())),
            _ => None,
        }
    }
}
