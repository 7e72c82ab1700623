//! Checkpoints: `dir/step-<N>/{model,optim}.safetensors` + `state.json`, and
//! `dir/latest` naming the newest.
//!
//! A checkpoint of several files is only atomic as a directory: it is written
//! as `dir/.step-<N>.tmp` and renamed into place; `latest` is written to a
//! temporary file and renamed too. A crash at any moment leaves the previous
//! checkpoint and `latest` intact.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

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
    /// kNN top-1 of the untrained encoder, measured at step 0 (carried across resumes).
    #[serde(default)]
    pub knn_top1_init: Option<f64>,
    /// kNN top-1 of raw pixels (carried across resumes).
    #[serde(default)]
    pub knn_top1_raw_pixels: Option<f64>,
}

/// Name of step `n`'s directory.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step}")
}

/// Write a checkpoint atomically and point `latest` at it; keep the newest `keep` (0 = all).
pub fn save(
    dir: &Path,
    state: &State,
    model: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    let name = step_dir_name(state.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    let fin = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let cpu = |v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        v.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect()
    };
    Tensor::write_safetensors(&cpu(model), tmp.join("model.safetensors")).context("writing model.safetensors")?;
    Tensor::write_safetensors(&cpu(optim), tmp.join("optim.safetensors")).context("writing optim.safetensors")?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin)?;
    }
    std::fs::rename(&tmp, &fin).with_context(|| format!("renaming {} into place", tmp.display()))?;
    let latest_tmp = dir.join(".latest.tmp");
    std::fs::write(&latest_tmp, format!("{name}\n"))?;
    std::fs::rename(&latest_tmp, dir.join("latest"))?;
    if keep > 0 {
        prune(dir, keep)?;
    }
    Ok(fin)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    let drop = steps.len().saturating_sub(keep);
    for (_, p) in steps.into_iter().take(drop) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

/// The checkpoint `latest` names in a run directory, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let f = dir.join("latest");
    if !f.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    let p = dir.join(name.trim());
    if !p.join("state.json").is_file() {
        bail!("{} names {}, which holds no state.json", f.display(), p.display());
    }
    Ok(Some(p))
}

/// A step directory, or a run directory resolved through `latest`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.with_context(|| {
        format!("{} is neither a step-<N> checkpoint nor a run directory with `latest`", path.display())
    })
}

/// Read `state.json` of a checkpoint.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let f = ckpt.join("state.json");
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
}

/// Read a safetensors file of a checkpoint.
pub fn read_tensors(ckpt: &Path, file: &str) -> Result<Vec<(String, Tensor)>> {
    let f = ckpt.join(file);
    Tensor::read_safetensors(&f).with_context(|| format!("reading {}", f.display()))
}

/// Copy named tensors into a var store; every variable must be present with its shape.
pub fn load_into(vs: &tch::nn::VarStore, tensors: &[(String, Tensor)], origin: &Path) -> Result<()> {
    let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let dst = &vars[name];
        let src =
            map.get(name.as_str()).with_context(|| format!("{}: variable `{name}` is missing", origin.display()))?;
        if src.size() != dst.size() {
            bail!(
                "{}: variable `{name}` has shape {:?}, the model expects {:?}",
                origin.display(),
                src.size(),
                dst.size()
            );
        }
        tch::no_grad(|| dst.shallow_clone().copy_(&src.to_device(dst.device()).to_kind(dst.kind())));
    }
    Ok(())
}
