//! Prometheus service discovery: rank 0 writes every rank's `/metrics` address
//! to `checkpoint.dir/prometheus-targets.json` in `file_sd` format, so a
//! Prometheus whose `file_sd_configs` globs the runs' directories finds each
//! job's ranks, whatever ports they bound (`metrics.listen` port 0 picks free
//! ones), and two jobs on one node never scrape each other silently.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use crate::rundir::TARGETS_FILE;

/// The `host:port` a scraper reaches a rank bound to `bound` at: the address
/// itself, or this host's name when the rank listens on every interface.
pub fn scrape_target(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    if host.is_empty() {
        bound.to_string()
    } else {
        format!("{host}:{}", bound.port())
    }
}

/// Write `targets` (`host:port`, in rank order) with `labels` to
/// `dir/prometheus-targets.json` (a list of one `{"targets", "labels"}`
/// group; written, then renamed, so Prometheus never reads half a file).
pub fn write_targets(dir: &Path, targets: &[String], labels: &[(&str, String)]) -> Result<PathBuf> {
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect();
    let groups = serde_json::json!([{ "targets": targets, "labels": labels }]);
    let path = dir.join(TARGETS_FILE);
    let tmp = dir.join(crate::rundir::tmp_name(TARGETS_FILE, None));
    std::fs::create_dir_all(dir).with_context(|| format!("checkpoint.dir {}", dir.display()))?;
    std::fs::write(&tmp, serde_json::to_string_pretty(&groups)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(path)
}
