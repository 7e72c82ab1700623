//! The commands besides training: `trainer eval`, `embed`, `export` and `config`.

use crate::{build_method, checkpoint, collective_command, data, load_plan, resolve_device, rundir, trainer};
use anyhow::{Context, Result};
use contrast_comm::{Collective, Comm};
use contrast_config::Plan;
use contrast_data::text::Tokenizer;
use contrast_nn::method::Method;
use std::path::Path;
use std::sync::Arc;
use tch::Device;

/// Items of `model.safetensors` that only training needs: the momentum
/// encoder (`momentum.*`) and MoCo's queue (`method.queue*`).
fn training_only(name: &str) -> bool {
    name.starts_with("momentum.") || name.starts_with("method.queue")
}

/// `trainer export --checkpoint DIR --out FILE [--bf16]`: the model's weights
/// alone (no optimiser state, no momentum encoder or queue) as one
/// safetensors file, optionally with floating-point tensors in bfloat16.
pub fn export_command(ckpt: &Path, out: &Path, bf16: bool) -> Result<()> {
    refuse_inside_checkpoint(out)?;
    let dir = checkpoint::resolve(ckpt)?;
    let tensors = checkpoint::read_tensors(&dir, rundir::MODEL_FILE)?;
    let kept: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .filter(|(n, _)| !training_only(n))
        .map(|(n, t)| {
            let floating = t.is_floating_point();
            (n, if bf16 && floating { t.to_kind(tch::Kind::BFloat16) } else { t })
        })
        .collect();
    let bytes: i64 = kept.iter().map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum();
    let metadata = export_metadata(&dir)?;
    checkpoint::write_safetensors(&kept, metadata, out).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!("exported {} tensors ({bytes} bytes) of {} to {}", kept.len(), dir.display(), out.display());
    Ok(())
}

/// What an exported file says of itself (`__metadata__`): `format: pt` (as
/// PyTorch's safetensors writers mark theirs), and, from the run directory,
/// `method`, `encoder`, `config_sha256` (of its config.yaml) and `config`
/// (that configuration as JSON).
fn export_metadata(step_dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    use sha2::Digest;
    let mut meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let state = checkpoint::read_state(step_dir)?;
    if let Some(m) = state.method {
        meta.insert("method".into(), m);
    }
    let config = step_dir.parent().map(|d| d.join(rundir::CONFIG_FILE)).filter(|p| p.is_file());
    if let Some(text) = config.and_then(|p| std::fs::read(p).ok()) {
        let hex: String = sha2::Sha256::digest(&text).iter().map(|b| format!("{b:02x}")).collect();
        meta.insert("config_sha256".into(), hex);
        let yaml: Option<yaml_serde::Value> = yaml_serde::from_slice(&text).ok();
        let encoder = yaml.as_ref().and_then(|v| v.get("model")?.get("encoder")?.as_str().map(str::to_string));
        meta.insert("encoder".into(), encoder.unwrap_or_else(|| "convnet".into()));
        // The run's configuration as JSON, so a reader (tools/contrast_torch.py)
        // shapes its modules without the run directory.
        if let Some(json) = yaml.and_then(|v| serde_json::to_string(&v).ok()) {
            meta.insert("config".into(), json);
        }
    }
    Ok(meta)
}

/// `trainer config --config FILE [--set ...] [--print]`: resolve the
/// configuration (every check training makes before it starts) and print the
/// plan; with `--print`, the resolved YAML on stdout.
pub fn config_command(path: &Path, overrides: &[String], print: bool) -> Result<()> {
    let mut plan = load_plan(&contrast_comm::Solo, path, overrides)?;
    // `train.device: cuda` on a host without a GPU fails here as it would before training.
    resolve_device(&plan.config.train.device, 0)?;
    if plan.needs_dataset_len() {
        // train.epochs: the training set's length decides the steps.
        let (input, _) = data::training_input(&plan)?;
        plan.resolve_epochs(input.len())?;
        plan.resolve_items(input.len())?;
    }
    if print {
        print!("{}", plan.resolved_yaml());
    } else {
        println!("{}", plan.describe());
    }
    Ok(())
}

/// A checkpoint's model, loaded on every rank, with what it runs with.
pub(crate) struct Checkpointed {
    pub(crate) method: Box<dyn Method>,
    pub(crate) device: Device,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) loaded: checkpoint::Loaded,
}

/// Build the plan's method and load `ckpt`'s weights into it (rank 0 reads, every rank gets them).
pub(crate) fn load_checkpointed(comm: &Comm, plan: &Plan, ckpt: &Path) -> Result<Checkpointed> {
    crate::compute_threads(plan);
    let device = resolve_device(&plan.config.train.device, comm.local_rank())?;
    let tokenizer = data::tokenizer(plan)?;
    let mut method = build_method(comm, plan, device, &tokenizer)?;
    let find = || checkpoint::resolve(ckpt).map(Some);
    let loaded = checkpoint::load(comm, find, |_| Ok(()), &method.state(), None)?.context("no checkpoint")?;
    method.load_state(&loaded.model, comm.rank(), comm.world_size())?;
    Ok(Checkpointed { method, device, tokenizer, loaded })
}

/// `trainer eval --config FILE --checkpoint DIR`: print the evaluation as JSON.
pub fn eval_command(path: &Path, overrides: &[String], ckpt: &Path) -> Result<()> {
    collective_command(|comm| eval(comm, path, overrides, ckpt))
}

fn eval(comm: &Comm, path: &Path, overrides: &[String], ckpt: &Path) -> Result<()> {
    let plan = load_plan(comm, path, overrides)?;
    let Checkpointed { method, device, tokenizer, loaded } = load_checkpointed(comm, &plan, ckpt)?;
    let data = data::load_eval(&plan, None)?.map_err(|why| anyhow::anyhow!("nothing to evaluate: {why}"))?;
    let f = trainer::evaluate(comm, &plan, method.as_ref(), &data, &tokenizer, device)?;
    if comm.rank() == 0 {
        let out = serde_json::json!({
            "checkpoint": loaded.dir.display().to_string(),
            "step": loaded.state.step,
            "knn_top1": f.knn_top1,
            "knn_top5": f.knn_top5,
            "linear_top1": f.linear_top1,
            "zero_shot_top1": f.zero_shot_top1,
            "zero_shot_top5": f.zero_shot_top5,
            "retrieval": f.retrieval,
            "alignment": f.alignment,
            "uniformity": f.uniformity,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Refuse an output path inside a checkpoint directory (`step-<N>/`, `best/`,
/// or any directory holding a `state.json`): a file written there would change
/// what a resume or an evaluation of that checkpoint reads.
pub(crate) fn refuse_inside_checkpoint(out: &Path) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(parent) = parent.canonicalize() else { return Ok(()) };
    for dir in parent.ancestors() {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let step = name.strip_prefix("step-").is_some_and(|n| n.parse::<usize>().is_ok());
        let best = name == rundir::BEST_DIR && dir.parent().is_some_and(|p| p.join(rundir::CONFIG_FILE).is_file());
        if step || best || dir.join(rundir::STATE_FILE).is_file() {
            anyhow::bail!(
                "--out {} lies inside the checkpoint directory {}: writing there would change that checkpoint; \
                 write the file elsewhere",
                out.display(),
                dir.display()
            );
        }
    }
    Ok(())
}
