//! `model.pretrained` in a run: rank 0 imports the file into the freshly built
//! method (the caller then broadcasts, so every rank starts identical), the
//! momentum copies follow, and its sha256 is recorded; a resume from a
//! checkpoint takes precedence over the file.

use crate::checkpoint;
use anyhow::{bail, Context, Result};
use contrast_config::Plan;
use contrast_nn::Method;

/// Whether the run continues a checkpoint (`train.resume` with one in `checkpoint.dir`):
/// then the checkpoint's weights take precedence over `model.pretrained`.
pub(crate) fn resuming(plan: &Plan) -> Result<bool> {
    Ok(plan.config.train.resume && checkpoint::latest(&plan.config.checkpoint.dir)?.is_some())
}

/// `model.pretrained` into the method (rank 0; the caller broadcasts), and the
/// momentum copies follow the imported weights.
pub(crate) fn import_pretrained(plan: &Plan, method: &dyn Method) -> Result<()> {
    let m = &plan.config.model;
    let Some(path) = m.pretrained.as_ref() else { return Ok(()) };
    let opts = contrast_nn::import::ImportOptions {
        format: m.pretrained_format,
        prefix: m.pretrained_prefix.clone(),
        skip: m.pretrained_skip.clone(),
        strict: m.pretrained_strict,
    };
    let tensors = contrast_nn::import::read(path)?;
    let r =
        contrast_nn::import::import(method.var_store(), tensors, &opts).with_context(|| path.display().to_string())?;
    method.sync_momentum();
    tracing::info!(
        "model.pretrained {}: {:?} names, {} tensors loaded, {} skipped, {} unused",
        path.display(),
        r.format.unwrap_or(m.pretrained_format),
        r.loaded.len(),
        r.skipped.len(),
        r.unused.len()
    );
    if !r.unused.is_empty() {
        tracing::warn!("model.pretrained: keys with no variable here: {}", r.unused.join(", "));
    }
    if !r.missing.is_empty() {
        tracing::info!("model.pretrained: variables kept at their initial values: {}", r.missing.join(", "));
    }
    Ok(())
}

/// The sha256 of `model.pretrained` as hex (rank 0 reads the file); a given
/// `model.pretrained_sha256` that differs is an error naming both.
pub(crate) fn pretrained_sha256(plan: &Plan) -> Result<Option<String>> {
    use sha2::Digest;
    let m = &plan.config.model;
    let Some(path) = m.pretrained.as_ref() else { return Ok(None) };
    let mut file = std::fs::File::open(path).with_context(|| format!("model.pretrained {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading model.pretrained {}", path.display()))?;
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(want) = m.pretrained_sha256.as_ref().filter(|w| !w.eq_ignore_ascii_case(&hex)) {
        bail!("model.pretrained {} has sha256 {hex}, but model.pretrained_sha256 is {want}", path.display());
    }
    Ok(Some(hex))
}
