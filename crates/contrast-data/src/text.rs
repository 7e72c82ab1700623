//! Byte-level tokenizer and class-name captions for CLIP.
//!
//! Token ids: bytes 1..=255 map to themselves, 0 pads, [`SOT`] starts and
//! [`EOT`] ends a text. EOT is the largest id, so its position is the argmax of
//! a row, as in open_clip; the text tower pools there.

use rand::Rng;

/// Vocabulary size (bytes, start, end).
pub const VOCAB: i64 = 258;
/// Start-of-text token.
pub const SOT: i64 = 256;
/// End-of-text token.
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

/// Tokenise `text` into `out` (length = context): SOT, bytes (truncated), EOT, zeros.
pub fn tokenize_into(text: &str, out: &mut [i64]) {
    let ctx = out.len();
    assert!(ctx >= 2, "context must hold SOT and EOT");
    out.iter_mut().for_each(|v| *v = 0);
    out[0] = SOT;
    let bytes: Vec<i64> = text.bytes().filter(|&b| b != 0).map(i64::from).take(ctx - 2).collect();
    out[1..1 + bytes.len()].copy_from_slice(&bytes);
    out[1 + bytes.len()] = EOT;
}

/// Tokenise into a new vector of length `ctx`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_frame_bytes_and_truncate() {
        assert_eq!(tokenize("ab", 6), vec![SOT, 97, 98, EOT, 0, 0]);
        let t = tokenize("abcdef", 5);
        assert_eq!(t, vec![SOT, 97, 98, 99, EOT]);
        assert_eq!(caption(0, "bag"), "a photo of a bag.");
    }
}
