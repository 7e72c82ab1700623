//! `trainer embed`: the L2-normalised backbone features of every image of a
//! split, written by the ranks in parts, so that no rank holds the whole set.
//! With `--texts FILE`, the lines of a UTF-8 file instead, tokenised as
//! training tokenises captions and L2-normalised out of the method's text
//! tower (CLIP's shared space; SimCSE's and Quick-Thought's sentence
//! embedding); the sidecar then holds `{"row", "text"}`.
//!
//! Rank r of P embeds the contiguous rows `[lo_r, hi_r)` (the evaluation's
//! slices) and writes them itself:
//! - one rank: `--out FILE` holds every row;
//! - P ranks: `STEM-0000r-of-0000P.EXT` next to `FILE` (1-based, as sharded
//!   safetensors checkpoints are named), and rank 0 writes `FILE.index.json`:
//!   `{"rows": n, "dim": D, "parts": [{"file", "first_row", "rows"}, …]}`.
//!   Concatenating the parts in order gives the rows of one rank's `FILE`.
//!
//! With `eval.whiten`, the features are whitened first (statistics of the
//! training split, `eval.whiten_dim` dimensions) and then L2-normalised.
//!
//! Each file holds `embeddings` `[rows, D]` f32 and `labels` `[rows]` i64 (−1:
//! none, or unreadable), and in its header metadata `first_row`, `rows_total`
//! and `paths_file`: the sidecar `FILE.paths.jsonl` beside it, one JSON object
//! `{"row": global row, "path": source name}` per row, in row order (the names
//! stay out of the safetensors header, which readers refuse past 100 MB, about
//! a million paths). Every file is written
//! to a temporary name and renamed, so a killed job leaves no half-written
//! part under a final name. A rerun into the same name removes the files of an
//! earlier run with another rank count (its parts, its index, or its single
//! file), so that no stale part can be read with the new ones.

use crate::commands::{load_checkpointed, refuse_inside_checkpoint, Checkpointed};
use crate::{collective_command, data, eval, load_plan};
use anyhow::{bail, Context, Result};
use contrast_comm::{Collective, Comm};
use contrast_config::Plan;
use contrast_nn::encoder::text::Captions;
use contrast_nn::loss::l2_normalize;
use std::path::{Path, PathBuf};

/// What `trainer embed` embeds.
#[derive(Debug, Clone)]
pub enum EmbedInput {
    /// Every image of a split (`test`: the test split) through the backbone.
    Split {
        /// The test split rather than the training split.
        test: bool,
    },
    /// The texts of a UTF-8 file, one per line, through the text tower.
    Texts(PathBuf),
}

/// `trainer embed --checkpoint DIR --out FILE [--split test | --texts FILE]` (see the module doc).
pub fn embed_command(path: &Path, overrides: &[String], ckpt: &Path, out: &Path, input: &EmbedInput) -> Result<()> {
    collective_command(|comm| embed(comm, path, overrides, ckpt, out, input))
}

/// This rank's rows of an embedding: `[hi − lo, dim]` row-major, with their
/// labels and the names that go to the sidecar (`"path"` or `"text"`).
struct Rows {
    x: Vec<f32>,
    dim: usize,
    labels: Vec<i64>,
    names: Vec<String>,
    name_key: &'static str,
    lo: usize,
    n: usize,
}

fn embed(comm: &Comm, path: &Path, overrides: &[String], ckpt: &Path, out: &Path, input: &EmbedInput) -> Result<()> {
    refuse_inside_checkpoint(out)?;
    // Before any work: a mistyped directory should not cost a whole embedding pass.
    let dir = out_dir(out);
    if !dir.is_dir() {
        bail!("--out {}: the directory {} does not exist", out.display(), dir.display());
    }
    let texts = match input {
        EmbedInput::Texts(file) => Some(read_texts(file)?),
        EmbedInput::Split { .. } => None,
    };
    let plan = load_plan(comm, path, overrides)?;
    let m = load_checkpointed(comm, &plan, ckpt)?;
    let (rows, what) = match texts {
        Some(texts) => (text_rows(comm, &plan, &m, &texts)?, "texts"),
        None => (image_rows(comm, &plan, &m, matches!(input, EmbedInput::Split { test: true }))?, "images"),
    };
    let (rank, parts, n) = (comm.rank(), comm.world_size(), rows.n);
    let file = part_path(out, rank, parts);
    let written = write_part(&file, &rows);
    // Every rank learns whether every part was written before rank 0 names them in the index.
    let mut failed = [written.is_err() as u8 as f64];
    comm.all_reduce_sum(&mut failed);
    written?;
    if failed[0] > 0.0 {
        bail!("{} rank(s) could not write their part of {} (their errors say why)", failed[0], out.display());
    }
    if rank == 0 {
        let bounds: Vec<(usize, usize)> = (0..parts).map(|r| eval::slice_bounds(n, r, parts)).collect();
        finish(out, parts, &bounds, n, rows.dim)?;
        let how =
            if parts == 1 { String::new() } else { format!(" in {parts} parts (index {})", index_path(out).display()) };
        tracing::info!("embedded {n} {what} of {} into {}{how}", m.loaded.dir.display(), out.display());
    }
    Ok(())
}

/// This rank's slice of a split's images: backbone features, L2-normalised (whitened first with `eval.whiten`).
fn image_rows(comm: &Comm, plan: &Plan, m: &Checkpointed, test: bool) -> Result<Rows> {
    let (set, name) = data::embed_set(plan, test)?;
    let raw = m.method.backbone().out_dim();
    // `eval.whiten`: statistics of the training split (at most eval.max_train items), whatever the split embedded.
    let whitening = match plan.config.eval.whiten {
        true => {
            let (train, _) = data::embed_set(plan, false)?;
            let train = train.strided(plan.config.eval.max_train);
            eval::whitening_of(comm, &plan.config.eval, &train, m.device, raw, |x| m.method.features(x))?
        }
        false => None,
    };
    let dim = whitening.as_ref().map_or(raw, |w| w.1);
    let features = |x: &tch::Tensor| match &whitening {
        Some((w, _)) => w.apply(&m.method.features(x)),
        None => m.method.features(x),
    };
    let (x, labels, (lo, hi, _)) = eval::local_features(comm, &set, m.device, dim, features);
    Ok(Rows {
        x: contrast_nn::to_host::<f32>(&x),
        dim: dim as usize,
        // The file's labels: −1 for no label or an unreadable input (whose row is zero).
        labels: labels.into_iter().map(|l| l.max(-1)).collect(),
        names: (lo..hi).map(|i| set.source_index(i).map_or_else(|| name(i), &name)).collect(),
        name_key: "path",
        lo,
        n: set.len(),
    })
}

/// The texts of `file`, one per line (a final newline ends the last; `\r\n` too).
fn read_texts(file: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(file).with_context(|| format!("--texts {}", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        anyhow::anyhow!("--texts {}: not UTF-8 (an invalid sequence at byte {at})", file.display())
    })?;
    let texts: Vec<String> = text.lines().map(str::to_string).collect();
    if texts.is_empty() {
        bail!("--texts {}: the file holds no text (one per line)", file.display());
    }
    Ok(texts)
}

/// Texts per forward pass of the text tower.
const TEXT_BATCH: usize = 256;

/// This rank's slice of `texts`, tokenised as training tokenises captions
/// (`data.text.tokenizer`, `model.text.context`) and L2-normalised out of the
/// method's text tower: CLIP's shared space (SimCSE's, Quick-Thought's embedding).
fn text_rows(comm: &Comm, plan: &Plan, m: &Checkpointed, texts: &[String]) -> Result<Rows> {
    let (n, ctx) = (texts.len(), plan.config.model.text.context as usize);
    let (lo, hi) = eval::slice_bounds(n, comm.rank(), comm.world_size());
    let (mut x, mut dim) = (Vec::new(), [0i64]);
    for start in (lo..hi).step_by(TEXT_BATCH) {
        let (mut tokens, mut ends) = (Vec::new(), Vec::new());
        for t in &texts[start..(start + TEXT_BATCH).min(hi)] {
            let (ids, end) = m.tokenizer.encode(t, ctx).map_err(anyhow::Error::msg)?;
            tokens.extend(ids);
            ends.push(end as i64);
        }
        let captions = Captions::from_host(&tokens, &ends, m.device);
        let Some(y) = tch::no_grad(|| m.method.encode_text(&captions)) else {
            bail!("--texts: method {} has no text tower (clip, simcse and quick_thought have)", plan.method.name);
        };
        dim[0] = y.size()[1];
        x.extend(contrast_nn::to_host::<f32>(&l2_normalize(&y.to_kind(tch::Kind::Float))));
    }
    // A rank without texts (fewer texts than ranks) learns the width from the others.
    comm.all_reduce_max(&mut dim);
    let names = texts[lo..hi].to_vec();
    Ok(Rows { x, dim: dim[0] as usize, labels: vec![-1; hi - lo], names, name_key: "text", lo, n })
}

/// The file rank `rank` of `parts` writes: `out` itself for one rank.
pub fn part_path(out: &Path, rank: usize, parts: usize) -> PathBuf {
    if parts == 1 {
        return out.to_path_buf();
    }
    let (stem, ext) = stem_and_ext(out);
    out.with_file_name(format!("{stem}-{:05}-of-{parts:05}{ext}", rank + 1))
}

/// `FILE.paths.jsonl`, the source names of the rows of `file` (a part or the one file).
pub fn paths_path(file: &Path) -> PathBuf {
    with_suffix(file, ".paths.jsonl")
}

/// `FILE.index.json`, which lists the parts of a run with several ranks.
pub fn index_path(out: &Path) -> PathBuf {
    with_suffix(out, ".index.json")
}

/// The directory `out` is written into (`.` for a bare file name).
fn out_dir(out: &Path) -> &Path {
    out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The file name of `out` split as `emb` and `.safetensors`.
fn stem_and_ext(out: &Path) -> (String, String) {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let ext = out.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (stem, ext)
}

/// Write one part (to a temporary name, then renamed) and its sidecar.
fn write_part(file: &Path, rows: &Rows) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let (labels, dim, lo, n) = (&rows.labels, rows.dim, rows.lo, rows.n);
    let xb: Vec<u8> = rows.x.iter().flat_map(|f| f.to_le_bytes()).collect();
    let lb: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let views = [
        ("embeddings", TensorView::new(Dtype::F32, vec![labels.len(), dim], &xb)?),
        ("labels", TensorView::new(Dtype::I64, vec![labels.len()], &lb)?),
    ];
    let sidecar = paths_path(file);
    let mut lines = String::new();
    for (k, p) in rows.names.iter().enumerate() {
        lines.push_str(&serde_json::json!({ "row": lo + k, (rows.name_key): p }).to_string());
        lines.push('\n');
    }
    let tmp = with_suffix(&sidecar, ".partial");
    std::fs::write(&tmp, lines).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &sidecar).with_context(|| format!("renaming {} to {}", tmp.display(), sidecar.display()))?;
    let sidecar_name = sidecar.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let meta = [
        ("paths_file".to_string(), sidecar_name),
        ("first_row".to_string(), lo.to_string()),
        ("rows_total".to_string(), n.to_string()),
    ];
    let tmp = with_suffix(file, ".partial");
    safetensors::tensor::serialize_to_file(views, &Some(meta.into_iter().collect()), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    file.with_file_name(name)
}

/// Rank 0, once every part is written: remove an earlier run's files of
/// another rank count, and write the index (several ranks).
fn finish(out: &Path, parts: usize, bounds: &[(usize, usize)], n: usize, dim: usize) -> Result<()> {
    let keep: Vec<PathBuf> = (0..parts).map(|r| part_path(out, r, parts)).collect();
    let mut kept = keep.clone();
    kept.extend(keep.iter().map(|f| paths_path(f)));
    for stale in stale_files(out, &kept)? {
        tracing::warn!("removing {} (an earlier embed's output under the same name)", stale.display());
        std::fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
    }
    if parts == 1 {
        return Ok(());
    }
    let files: Vec<serde_json::Value> = keep
        .iter()
        .zip(bounds)
        .map(|(f, (lo, hi))| {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            let paths = paths_path(f).file_name().unwrap_or_default().to_string_lossy().into_owned();
            serde_json::json!({ "file": name, "paths": paths, "first_row": lo, "rows": hi - lo })
        })
        .collect();
    let index = serde_json::json!({ "rows": n, "dim": dim, "parts": files });
    let (path, tmp) = (index_path(out), with_suffix(&index_path(out), ".partial"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&index)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The files next to `out` that an embed into `out` with another rank count
/// wrote: `out` itself, its index, parts `STEM-NNNNN-of-NNNNN.EXT` and the
/// sidecars of all of them, less `keep`.
fn stale_files(out: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let dir = out_dir(out);
    let (stem, ext) = stem_and_ext(out);
    let is_part = |name: &str| {
        let Some(rest) = name.strip_prefix(&format!("{stem}-")).and_then(|r| r.strip_suffix(ext.as_str())) else {
            return false;
        };
        let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
        rest.split_once("-of-").is_some_and(|(a, b)| digits(a) && digits(b))
    };
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let file = name.strip_suffix(".paths.jsonl").map_or(path.clone(), |f| path.with_file_name(f));
        let named = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let ours = is_part(&named) || file == out || path == index_path(out);
        if ours && path.is_file() && !keep.contains(&path) {
            stale.push(path);
        }
    }
    stale.sort();
    Ok(stale)
}
