//! A run directory belongs to one run.
//!
//! Before it writes anything, rank 0 of a training run takes an exclusive
//! `flock` on `checkpoint.dir/.lock` and holds it until the process ends, so a
//! second run into the same directory (a job submitted twice, a requeue racing
//! a zombie) is refused at start instead of interleaving records and replacing
//! checkpoints. Holding the lock, it removes the temporary files that dead
//! processes left, and refuses a fresh run into a directory holding another
//! run's checkpoints or records unless `checkpoint.overwrite` is set (then it
//! removes them first, so two runs' files are never mixed).

use crate::rundir::{self, LOCK_FILE};
use anyhow::{bail, Context, Result};
use contrast_comm::Collective;
use contrast_config::Plan;
use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::Path;

/// The lock of a run directory, held while this value lives (rank 0 only).
pub struct RunLock {
    _file: Option<File>,
}

/// Claim `checkpoint.dir` for this run. Collective: rank 0 decides and every
/// rank returns its verdict.
pub fn claim<C: Collective>(comm: &C, plan: &Plan) -> Result<RunLock> {
    let mine = if comm.rank() == 0 { claim_on_rank_0(plan) } else { Ok(None) };
    let verdict = match &mine {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    };
    let verdict = crate::agree::broadcast_text(comm, &verdict, 0);
    match mine {
        Err(e) => Err(e),
        Ok(_) if !verdict.is_empty() => bail!("rank 0 refused checkpoint.dir: {verdict}"),
        Ok(file) => Ok(RunLock { _file: file }),
    }
}

fn claim_on_rank_0(plan: &Plan) -> Result<Option<File>> {
    let c = &plan.config.checkpoint;
    let dir = &c.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint.dir {}", dir.display()))?;
    let file = if c.lock {
        Some(lock(dir)?)
    } else {
        tracing::warn!("checkpoint.lock=false: nothing stops a second run from writing into {}", dir.display());
        None
    };
    remove_stale_temporaries(dir)?;
    if !plan.config.train.resume {
        claim_fresh(dir, c.overwrite)?;
    }
    Ok(file)
}

/// Take the exclusive lock on `dir/.lock` and write who holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let holder = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
            bail!(
                "checkpoint.dir {} is in use by another run{holder}: two runs in one directory would replace \
                 each other's checkpoints and records. Wait for it to end, or give this run another checkpoint.dir",
                dir.display()
            );
        }
        Err(TryLockError::Error(e)) => bail!(
            "checkpoint.dir {}: the filesystem refused to lock {} ({e}); see docs/reliability.md \
             (use a filesystem with flock, or set checkpoint.lock=false and make sure no two runs share the directory)",
            dir.display(),
            path.display()
        ),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let who = format!("pid {} on {}", std::process::id(), host.trim());
    file.set_len(0).and_then(|_| file.write_all(who.as_bytes())).context("writing the lock file")?;
    Ok(file)
}

/// Remove what dead processes left half-written, and a killed run's discovery
/// file, whose ports nobody serves (the lock says no writer is alive).
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading checkpoint.dir {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if rundir::is_tmp_name(&name) || name == rundir::TARGETS_FILE {
            let p = entry.path();
            remove(&p).with_context(|| format!("removing the stale temporary {}", p.display()))?;
            tracing::info!("removed {}, left by a process that died", p.display());
        }
    }
    Ok(())
}

/// A fresh run: refuse another run's checkpoints and records, or remove them
/// when `overwrite` is set.
fn claim_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    let mut old: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| rundir::is_run_output(n))
        .collect();
    old.sort();
    if old.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let shown = old.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
        bail!(
            "checkpoint.dir {} holds another run ({shown}{}): a fresh run (train.resume=false) would mix its files \
             with that run's. Resume it (--set train.resume=true), choose another checkpoint.dir, or set \
             checkpoint.overwrite=true to delete them first",
            dir.display(),
            if old.len() > 6 { ", …" } else { "" }
        );
    }
    for name in &old {
        let p = dir.join(name);
        remove(&p).with_context(|| format!("checkpoint.overwrite: removing {}", p.display()))?;
    }
    tracing::warn!("checkpoint.overwrite=true: removed the previous run's {} from {}", old.join(", "), dir.display());
    Ok(())
}

/// Remove a file or a directory with its contents (a link itself, not its target).
fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p)?.is_dir() {
        true => std::fs::remove_dir_all(p),
        false => std::fs::remove_file(p),
    }
}
