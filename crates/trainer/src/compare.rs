//! `trainer compare RUN_DIR…`: the runs of a sweep side by side. One row per
//! run: the config keys whose values differ between the runs (from each run's
//! resolved `config.yaml`, so defaults count), then the figures of its
//! `summary.json`, as a Markdown table.

use crate::rundir::{CONFIG_FILE, SUMMARY_FILE};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The summary figures shown, in order (a run without one shows `-`).
const FIGURES: [&str; 7] =
    ["steps", "final_loss", "knn_top1", "linear_top1", "zero_shot_top1", "samples_per_s", "best_member"];

/// Keys that differ by construction and say nothing of the run.
const IGNORED: [&str; 1] = ["checkpoint.dir"];

/// One run: its directory, its flattened config and its summary (if written).
struct RunRecord {
    dir: PathBuf,
    config: BTreeMap<String, String>,
    summary: Option<serde_json::Value>,
}

/// `key.sub.leaf` → the value as YAML writes it, for every leaf of `v`.
fn flatten(prefix: &str, v: &yaml_serde::Value, out: &mut BTreeMap<String, String>) {
    match v {
        yaml_serde::Value::Mapping(m) => {
            for (k, child) in m {
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
                let full = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                flatten(&full, child, out);
            }
        }
        leaf => {
            let text = yaml_serde::to_string(leaf).unwrap_or_default();
            out.insert(prefix.to_string(), text.trim().replace('\n', " "));
        }
    }
}

fn read_run(dir: &Path) -> Result<RunRecord> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: not a run directory (no readable {CONFIG_FILE})", dir.display()))?;
    let yaml: yaml_serde::Value = yaml_serde::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut config = BTreeMap::new();
    flatten("", &yaml, &mut config);
    let summary = std::fs::read_to_string(dir.join(SUMMARY_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    Ok(RunRecord { dir: dir.to_path_buf(), config, summary })
}

/// A figure of a summary, as the table shows it.
fn figure(summary: Option<&serde_json::Value>, key: &str) -> String {
    match summary.and_then(|s| s.get(key)) {
        Some(serde_json::Value::Number(n)) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(f64::NAN)),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    }
}

/// The table of `runs`: a header, then one row per run.
pub fn compare_table(runs: &[PathBuf]) -> Result<String> {
    if runs.is_empty() {
        bail!("give one or more run directories");
    }
    let records: Vec<RunRecord> = runs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let keys: std::collections::BTreeSet<&String> = records.iter().flat_map(|r| r.config.keys()).collect();
    let differing: Vec<&String> = keys
        .into_iter()
        .filter(|k| !IGNORED.contains(&k.as_str()))
        .filter(|k| records.iter().any(|r| r.config.get(*k) != records[0].config.get(*k)))
        .collect();
    let shown: Vec<&str> =
        FIGURES.iter().copied().filter(|f| records.iter().any(|r| figure(r.summary.as_ref(), f) != "-")).collect();
    let mut header = vec!["run".to_string()];
    header.extend(differing.iter().map(|k| k.to_string()));
    header.extend(shown.iter().map(|f| f.to_string()));
    let mut lines = vec![row(&header), row(&vec!["---".to_string(); header.len()])];
    for r in &records {
        let mut cells = vec![r.dir.display().to_string()];
        cells.extend(differing.iter().map(|k| r.config.get(*k).cloned().unwrap_or_else(|| "-".into())));
        cells.extend(shown.iter().map(|f| figure(r.summary.as_ref(), f)));
        lines.push(row(&cells));
    }
    Ok(lines.join("\n") + "\n")
}

fn row(cells: &[String]) -> String {
    format!("| {} |", cells.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "))
}

/// `trainer compare RUN_DIR…`: print the table on stdout.
pub fn compare_command(runs: &[PathBuf]) -> Result<()> {
    print!("{}", compare_table(runs)?);
    Ok(())
}
