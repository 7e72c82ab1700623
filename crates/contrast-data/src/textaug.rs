//! Text augmentations, keyed like the image ones on (seed, epoch, global index).
//!
//! - **EDA** (Wei & Zou 2019): with α the fraction of words changed,
//!   n = max(1, ⌊α·words⌋) synonym replacements, n random insertions (a
//!   synonym of a random word at a random place), n random swaps, and random
//!   deletion of each word with probability α (at least one word is kept).
//!   Synonyms come from a user file: one entry per line, `word<TAB>syn1,syn2,…`.
//! - **Cutoff** (Shen et al. 2020) on token ids: `token` sets each content
//!   token to padding with probability r; `span` pads one contiguous span of
//!   ⌈r·len⌉ content tokens. Start/end tokens are kept, so pooling still works.
//!
//! (Dropout views, the third text augmentation of the survey, are the model's.)

use crate::DataError;
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;
use std::path::Path;

/// A synonym table.
#[derive(Debug, Clone, Default)]
pub struct Synonyms {
    map: HashMap<String, Vec<String>>,
}

impl Synonyms {
    /// Read `word<TAB>syn1,syn2,…` lines (blank lines and `#` comments skipped).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.into(), source })?;
        Self::parse(&text).map_err(|message| DataError::Format { path: path.into(), message })
    }

    /// Parse the file format.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, syns) =
                line.split_once('\t').ok_or_else(|| format!("line {}: expected word<TAB>synonyms", n + 1))?;
            let syns: Vec<String> = syns.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            if !syns.is_empty() {
                map.insert(word.trim().to_lowercase(), syns);
            }
        }
        Ok(Self { map })
    }

    fn of(&self, word: &str) -> Option<&Vec<String>> {
        self.map.get(&word.to_lowercase())
    }
}

/// EDA with strength α on whitespace-separated words.
pub fn eda<R: Rng>(text: &str, syn: &Synonyms, alpha: f64, rng: &mut R) -> String {
    let mut words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    if words.is_empty() || alpha <= 0.0 {
        return text.to_string();
    }
    let n = ((alpha * words.len() as f64) as usize).max(1);
    // Synonym replacement.
    let mut candidates: Vec<usize> = (0..words.len()).filter(|&i| syn.of(&words[i]).is_some()).collect();
    candidates.shuffle(rng);
    for &i in candidates.iter().take(n) {
        if let Some(choice) = syn.of(&words[i]).and_then(|s| s.choose(rng)) {
            words[i] = choice.clone();
        }
    }
    // Random insertion.
    for _ in 0..n {
        let with_syn: Vec<&String> = words.iter().filter(|w| syn.of(w).is_some()).collect();
        if let Some(w) = with_syn.choose(rng) {
            let s = syn.of(w).unwrap().choose(rng).unwrap().clone();
            let at = rng.gen_range(0..=words.len());
            words.insert(at, s);
        }
    }
    // Random swap.
    for _ in 0..n {
        if words.len() > 1 {
            let (a, b) = (rng.gen_range(0..words.len()), rng.gen_range(0..words.len()));
            words.swap(a, b);
        }
    }
    // Random deletion.
    let kept: Vec<String> = words.iter().filter(|_| rng.gen::<f64>() >= alpha).cloned().collect();
    let words = if kept.is_empty() { vec![words.choose(rng).unwrap().clone()] } else { kept };
    words.join(" ")
}

/// Cutoff kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// Each content token independently.
    Token,
    /// One contiguous span.
    Span,
}

/// Apply cutoff with ratio r to one tokenised row whose text ends at `end`
/// (`start … end pad …`): content tokens, strictly between the first token and
/// `end`, become `pad`; the start and end markers stay.
pub fn cutoff<R: Rng>(tokens: &mut [i64], end: usize, pad: i64, kind: Cutoff, ratio: f64, rng: &mut R) {
    let eot = end.min(tokens.len().saturating_sub(1));
    if eot <= 1 || ratio <= 0.0 {
        return;
    }
    let content = 1..eot;
    match kind {
        Cutoff::Token => {
            for t in &mut tokens[content] {
                if rng.gen::<f64>() < ratio {
                    *t = pad;
                }
            }
        }
        Cutoff::Span => {
            let len = content.len();
            let span = ((ratio * len as f64).ceil() as usize).min(len);
            let start = 1 + rng.gen_range(0..=len - span);
            tokens[start..start + span].iter_mut().for_each(|t| *t = pad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{tokenize, EOT, SOT};
    use rand::SeedableRng;

    fn rng(k: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(k)
    }

    #[test]
    fn eda_uses_only_words_and_synonyms_and_is_keyed() {
        let syn = Synonyms::parse("# table\nphoto\tpicture,image\nred\tcrimson\n").unwrap();
        let text = "a red photo of a small red bag";
        let out = eda(text, &syn, 0.2, &mut rng(1));
        let allowed = ["a", "red", "photo", "of", "small", "bag", "picture", "image", "crimson"];
        assert!(out.split(' ').all(|w| allowed.contains(&w)), "{out}");
        assert!(!out.is_empty());
        assert_eq!(out, eda(text, &syn, 0.2, &mut rng(1)));
        assert_eq!(eda(text, &syn, 0.0, &mut rng(1)), text);
        assert!(Synonyms::parse("no tab here").unwrap_err().contains("line 1"));
        // Deletion never empties a caption.
        assert!(!eda("word", &syn, 0.99, &mut rng(3)).is_empty());
    }

    #[test]
    fn cutoff_pads_content_only() {
        let base = tokenize("abcdefghij", 16);
        let mut t = base.clone();
        cutoff(&mut t, 11, 0, Cutoff::Span, 0.3, &mut rng(2));
        assert_eq!((t[0], t[11]), (SOT, EOT));
        let zeros: Vec<usize> = (1..11).filter(|&i| t[i] == 0).collect();
        assert_eq!(zeros.len(), 3);
        assert!(zeros.windows(2).all(|w| w[1] == w[0] + 1), "one contiguous span: {zeros:?}");
        // The byte tokenizer's pad (0) and another (a Hugging Face file's) fill the cut tokens.
        for pad in [0, 7] {
            let mut t = base.clone();
            cutoff(&mut t, 11, pad, Cutoff::Token, 1.0, &mut rng(2));
            assert!(t[1..11].iter().all(|&v| v == pad) && t[11] == EOT);
            let mut t = base.clone();
            cutoff(&mut t, 11, pad, Cutoff::Token, 0.0, &mut rng(2));
            assert_eq!(t, base);
        }
    }
}
