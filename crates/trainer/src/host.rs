//! What this process runs on: its cores, the host's cores, and the device
//! `train.device` names (checked before any training, and by `trainer config`).

use anyhow::{bail, Context, Result};
use tch::Device;

/// Cores this process may use (its affinity mask, as `available_parallelism` reads it).
pub fn rank_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Logical cores online on this host (`/sys/devices/system/cpu/online`, e.g. `0-7,16-23`),
/// whatever this process's affinity; falls back to the affinity count.
pub fn host_cores() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/online").ok().and_then(|s| {
        s.trim()
            .split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?),
                None => r.parse::<usize>().ok().map(|_| 1),
            })
            .sum::<Option<usize>>()
    });
    parsed.filter(|&n| n > 0).unwrap_or_else(rank_cores)
}

/// Pick the device: `cpu`, `cuda[:K]`, or `auto` (GPU local_rank mod count when CUDA is present).
pub fn resolve_device(spec: &str, local_rank: usize) -> Result<Device> {
    let gpus = tch::Cuda::device_count() as usize;
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" if gpus == 0 => Device::Cpu,
        "auto" | "cuda" => {
            if gpus == 0 {
                bail!("train.device=cuda but libtorch sees no CUDA device");
            }
            Device::Cuda(local_rank % gpus)
        }
        s => {
            let k: usize =
                s.strip_prefix("cuda:").and_then(|k| k.parse().ok()).with_context(|| format!("train.device `{s}`"))?;
            if k >= gpus {
                bail!("train.device={s} but libtorch sees {gpus} CUDA device(s)");
            }
            Device::Cuda(k)
        }
    })
}
