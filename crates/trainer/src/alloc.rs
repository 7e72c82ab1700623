//! The process allocator, and the counters the trainer reads of the process
//! (page faults, peak RSS, the data workers' CPU time).
//!
//! jemalloc serves every allocation of the trainer, libtorch's included: its
//! malloc symbols are unprefixed (`tikv-jemallocator`'s
//! `unprefixed_malloc_on_supported_platforms`), so libtorch's `posix_memalign`
//! resolves to it. Under glibc, every buffer over 32 MiB (the ceiling of its
//! dynamic mmap threshold) is a fresh `mmap`, faulted in page by page and
//! unmapped at `free`, every step: SimCLR at global batch 4096 on 2 ranks spent
//! more time in the kernel than in user space (docs/benchmarks.md).
//!
//! [`MALLOC_CONF`] keeps freed pages (no decay) during training, so each step
//! reuses the previous step's buffers; [`release`] hands the unused pages back
//! to the system when the working set shrinks (training ends, an evaluation
//! ends). `MALLOC_CONF` in the environment still overrides it.

/// jemalloc's options, read before `main`: keep dirty and muzzy pages (no decay)
/// and retain virtual memory, so a step's large buffers are reused, not faulted
/// in afresh; a background thread does the purging that [`release`] asks for.
// jemalloc reads this symbol by name (its own definition is weak): the one
// place the trainer exports a symbol.
#[allow(unsafe_code)]
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: &[u8; 71] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true,background_thread:true\0";

/// Return the pages jemalloc holds but no allocation uses to the system
/// (`arena.<all>.purge`). A no-op when jemalloc is not the process allocator.
pub fn release() {
    // MALLCTL_ARENAS_ALL = 4096: every arena.
    let name = b"arena.4096.purge\0";
    // SAFETY: `mallctl` with a NUL-terminated name and no old/new values, as jemalloc's
    // manual documents for `arena.<i>.purge`; it touches no Rust memory.
    #[allow(unsafe_code)]
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!("jemalloc purge returned {rc}");
    }
}

/// jemalloc's `opt.dirty_decay_ms` as this process runs it (`None` when it
/// cannot be read): −1 means freed pages are kept for reuse.
pub fn dirty_decay_ms() -> Option<i64> {
    // Keeps the options' symbol in every binary that asks (the linker drops unreferenced members).
    std::hint::black_box(MALLOC_CONF);
    let name = b"opt.dirty_decay_ms\0";
    let mut value: isize = 0;
    let mut len = std::mem::size_of::<isize>();
    // SAFETY: `opt.dirty_decay_ms` is an `ssize_t`; `value` and `len` describe a
    // buffer of exactly that size, as `mallctl` requires.
    #[allow(unsafe_code)]
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            (&mut value as *mut isize).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(value as i64)
}

/// This process's counters, from `/proc/self` (Linux; zeros elsewhere).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessCounters {
    /// Minor page faults since the process started (`/proc/self/stat` field 10).
    pub minor_faults: u64,
    /// Peak resident set size in bytes (`VmHWM` of `/proc/self/status`).
    pub peak_rss_bytes: u64,
    /// CPU seconds the data workers (threads named `data-<k>`) have run so far
    /// (`/proc/self/task/<tid>/schedstat`): the data cost a step's wait hides.
    pub data_cpu_s: f64,
}

impl ProcessCounters {
    /// Read the counters now.
    pub fn now() -> Self {
        Self {
            minor_faults: minor_faults().unwrap_or(0),
            peak_rss_bytes: peak_rss().unwrap_or(0),
            data_cpu_s: data_cpu_s(),
        }
    }
}

fn data_cpu_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let is_worker = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.starts_with("data-"));
        if is_worker {
            let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is parenthesised and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": state (3), ppid, pgrp, session, tty_nr, tpgid, flags, minflt (10).
    rest.split_whitespace().nth(7)?.parse().ok()
}

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
