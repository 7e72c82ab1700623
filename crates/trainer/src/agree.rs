//! Ranks agree on the configuration before anything else is collective.
//!
//! Each rank resolves its own config (its own copy of the file, its own
//! `--set`s). Right after the communicator starts, before the dataset check,
//! the weight broadcast or the baseline evaluation, [`agree_on_config`]
//! all-gathers a hash of every rank's resolved config; when they differ,
//! rank 0's and the first differing rank's keys are broadcast and every rank
//! refuses with the same error naming the first differing key. Without this, a
//! different model size corrupts the heap inside `MPI_Allreduce`, a different
//! batch size aborts with MPI's truncation error, a different step count hangs
//! and a different temperature trains silently.

use anyhow::{bail, Result};
use contrast_comm::Collective;
use contrast_config::Plan;
use sha2::Digest;

/// Keys that may differ per node: they decide how a rank runs, never what the
/// job computes or which collectives it calls (docs/config.md lists them).
pub const EXEMPT_KEYS: [&str; 7] = [
    // The training set itself is compared by content (length and fingerprint),
    // so a node may stage it at another path.
    "data.root",
    "data.workers",
    "data.prefetch",
    "train.threads",
    "metrics.listen",
    "metrics.textfile_dir",
    // Only rank 0 reads the pretrained file; the weights it imports are broadcast.
    "model.pretrained_sha256",
];

/// Every compared key of a resolved config with its value (YAML text), in the
/// resolved file's order; mappings are walked, sequences are one value.
pub fn compared_keys(plan: &Plan) -> Vec<(String, String)> {
    let value: yaml_serde::Value = yaml_serde::from_str(&plan.resolved_yaml()).expect("resolved YAML parses");
    let text = |v: &yaml_serde::Value| yaml_serde::to_string(v).unwrap_or_default().trim().replace('\n', " ");
    contrast_config::leaves(&value)
        .into_iter()
        .filter(|(k, _)| !EXEMPT_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k, text(v)))
        .collect()
}

/// The compared keys as one text, `key: value` per line.
fn canonical(keys: &[(String, String)]) -> String {
    keys.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

/// Refuse, on every rank alike, a job whose ranks resolved different configs.
/// Collective: the first collective of every command.
pub fn agree_on_config<C: Collective>(comm: &C, plan: &Plan) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mine = canonical(&compared_keys(plan));
    let digest = sha2::Sha256::digest(mine.as_bytes());
    let hash = i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let all = comm.all_gather(&[hash]);
    let Some(other) = all.iter().position(|&h| h != all[0]) else { return Ok(()) };
    let zero = broadcast_text(comm, &mine, 0);
    let theirs = broadcast_text(comm, &mine, other);
    let differing = all.iter().filter(|&&h| h != all[0]).count();
    bail!("{}", describe_difference(&zero, &theirs, other, differing))
}

/// The error of a disagreement between rank 0's keys and rank `other`'s.
pub fn describe_difference(zero: &str, theirs: &str, other: usize, ranks: usize) -> String {
    let parse = |t: &str| -> Vec<(String, String)> {
        t.lines().filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_string(), v.to_string()))).collect()
    };
    let (a, b) = (parse(zero), parse(theirs));
    let lookup = |m: &[(String, String)], k: &str| m.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let mut keys: Vec<&String> = a.iter().map(|(k, _)| k).collect();
    keys.extend(b.iter().map(|(k, _)| k).filter(|k| lookup(&a, k).is_none()));
    let diff: Vec<&String> = keys.into_iter().filter(|k| lookup(&a, k) != lookup(&b, k)).collect();
    let show = |v: Option<String>| v.unwrap_or_else(|| "(not set)".into());
    let (first, more) = match diff.first() {
        Some(k) => (
            format!("`{k}` is {} on rank 0 but {} on rank {other}", show(lookup(&a, k)), show(lookup(&b, k))),
            diff.len() - 1,
        ),
        None => (format!("rank {other}'s resolved config hashes differently from rank 0's"), 0),
    };
    let more = if more > 0 { format!(" ({more} more key(s) differ)") } else { String::new() };
    let ranks = if ranks > 1 { format!("; {ranks} ranks differ from rank 0") } else { String::new() };
    format!(
        "the ranks resolved different configurations: {first}{more}{ranks}. Every rank must read the same \
         config file and the same --set overrides (docs/config.md lists the keys that may differ per node)"
    )
}

/// Broadcast `mine` from `root` (length first); every rank returns the root's text.
pub fn broadcast_text<C: Collective>(comm: &C, mine: &str, root: usize) -> String {
    let mut len = [mine.len() as i64];
    comm.broadcast(&mut len, root);
    if len[0] == 0 {
        // MPI may refuse an empty buffer (an empty Vec's pointer is dangling).
        return String::new();
    }
    let mut bytes = if comm.rank() == root { mine.as_bytes().to_vec() } else { vec![0u8; len[0] as usize] };
    comm.broadcast(&mut bytes, root);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Every rank's `mine` (of any length), in rank order, on every rank.
pub fn gather_text<C: Collective>(comm: &C, mine: &str) -> Vec<String> {
    let lens = comm.all_gather(&[mine.len() as i64]);
    let longest = lens.iter().copied().max().unwrap_or(0) as usize;
    if longest == 0 {
        return vec![String::new(); lens.len()];
    }
    let mut padded = mine.as_bytes().to_vec();
    padded.resize(longest, 0);
    let all = comm.all_gather(&padded);
    all.chunks(longest).zip(&lens).map(|(b, &n)| String::from_utf8_lossy(&b[..n as usize]).into_owned()).collect()
}
