//! Tokenizers and class-name captions for image–text training.
//!
//! Two tokenizers behind one type, [`Tokenizer`]:
//! - **bytes** (the default, nothing to load): bytes 1..=255 map to themselves,
//!   0 pads, [`SOT`] starts and [`EOT`] ends a text; vocabulary [`VOCAB`].
//! - **Hugging Face** `tokenizer.json` (BPE, WordPiece, Unigram, WordLevel),
//!   loaded from a path with the `tokenizers` crate: the file's normaliser,
//!   pre-tokeniser and post-processor (its special tokens) apply; texts are
//!   truncated to the context by the library (special tokens kept) and padded
//!   with the file's pad token.
//!
//! Both report where each text ends: the text tower pools at that last token
//! (the EOT of byte tokens and of CLIP's BPE, `[SEP]` of BERT-style files).

use crate::DataError;
use rand::Rng;
use std::path::{Path, PathBuf};

/// Vocabulary size of the byte tokenizer (bytes, start, end).
pub const VOCAB: i64 = 258;
/// Start-of-text token of the byte tokenizer.
pub const SOT: i64 = 256;
/// End-of-text token of the byte tokenizer.
pub const EOT: i64 = 257;

/// Prompt templates for captions and for zero-shot classifiers (`{}` = class name).
pub const TEMPLATES: [&str; 8] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "an item of clothing: {}.",
];

/// The largest vocabulary a `tokenizer.json` may have (ids index an embedding table).
pub const MAX_VOCAB: usize = 1 << 20;
/// Ids below the largest that no token may leave unused.
pub const MAX_UNUSED_IDS: usize = 1024;

/// Pad tokens looked up, in order, when a `tokenizer.json` sets no padding.
const PAD_TOKENS: [&str; 5] = ["<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|endoftext|>"];

/// A tokenizer of captions and prompts; cheap to share between workers (`Arc`).
pub enum Tokenizer {
    /// Byte-level tokens ([`VOCAB`] ids).
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    HuggingFace {
        /// The loaded tokenizer (truncation set to the context).
        inner: Box<tokenizers::Tokenizer>,
        /// The file it came from.
        path: PathBuf,
        /// Pad id.
        pad: i64,
        /// Vocabulary size, added tokens included.
        vocab: usize,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::HuggingFace { path, vocab, pad, .. } => {
                write!(f, "Tokenizer::HuggingFace({}, vocab {vocab}, pad {pad})", path.display())
            }
        }
    }
}

impl Tokenizer {
    /// `data.text.tokenizer`: `bytes`, or the path of a `tokenizer.json` (texts of `context` tokens).
    pub fn from_spec(spec: &str, context: usize) -> Result<Self, DataError> {
        if spec == "bytes" {
            Ok(Tokenizer::Bytes)
        } else {
            Self::from_file(Path::new(spec), context)
        }
    }

    /// Load a Hugging Face `tokenizer.json` for texts of `context` tokens.
    pub fn from_file(path: &Path, context: usize) -> Result<Self, DataError> {
        let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
        if context < 2 {
            return Err(format(format!("context {context} cannot hold a text")));
        }
        if !path.is_file() {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer.json"),
            });
        }
        // The tokenizers crate panics on some malformed files (an `expect` in
        // its decoder deserialisation, found by fuzz/run.sh): an error naming the file.
        let mut inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                format(format!(
                    "not a Hugging Face tokenizer.json (the tokenizers crate failed on it: {})",
                    why.unwrap_or_default()
                ))
            })?
            .map_err(|e| format(format!("not a Hugging Face tokenizer.json: {e}")))?;
        let pad = match inner.get_padding() {
            Some(p) => p.pad_id as i64,
            None => PAD_TOKENS.iter().find_map(|t| inner.token_to_id(t)).unwrap_or(0) as i64,
        };
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length: context, ..Default::default() }))
            .map_err(|e| format(format!("cannot truncate to the context {context}: {e}")))?;
        let vocab = inner.get_vocab_size(true);
        // Ids index the embedding table: the largest id must be inside it.
        let ids = inner.get_vocab(true);
        let max_id = ids.values().copied().max().unwrap_or(0) as usize;
        // The table has a row per id up to the largest: sparse or huge ids would
        // allocate rows no token uses (a 4·10⁹ id: terabytes).
        if max_id >= MAX_VOCAB || max_id + 1 > ids.len() + MAX_UNUSED_IDS {
            return Err(format(format!(
                "its largest token id is {max_id} for {} tokens: an embedding table of {} rows ({} bytes at width 512) \
                 for ids that are sparse or huge; a vocabulary must be dense and under {MAX_VOCAB} ids",
                ids.len(),
                max_id as u64 + 1,
                (max_id as u64 + 1) * 512 * 4
            )));
        }
        let vocab = vocab.max(max_id + 1);
        // The pad id is written into captions and indexes the embedding too.
        if pad < 0 || pad as usize >= vocab {
            return Err(format(format!("pad id {pad} is outside the vocabulary of {vocab} ids")));
        }
        Ok(Tokenizer::HuggingFace { inner: Box::new(inner), path: path.to_path_buf(), pad, vocab })
    }

    /// Embedding rows the text tower needs.
    pub fn vocab_size(&self) -> i64 {
        match self {
            Tokenizer::Bytes => VOCAB,
            Tokenizer::HuggingFace { vocab, .. } => *vocab as i64,
        }
    }

    /// The id written after the end of a text (and over cut-off tokens).
    pub fn pad_id(&self) -> i64 {
        match self {
            Tokenizer::Bytes => 0,
            Tokenizer::HuggingFace { pad, .. } => *pad,
        }
    }

    /// Tokenise `text` into `out` (its length is the context) and return the
    /// position of the text's last token, where the text tower pools.
    pub fn encode_into(&self, text: &str, out: &mut [i64]) -> Result<usize, String> {
        match self {
            Tokenizer::Bytes => Ok(tokenize_into(text, out)),
            Tokenizer::HuggingFace { inner, pad, path, .. } => {
                let enc =
                    inner.encode(text, true).map_err(|e| format!("{}: cannot encode {text:?}: {e}", path.display()))?;
                let ids = enc.get_ids();
                // The library truncated to the context it was loaded for; a shorter `out` cuts again.
                let n = ids.len().min(out.len());
                out.iter_mut().for_each(|v| *v = *pad);
                out[..n].iter_mut().zip(ids).for_each(|(o, &i)| *o = i as i64);
                Ok(n.max(1) - 1)
            }
        }
    }

    /// Tokenise into a new vector of `ctx` ids; also the end position.
    pub fn encode(&self, text: &str, ctx: usize) -> Result<(Vec<i64>, usize), String> {
        let mut v = vec![0; ctx];
        let end = self.encode_into(text, &mut v)?;
        Ok((v, end))
    }
}

/// Byte tokens of `text` into `out` (length = context): SOT, bytes (truncated), EOT, zeros.
/// Returns the position of EOT.
pub fn tokenize_into(text: &str, out: &mut [i64]) -> usize {
    let ctx = out.len();
    assert!(ctx >= 2, "context must hold SOT and EOT");
    out.iter_mut().for_each(|v| *v = 0);
    out[0] = SOT;
    let mut n = 0;
    for b in text.bytes().filter(|&b| b != 0).take(ctx - 2) {
        n += 1;
        out[n] = i64::from(b);
    }
    out[n + 1] = EOT;
    n + 1
}

/// Byte tokens in a new vector of length `ctx`.
pub fn tokenize(text: &str, ctx: usize) -> Vec<i64> {
    let mut v = vec![0; ctx];
    tokenize_into(text, &mut v);
    v
}

/// The caption of template `t` for class `name`.
pub fn caption(t: usize, name: &str) -> String {
    TEMPLATES[t % TEMPLATES.len()].replace("{}", name)
}

/// A random caption for class `name`.
pub fn random_caption<R: Rng>(rng: &mut R, name: &str) -> String {
    caption(rng.gen_range(0..TEMPLATES.len()), name)
}

/// A small `tokenizer.json` (word-level model, BERT-style
/// `[CLS] … [SEP]` post-processor, lower-casing) over `words`: ids 0–3 are
/// `[UNK] [PAD] [CLS] [SEP]`, then the words in order. For tests and examples
/// that need a Hugging Face file without a download.
pub fn word_level_tokenizer_json(words: &[&str]) -> String {
    let mut vocab = vec![("[UNK]".to_string(), 0usize), ("[PAD]".into(), 1), ("[CLS]".into(), 2), ("[SEP]".into(), 3)];
    vocab.extend(words.iter().enumerate().map(|(i, w)| (w.to_string(), i + 4)));
    let vocab: String = vocab.iter().map(|(w, i)| format!("{w:?}: {i}")).collect::<Vec<_>>().join(", ");
    let special = |content: &str, id: usize| {
        format!(
            r#"{{"id": {id}, "content": "{content}", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    format!(
        r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{}, {}, {}, {}],
  "normalizer": {{"type": "Lowercase"}},
  "pre_tokenizer": {{"type": "Whitespace"}},
  "post_processor": {{
    "type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{
      "[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}},
      "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
    }}
  }},
  "decoder": null,
  "model": {{"type": "WordLevel", "vocab": {{{vocab}}}, "unk_token": "[UNK]"}}
}}"#,
        special("[UNK]", 0),
        special("[PAD]", 1),
        special("[CLS]", 2),
        special("[SEP]", 3)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_frame_bytes_and_truncate() {
        assert_eq!(tokenize("ab", 6), vec![SOT, 97, 98, EOT, 0, 0]);
        let t = tokenize("abcdef", 5);
        assert_eq!(t, vec![SOT, 97, 98, 99, EOT]);
        assert_eq!(caption(0, "bag"), "a photo of a bag.");
        let (t, end) = Tokenizer::Bytes.encode("ab", 6).unwrap();
        assert_eq!((t[end], end), (EOT, 3));
    }

    #[test]
    fn a_pad_id_outside_the_vocabulary_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = word_level_tokenizer_json(&["a", "bag"])
            .replace("\"padding\": null", "\"padding\": {\"strategy\": \"BatchLongest\", \"direction\": \"Right\", \"pad_to_multiple_of\": null, \"pad_id\": 99999, \"pad_type_id\": 0, \"pad_token\": \"[PAD]\"}");
        std::fs::write(&path, json).unwrap();
        let err = Tokenizer::from_spec(path.to_str().unwrap(), 6).unwrap_err().to_string();
        assert!(err.contains("pad id 99999") && err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn a_tokenizer_whose_ids_are_sparse_or_huge_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for id in ["4000000000", "1048576", "5000"] {
            let json = word_level_tokenizer_json(&["a", "bag"]).replace("\"bag\": 5", &format!("\"bag\": {id}"));
            std::fs::write(&path, json).unwrap();
            let err = Tokenizer::from_spec(path.to_str().unwrap(), 6).unwrap_err().to_string();
            assert!(err.contains("tokenizer.json") && err.contains("sparse or huge"), "{id}: {err}");
        }
    }

    #[test]
    fn a_tokenizer_json_that_makes_the_tokenizers_crate_panic_is_an_error_naming_the_file() {
        // Found by fuzz/run.sh: a malformed `decoder` value hits an `expect` inside tokenizers.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json =
            word_level_tokenizer_json(&["a"]).replace("\"decoder\": null", "\"decoder\": okenizer\": {\"type\": 1}");
        std::fs::write(&path, json).unwrap();
        let err = Tokenizer::from_spec(path.to_str().unwrap(), 6).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("not a Hugging Face"), "{err}");
    }

    #[test]
    fn hugging_face_tokenizer_json_frames_truncates_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, word_level_tokenizer_json(&["a", "photo", "of", "bag", "shirt"])).unwrap();
        let tok = Tokenizer::from_spec(path.to_str().unwrap(), 6).unwrap();
        assert_eq!((tok.vocab_size(), tok.pad_id()), (9, 1));
        // Lower-cased, whitespace-split, [CLS] … [SEP], unknown words → [UNK], padded with [PAD].
        let (ids, end) = tok.encode("A photo hat", 6).unwrap();
        assert_eq!(ids, vec![2, 4, 5, 0, 3, 1]);
        assert_eq!(end, 4);
        // Truncation keeps the special tokens: [CLS] + 4 words + [SEP] = 6.
        let (ids, end) = tok.encode("a photo of a bag of a shirt", 6).unwrap();
        assert_eq!(ids, vec![2, 4, 5, 6, 4, 3]);
        assert_eq!(end, 5);
        // Errors name the file.
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = Tokenizer::from_spec(bad.to_str().unwrap(), 6).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("tokenizer.json"), "{err}");
        let err = Tokenizer::from_spec("/no/such/tokenizer.json", 6).unwrap_err().to_string();
        assert!(err.contains("/no/such/tokenizer.json"), "{err}");
    }
}
