//! Which checkpoint of a run directory to trust: the one `latest` names when it
//! is valid, else the newest valid `step-<N>`, with a warning naming what was
//! wrong. Valid means: every file present, `state.json` parses and its step is
//! the directory's, the safetensors headers parse and cover their files, and
//! (for a resume) every item of the method is there with its canonical shape.

use super::{read_state, step_dirs, FILES};
use crate::rundir::{LATEST_FILE, MODEL_FILE, OPTIM_FILE};
use anyhow::{bail, Context, Result};
use contrast_nn::state::StateItem;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest safetensors header read (the format's own readers refuse larger).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// What a valid checkpoint must hold besides its files: the items of the
/// model and of the optimiser, with their canonical shapes at `world_size`.
pub struct Expect<'a> {
    /// The method's items.
    pub model: &'a [StateItem],
    /// The optimiser's items (none: not checked).
    pub optim: Option<&'a [StateItem]>,
    /// The world size the canonical shapes are taken at.
    pub world_size: usize,
}

/// The checkpoint of a run directory to use: `latest`'s when valid, else the
/// newest valid step directory (with a warning). `None` when the directory
/// holds no checkpoint at all; an error when it holds only invalid ones.
pub fn newest_valid(dir: &Path, expect: Option<&Expect>) -> Result<Option<PathBuf>> {
    let (named, why_not_named) = named_by_latest(dir);
    let steps = if dir.is_dir() { step_dirs(dir)? } else { Vec::new() };
    let others = steps.into_iter().rev().map(|(_, p)| p).filter(|p| Some(p) != named.as_ref());
    let candidates: Vec<PathBuf> = named.clone().into_iter().chain(others).collect();
    let mut rejected: Vec<String> = why_not_named.into_iter().collect();
    if !dir.join(LATEST_FILE).exists() {
        // A kill between a step directory's rename and the first `latest`'s.
        rejected.push(format!("{} is missing", dir.join(LATEST_FILE).display()));
    }
    for p in candidates {
        match check(&p, expect) {
            Ok(()) => {
                if !rejected.is_empty() {
                    tracing::warn!("{}: using the newest valid checkpoint, {}", rejected.join("; "), p.display());
                }
                return Ok(Some(p));
            }
            Err(e) => rejected.push(format!("{} is not a valid checkpoint ({e:#})", p.display())),
        }
    }
    match rejected.len() <= usize::from(!dir.join(LATEST_FILE).exists()) {
        true => Ok(None),
        false => bail!("{} holds no valid checkpoint: {}", dir.display(), rejected.join("; ")),
    }
}

/// The step directory `latest` names, when it names one inside `dir`; else why not.
fn named_by_latest(dir: &Path) -> (Option<PathBuf>, Option<String>) {
    let f = dir.join(LATEST_FILE);
    if !f.exists() {
        return (None, None);
    }
    let name = match std::fs::read_to_string(&f) {
        Ok(n) => n.trim().to_string(),
        Err(e) => return (None, Some(format!("{} is unreadable ({e})", f.display()))),
    };
    let plain = name.strip_prefix("step-").is_some_and(|n| n.parse::<usize>().is_ok());
    if !plain {
        let why = format!("{} names {name:?}, which is not a step-<N> directory of this run directory", f.display());
        return (None, Some(why));
    }
    (Some(dir.join(name)), None)
}

/// Why `p` is not a valid checkpoint, if it is not.
pub fn check(p: &Path, expect: Option<&Expect>) -> Result<()> {
    if let Some(f) = FILES.iter().find(|f| !p.join(f).is_file()) {
        bail!("{f} is missing");
    }
    let state = read_state(p)?;
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse::<usize>().ok()) {
        if state.step != n {
            bail!("its state.json says step {}, its name says {n}", state.step);
        }
    }
    let model = header_shapes(&p.join(MODEL_FILE))?;
    let optim = header_shapes(&p.join(OPTIM_FILE))?;
    if let Some(e) = expect {
        items_match(MODEL_FILE, &model, e.model, e.world_size)?;
        if let Some(items) = e.optim {
            items_match(OPTIM_FILE, &optim, items, e.world_size)?;
        }
    }
    Ok(())
}

fn items_match(file: &str, shapes: &HashMap<String, Vec<i64>>, items: &[StateItem], p: usize) -> Result<()> {
    for item in items {
        let have = shapes.get(&item.name).with_context(|| format!("{file}: `{}` is missing", item.name))?;
        let want = item.canonical_shape(p);
        if *have != want {
            bail!(
                "{file}: `{}` has shape {have:?}, this run expects {want:?} (a different model, method or queue size?)",
                item.name
            );
        }
    }
    Ok(())
}

/// The tensor shapes of a safetensors file, read from its header alone; the
/// header must parse and its data offsets must cover the file exactly.
pub fn header_shapes(path: &Path) -> Result<HashMap<String, Vec<i64>>> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).with_context(|| format!("{}: shorter than a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        bail!("{}: header length {n} does not fit the file's {len} bytes", path.display());
    }
    let mut header = Vec::new();
    header.try_reserve_exact(n as usize)?;
    f.take(n).read_to_end(&mut header)?;
    let parsed: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).with_context(|| format!("{}: the header does not parse", path.display()))?;
    let (mut shapes, mut end) = (HashMap::new(), 0u64);
    for (name, v) in parsed.into_iter().filter(|(k, _)| k != "__metadata__") {
        let shape: Option<Vec<i64>> = v["shape"].as_array().map(|a| a.iter().filter_map(|d| d.as_i64()).collect());
        let offsets = v["data_offsets"].as_array().and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
        let (Some(shape), Some((_, stop))) = (shape, offsets) else {
            bail!("{}: `{name}` has no shape or data offsets", path.display());
        };
        end = end.max(stop);
        shapes.insert(name, shape);
    }
    if end != len - 8 - n {
        bail!("{}: the tensors end at byte {end} of a {}-byte data section (truncated?)", path.display(), len - 8 - n);
    }
    Ok(shapes)
}
