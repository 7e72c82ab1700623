//! Checkpoints: `dir/step-<N>/{model,optim}.safetensors` + `state.json`, and
//! `dir/latest` (a plain text file holding `step-<N>`) naming the newest.
//!
//! State is a registry of named items ([`contrast_nn::state`]): every rank
//! turns its items into their canonical layout (sharded items are gathered,
//! running statistics averaged, nothing else), and rank 0 writes them through
//! [`commit`], the one function every write goes through. On load only rank 0
//! reads the files; it checks every expected item and broadcasts them, and
//! each rank keeps its part. So a node-local `checkpoint.dir` works, and any
//! world size resumes any checkpoint.
//!
//! A checkpoint of several files is only atomic as a directory: it is written
//! as `dir/.step-<N>.<pid>.tmp` and renamed into place; `latest` is written to a
//! temporary file and renamed too. A crash at any moment leaves the previous
//! checkpoint and `latest` intact.

use anyhow::{bail, Context, Result};
use contrast_comm::Collective;
use contrast_nn::state::{broadcast_tensor, StateItem};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub use crate::rundir::{step_dir_name, BEST_DIR};
use crate::rundir::{LATEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE};

/// `state.json`: where the run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Optimiser steps completed.
    pub step: usize,
    /// Epoch of the next step.
    pub epoch: usize,
    /// Master seed of the run.
    pub seed: u64,
    /// Ranks that wrote it (a resume may use another world size).
    pub world_size: usize,
    /// Global batch of the run.
    pub global_batch: usize,
    /// Loss of the last step.
    pub loss: f64,
    /// The method that wrote it (`simclr`, `moco_v2`, …).
    #[serde(default)]
    pub method: Option<String>,
    /// The loss (`loss.name` as resolved).
    #[serde(default)]
    pub loss_name: Option<String>,
    /// Samples in the training set.
    #[serde(default)]
    pub dataset_len: Option<usize>,
    /// Fingerprint of the training set (relative paths and sizes), as hex.
    #[serde(default)]
    pub dataset_fingerprint: Option<String>,
    /// The form of `dataset_fingerprint` ([`contrast_data::source::FINGERPRINT_VERSION`];
    /// absent: 1, which hashed absolute paths without sizes).
    #[serde(default)]
    pub dataset_fingerprint_version: Option<u32>,
    /// Source indices of the unreadable samples met so far (the budget of
    /// `data.max_bad_fraction` keeps counting across a resume).
    #[serde(default)]
    pub bad_samples: Vec<usize>,
    /// Identity of the run (drawn when a run starts fresh, kept across resumes):
    /// pruning only ever removes checkpoints of the same run.
    #[serde(default)]
    pub run_id: Option<u64>,
    /// kNN top-1 of the untrained encoder, measured at step 0 (carried across resumes).
    #[serde(default)]
    pub knn_top1_init: Option<f64>,
    /// kNN top-1 of raw pixels (carried across resumes).
    #[serde(default)]
    pub knn_top1_raw_pixels: Option<f64>,
    /// The best value of `checkpoint.best` so far (in `best/state.json`: the value it holds).
    #[serde(default)]
    pub best_metric: Option<f64>,
}

/// Write a checkpoint's files atomically and point `latest` at it; keep the
/// newest `keep` (0 = all) of this run's checkpoints (those with the same
/// `run_id`: another run's checkpoints in the directory are never removed, so
/// a fresh run into an old directory cannot prune what it just wrote).
/// Every checkpoint write goes through here.
pub fn commit(dir: &Path, state: &State, files: &[(&str, &[(String, Tensor)])], keep: usize) -> Result<PathBuf> {
    let name = step_dir_name(state.step);
    let fin = write_dir(dir, &name, state, files)?;
    let latest_tmp = dir.join(crate::rundir::tmp_name(LATEST_FILE, None));
    std::fs::write(&latest_tmp, format!("{name}\n"))?;
    sync(&latest_tmp)?;
    std::fs::rename(&latest_tmp, dir.join(LATEST_FILE))?;
    sync(dir)?;
    if keep > 0 {
        prune(dir, keep, state.run_id)?;
    }
    Ok(fin)
}

/// Write `dir/name/` atomically: the files and `state.json` into a temporary
/// directory, each fsynced, then renamed into place and the rename fsynced.
fn write_dir(dir: &Path, name: &str, state: &State, files: &[(&str, &[(String, Tensor)])]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    let tmp = dir.join(crate::rundir::tmp_name(name, None));
    let fin = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    for (file, tensors) in files {
        let cpu: Vec<(String, Tensor)> =
            tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
        Tensor::write_safetensors(&cpu, tmp.join(file)).with_context(|| format!("writing {file}"))?;
    }
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    // Durable before it becomes visible: the files, their directory, then each rename's directory.
    for f in files.iter().map(|(f, _)| *f).chain([STATE_FILE]) {
        sync(&tmp.join(f))?;
    }
    sync(&tmp)?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin)?;
    }
    std::fs::rename(&tmp, &fin).with_context(|| format!("renaming {} into place", tmp.display()))?;
    sync(dir)?;
    Ok(fin)
}

mod valid;
pub use valid::{check, header_shapes, newest_valid, Expect};

/// Where [`save`] writes.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    /// `step-<N>`, then named by `latest`, and this run's checkpoints beyond
    /// the newest `keep` (0 = all) pruned.
    Step {
        /// Checkpoints of this run to keep.
        keep: usize,
    },
    /// `best/`: never pruned, never named by `latest`.
    Best,
}

/// Save the model's and the optimiser's items into `slot`. Collective: every
/// rank calls it (sharded items are gathered into their canonical layout);
/// rank 0 writes and returns the directory.
pub fn save<C: Collective>(
    comm: &C,
    dir: &Path,
    state: &State,
    model: &[StateItem],
    optim: &[StateItem],
    slot: Slot,
) -> Result<Option<PathBuf>> {
    crate::watchdog::phase(crate::watchdog::Phase::Checkpoint);
    let canonical = |items: &[StateItem]| -> Vec<(String, Tensor)> {
        items.iter().map(|i| (i.name.clone(), i.to_canonical(comm))).collect()
    };
    let (m, o) = (canonical(model), canonical(optim));
    let files: [(&str, &[(String, Tensor)]); 2] = [(MODEL_FILE, &m), (OPTIM_FILE, &o)];
    let out = match (comm.rank(), slot) {
        (0, Slot::Step { keep }) => Some(commit(dir, state, &files, keep)?),
        (0, Slot::Best) => Some(write_dir(dir, BEST_DIR, state, &files)?),
        _ => None,
    };
    comm.barrier();
    Ok(out)
}

fn prune(dir: &Path, keep: usize, run_id: Option<u64>) -> Result<()> {
    let mut steps = step_dirs(dir)?;
    steps.retain(|(_, p)| read_state(p).map(|s| s.run_id == run_id).unwrap_or(false));
    let drop = steps.len().saturating_sub(keep);
    for (_, p) in steps.into_iter().take(drop) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

/// Flush a file or directory to disk (directories: their entries, so a rename is durable).
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))
}

/// The files of a complete checkpoint directory.
const FILES: [&str; 3] = [MODEL_FILE, OPTIM_FILE, STATE_FILE];

/// The checkpoint to use in a run directory: the one `latest` names when it is
/// valid, else the newest valid `step-<N>` with a warning naming what was
/// wrong ([`valid::newest_valid`]). `None` when it holds no checkpoint.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    valid::newest_valid(dir, None)
}

/// The `step-<N>` directories of a run directory, sorted by N.
fn step_dirs(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// A step directory, or a run directory resolved through `latest` (a
/// population's directory through its best member's).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let path = &crate::pba::best_member_dir(path).unwrap_or_else(|| path.to_path_buf());
    latest(path)?.with_context(|| {
        format!("{} is neither a step-<N> checkpoint nor a run directory with `latest`", path.display())
    })
}

/// Read `state.json` of a checkpoint.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let f = ckpt.join(STATE_FILE);
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
}

/// Read a safetensors file of a checkpoint.
pub fn read_tensors(ckpt: &Path, file: &str) -> Result<Vec<(String, Tensor)>> {
    let f = ckpt.join(file);
    Tensor::read_safetensors(&f).with_context(|| format!("reading {}", f.display()))
}

/// What [`load`] hands every rank: the state and the canonical tensors by name.
pub struct Loaded {
    /// The checkpoint directory (as rank 0 found it).
    pub dir: PathBuf,
    /// `state.json`.
    pub state: State,
    /// Canonical model items.
    pub model: HashMap<String, Tensor>,
    /// Canonical optimiser items.
    pub optim: HashMap<String, Tensor>,
}

/// Rank 0 reads the checkpoint `find` returns (or none), lets `accept` judge its
/// `state.json`, and checks that it holds every item of `model` and `optim`
/// with its canonical shape; then every rank receives the verdict, the state
/// and the tensors by broadcast. Collective.
pub fn load<C: Collective>(
    comm: &C,
    find: impl FnOnce() -> Result<Option<PathBuf>>,
    accept: impl FnOnce(&State) -> Result<()>,
    model: &[StateItem],
    optim: Option<&[StateItem]>,
) -> Result<Option<Loaded>> {
    let p = comm.world_size();
    // Rank 0's verdict: Ok(None) no checkpoint, Ok(Some) read and checked, Err why not.
    let read = if comm.rank() == 0 { read_checked(find, accept, model, optim, p) } else { Ok(None) };
    let verdict = match &read {
        Ok(None) => String::new(),
        Ok(Some((dir, state, _, _))) => format!("ok\n{}\n{}", dir.display(), serde_json::to_string(state)?),
        Err(e) => format!("error\n{e:#}"),
    };
    let verdict = crate::agree::broadcast_text(comm, &verdict, 0);
    if verdict.is_empty() {
        return Ok(None);
    }
    let (head, rest) = verdict.split_once('\n').unwrap_or((verdict.as_str(), ""));
    if head == "error" {
        if let Err(e) = read {
            return Err(e);
        }
        bail!("rank 0 could not load the checkpoint: {rest}");
    }
    let (dir, state) = rest.split_once('\n').context("checkpoint verdict")?;
    let state: State = serde_json::from_str(state)?;
    let (mut m0, mut o0) = match read {
        Ok(Some((_, _, m, o))) => (m, o),
        _ => (HashMap::new(), HashMap::new()),
    };
    let model = share_items(comm, model, &mut m0);
    let optim = share_items(comm, optim.unwrap_or(&[]), &mut o0);
    Ok(Some(Loaded { dir: PathBuf::from(dir), state, model, optim }))
}

type Read = (PathBuf, State, HashMap<String, Tensor>, HashMap<String, Tensor>);

/// Rank 0: read a checkpoint after checking every expected item's presence and canonical shape.
fn read_checked(
    find: impl FnOnce() -> Result<Option<PathBuf>>,
    accept: impl FnOnce(&State) -> Result<()>,
    model: &[StateItem],
    optim: Option<&[StateItem]>,
    world_size: usize,
) -> Result<Option<Read>> {
    let Some(dir) = find()? else { return Ok(None) };
    let state = read_state(&dir)?;
    accept(&state).with_context(|| format!("{} cannot be resumed by this config", dir.display()))?;
    // The one check of names and shapes, from the headers, before any tensor is read.
    let expect = Expect { model, optim, world_size };
    check(&dir, Some(&expect)).with_context(|| format!("{} does not fit this run", dir.display()))?;
    let read = |file: &str| -> Result<HashMap<String, Tensor>> { Ok(read_tensors(&dir, file)?.into_iter().collect()) };
    let m = read(MODEL_FILE)?;
    let o = if optim.is_some() { read(OPTIM_FILE)? } else { HashMap::new() };
    Ok(Some((dir, state, m, o)))
}

/// Broadcast every item's canonical tensor from rank 0 (which holds them in `held`).
fn share_items<C: Collective>(
    comm: &C,
    items: &[StateItem],
    held: &mut HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let p = comm.world_size();
    items
        .iter()
        .map(|item| {
            let shape = item.canonical_shape(p);
            let kind = item.tensor.kind();
            let local = match held.remove(&item.name) {
                Some(t) => t.to_kind(kind),
                None => Tensor::zeros(shape.as_slice(), (kind, tch::Device::Cpu)),
            };
            (item.name.clone(), broadcast_tensor(comm, &local, 0))
        })
        .collect()
}

/// Write `tensors` as one safetensors file with `metadata` in its header
/// (`tch`'s writer has no metadata): each tensor's bytes as they lie, little endian.
pub fn write_safetensors(
    tensors: &[(String, Tensor)],
    metadata: std::collections::BTreeMap<String, String>,
    path: &Path,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    use tch::Kind;
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Double => Dtype::F64,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            k => bail!("`{name}`: no safetensors dtype for {k:?}"),
        };
        let flat = t.to_device(tch::Device::Cpu).contiguous().view([-1]).view_dtype(Kind::Uint8);
        let data = Vec::<u8>::try_from(&flat).with_context(|| format!("`{name}`: reading its bytes"))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        bytes.push((name.clone(), dtype, shape, data));
    }
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| Ok((n.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    safetensors::tensor::serialize_to_file(views, &Some(meta), path)?;
    Ok(())
}
