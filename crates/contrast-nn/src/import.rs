//! Weight import (`model.pretrained`): a safetensors file of torchvision, timm
//! or open_clip names (or this trainer's own) into a method's variables.
//!
//! Not `VarStore::load`, which broadcasts shapes silently, changes the model's
//! dtype to the file's and ignores extra keys. Here every shape is checked
//! exactly (an error names the key and both shapes), each tensor is cast to its
//! variable's dtype, and missing, unused and skipped keys are reported; unused
//! keys are an error in strict mode. Upstream names map by identity under the
//! method's `backbone.` prefix (torchvision ResNet, timm ViT) or through a
//! declared table (open_clip, with its transposed projections). Two
//! adaptations are made, as timm makes them: a 3-channel stem summed into a
//! 1-channel one, and a ViT position embedding resampled to the model's grid.
//! Batch-norm statistics offered to a model without batch norm are refused,
//! naming the key.

use crate::{NnError, Result};
use contrast_config::PretrainedFormat;
use std::collections::{BTreeMap, BTreeSet};
use tch::nn::VarStore;
use tch::Tensor;

/// How to read a weight file (`model.pretrained_*`).
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Whose names the file uses.
    pub format: PretrainedFormat,
    /// A prefix stripped from every key (as a prefix, not as characters).
    pub prefix: String,
    /// Globs of keys to leave out (`*` matches any run of characters).
    pub skip: Vec<String>,
    /// Unused keys are an error.
    pub strict: bool,
}

/// What an import did.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    /// The format used (detected when `auto`).
    pub format: Option<PretrainedFormat>,
    /// Variables written, by their name here.
    pub loaded: Vec<String>,
    /// Online variables the file did not provide (they keep their initial values).
    pub missing: Vec<String>,
    /// File keys with no variable here.
    pub unused: Vec<String>,
    /// File keys left out by `skip`.
    pub skipped: Vec<String>,
}

/// A glob match where `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else { return false };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

/// The format a file's keys look like.
pub fn detect(keys: &BTreeSet<String>) -> PretrainedFormat {
    let any = |f: &dyn Fn(&str) -> bool| keys.iter().any(|k| f(k));
    if any(&|k| k.starts_with("visual.") || k.starts_with("transformer.resblocks.")) {
        PretrainedFormat::OpenClip
    } else if any(&|k| k.starts_with("backbone.")) {
        PretrainedFormat::Contrast
    } else if any(&|k| k.starts_with("patch_embed.") || k.starts_with("blocks.")) {
        PretrainedFormat::Timm
    } else {
        PretrainedFormat::Torchvision
    }
}

/// A file key's variable name here, and whether the tensor is transposed on the way.
fn map_key(format: PretrainedFormat, key: &str) -> Option<(String, bool)> {
    match format {
        PretrainedFormat::Contrast => Some((key.to_string(), false)),
        PretrainedFormat::Torchvision | PretrainedFormat::Timm => Some((format!("backbone.{key}"), false)),
        PretrainedFormat::OpenClip => crate::import_table::open_clip(key),
        PretrainedFormat::Auto => unreachable!("detected before mapping"),
    }
}

/// Fit a file tensor to the variable's shape where timm would (stem channels,
/// position-embedding grid); `None` when the shapes cannot be reconciled.
fn adapt(name: &str, t: Tensor, want: &[i64]) -> Option<Tensor> {
    if t.size() == want {
        return Some(t);
    }
    // open_clip's class and position embeddings lack timm's leading 1s.
    let t = if (name.ends_with("cls_token") || name.ends_with("pos_embed")) && t.dim() < want.len() {
        t.unsqueeze(0).reshape([1, -1, *want.last().unwrap_or(&1)])
    } else {
        t
    };
    let have = t.size();
    if have == want {
        return Some(t);
    }
    // A 3-channel stem into a 1-channel one: the sum over input channels.
    if have.len() == 4
        && want.len() == 4
        && have[1] == 3
        && want[1] == 1
        && have[0] == want[0]
        && have[2..] == want[2..]
    {
        return Some(t.sum_dim_intlist([1i64].as_slice(), true, t.kind()));
    }
    // A ViT's position embedding [1, 1 + g², d] onto another square grid.
    if name.ends_with("pos_embed") && have.len() == 3 && want.len() == 3 && have[2] == want[2] {
        let (g, w) = (((have[1] - 1) as f64).sqrt() as i64, ((want[1] - 1) as f64).sqrt() as i64);
        if g * g + 1 == have[1] && w * w + 1 == want[1] {
            return Some(crate::encoder::vit::resample_pos_embed(&t, g, (w, w)));
        }
    }
    None
}

/// Import `tensors` (name → tensor, as read from a file) into the online
/// variables of `vs` (every variable not under `momentum.`).
pub fn import(vs: &VarStore, tensors: Vec<(String, Tensor)>, opts: &ImportOptions) -> Result<ImportReport> {
    let vars = vs.variables();
    let mut report = ImportReport::default();
    let mut file: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in tensors {
        let k = k.strip_prefix(opts.prefix.as_str()).map(str::to_string).unwrap_or(k);
        if opts.skip.iter().any(|g| glob_match(g, &k)) || k.ends_with("num_batches_tracked") {
            report.skipped.push(k);
        } else {
            file.insert(k, t);
        }
    }
    let keys: BTreeSet<String> = file.keys().cloned().collect();
    let format = match opts.format {
        PretrainedFormat::Auto => detect(&keys),
        f => f,
    };
    report.format = Some(format);
    let mut written = BTreeSet::new();
    for (key, t) in file {
        let Some((name, transpose)) = map_key(format, &key) else {
            report.unused.push(key);
            continue;
        };
        let Some(var) = vars.get(&name) else {
            if key.ends_with("running_mean") || key.ends_with("running_var") {
                return Err(NnError::Param(format!(
                    "model.pretrained: `{key}` is a batch-norm statistic, and this model has no batch norm there \
                     (model.norm is not batch): set model.norm: batch to import batch-norm weights"
                )));
            }
            report.unused.push(key);
            continue;
        };
        // In the variable's dtype first, so the adaptations compute in it.
        let t = if transpose { t.transpose(0, 1) } else { t }.to_kind(var.kind());
        let (have, want) = (t.size(), var.size());
        let t = adapt(&name, t, &want).ok_or_else(|| {
            NnError::Shape(format!("model.pretrained: `{key}` has shape {have:?}, but `{name}` here is {want:?}"))
        })?;
        tch::no_grad(|| var.shallow_clone().copy_(&t.to_device(var.device())));
        written.insert(name.clone());
        report.loaded.push(name);
    }
    report.missing = vars.keys().filter(|n| !n.starts_with("momentum.") && !written.contains(*n)).cloned().collect();
    report.missing.sort();
    if opts.strict && !report.unused.is_empty() {
        return Err(NnError::Param(format!(
            "model.pretrained: {} key(s) of the file have no variable here: {} (list them in \
             model.pretrained_skip, or set model.pretrained_strict: false)",
            report.unused.len(),
            report.unused.join(", ")
        )));
    }
    Ok(report)
}

/// Read a safetensors file into (name, tensor) pairs, each in the file's dtype.
pub fn read(path: &std::path::Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path)
        .map_err(|e| NnError::Param(format!("model.pretrained: cannot read {} as safetensors: {e}", path.display())))
}
