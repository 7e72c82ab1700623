//! N ranks as threads of one process (tests): rank-ordered sums, so every
//! rank sees bit-identical results; a panicking rank breaks the barrier for all.

use crate::{maximum, Collective, Element};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

struct Shared {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: RankBarrier,
    /// The groups split from this one, by (split number, color): every member
    /// of a new group takes the same one; a panic breaks them all.
    children: Mutex<HashMap<(u64, usize), Arc<Shared>>>,
}

impl Shared {
    fn new(size: usize) -> Self {
        Self {
            slots: Mutex::new(vec![Vec::new(); size]),
            barrier: RankBarrier::new(size),
            children: Default::default(),
        }
    }

    /// Break this group's barrier and every group split from it.
    fn break_all(&self) {
        self.barrier.break_all();
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.values().for_each(|c| c.break_all());
    }
}

/// A barrier that a panicking rank breaks: the ranks waiting at it (or arriving
/// later) panic too, so a failing rank fails the test instead of deadlocking it.
struct RankBarrier {
    /// (arrived in this generation, generation, broken).
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
    size: usize,
}

impl RankBarrier {
    fn new(size: usize) -> Self {
        Self { state: Mutex::new((0, 0, false)), cv: Condvar::new(), size }
    }

    fn wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.2 {
            panic!("another rank panicked");
        }
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.size {
            *st = (0, generation + 1, false);
            self.cv.notify_all();
            return;
        }
        while st.1 == generation && !st.2 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.1 == generation {
            panic!("another rank panicked");
        }
    }

    fn break_all(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2 = true;
        self.cv.notify_all();
    }
}

/// One rank of a group of ranks that are threads of this process.
///
/// Made by [`Threads::run`]; used for tests of the global-batch engine without
/// MPI. Every operation is two barriers around a shared slot table.
pub struct Threads {
    rank: usize,
    size: usize,
    /// The host of each rank of the group (local rank and size follow from it).
    hosts: Arc<Vec<usize>>,
    shared: Arc<Shared>,
    /// Splits made so far (every rank makes the same ones in the same order).
    splits: AtomicU64,
}

impl Threads {
    /// Run `f` on `p` ranks, each a thread, and return the results in rank
    /// order. A panic on any rank is re-raised here.
    pub fn run<R, F>(p: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(Threads) -> R + Sync,
    {
        Self::run_on_hosts(p, p, f)
    }

    /// As [`Threads::run`], pretending `ranks_per_host` ranks share each host
    /// (for tests of local rank and thread choices).
    pub fn run_on_hosts<R, F>(p: usize, ranks_per_host: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(Threads) -> R + Sync,
    {
        assert!(p > 0 && ranks_per_host > 0);
        let shared = Arc::new(Shared::new(p));
        let hosts = Arc::new((0..p).map(|r| r / ranks_per_host).collect::<Vec<_>>());
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..p)
                .map(|rank| {
                    let comm = Threads {
                        rank,
                        size: p,
                        hosts: hosts.clone(),
                        shared: shared.clone(),
                        splits: AtomicU64::new(0),
                    };
                    let (f, shared) = (&f, shared.clone());
                    s.spawn(move || {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
                        out.unwrap_or_else(|e| {
                            shared.break_all();
                            std::panic::resume_unwind(e)
                        })
                    })
                })
                .collect();
            let joined: Vec<std::thread::Result<R>> = handles.into_iter().map(|h| h.join()).collect();
            // Re-raise the panic that broke the barrier, not one of the ranks that followed it.
            let secondary = |e: &Box<dyn std::any::Any + Send>| {
                e.downcast_ref::<&str>().is_some_and(|m| *m == "another rank panicked")
            };
            let first = joined.iter().position(|r| r.as_ref().is_err_and(|e| !secondary(e)));
            if let Some(i) = first.or_else(|| joined.iter().position(|r| r.is_err())) {
                let mut joined = joined;
                std::panic::resume_unwind(joined.swap_remove(i).err().unwrap());
            }
            joined.into_iter().map(|r| r.ok().unwrap()).collect()
        })
    }

    /// Publish `bytes` in this rank's slot, wait for all, run `read` on the
    /// table, wait again so no slot is overwritten while others still read.
    fn exchange<R>(&self, bytes: &[u8], read: impl FnOnce(&[Vec<u8>]) -> R) -> R {
        {
            let mut slots = self.shared.slots.lock().unwrap();
            slots[self.rank].clear();
            slots[self.rank].extend_from_slice(bytes);
        }
        self.shared.barrier.wait();
        let out = {
            let slots = self.shared.slots.lock().unwrap();
            read(&slots)
        };
        self.shared.barrier.wait();
        out
    }

    fn elements<T: Element>(bytes: &[u8]) -> Vec<T> {
        // Slots are byte vectors (alignment 1): copy instead of casting in place.
        let mut out = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(bytes);
        out
    }

    fn reduce_into<T: Element>(&self, buf: &mut [T], op: fn(T, T) -> T) {
        let n = buf.len();
        let sum = self.exchange(bytemuck::cast_slice(buf), |slots| {
            let mut acc = Self::elements::<T>(&slots[0]);
            for s in &slots[1..] {
                let v = Self::elements::<T>(s);
                assert_eq!(v.len(), n, "all_reduce: ranks passed buffers of different lengths");
                for (a, b) in acc.iter_mut().zip(v) {
                    *a = op(*a, b);
                }
            }
            acc
        });
        buf.copy_from_slice(&sum);
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        let host = self.hosts[self.rank];
        self.hosts[..self.rank].iter().filter(|&&h| h == host).count()
    }
    fn local_size(&self) -> usize {
        let host = self.hosts[self.rank];
        self.hosts.iter().filter(|&&h| h == host).count()
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.exchange(bytemuck::cast_slice(send), |slots| {
            let mut out = Vec::with_capacity(send.len() * slots.len());
            for s in slots {
                assert_eq!(s.len(), std::mem::size_of_val(send), "all_gather: unequal lengths across ranks");
                out.extend(Self::elements::<T>(s));
            }
            out
        })
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        assert_eq!(
            send.len() % self.size,
            0,
            "reduce_scatter_sum: length {} not divisible by P={}",
            send.len(),
            self.size
        );
        let n = send.len() / self.size;
        let rank = self.rank;
        self.exchange(bytemuck::cast_slice(send), |slots| {
            let mut acc = vec![T::zeroed(); n];
            for s in slots {
                let v = Self::elements::<T>(s);
                for (a, b) in acc.iter_mut().zip(&v[rank * n..(rank + 1) * n]) {
                    *a = a.add(*b);
                }
            }
            acc
        })
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        // Start from zero so that the order of additions is the same on every rank.
        self.reduce_into(buf, T::add)
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        self.reduce_into(buf, maximum)
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        assert_eq!(send.len() % self.size, 0, "all_to_all: length not divisible by P");
        let n = send.len() / self.size;
        let rank = self.rank;
        self.exchange(bytemuck::cast_slice(send), |slots| {
            slots.iter().flat_map(|s| Self::elements::<T>(s)[rank * n..(rank + 1) * n].to_vec()).collect()
        })
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        let got = self.exchange(bytemuck::cast_slice(buf), |slots| Self::elements::<T>(&slots[root]));
        buf.copy_from_slice(&got);
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
    fn split(&self, color: usize) -> Self {
        let colors = self.all_gather(&[color as i64]);
        let members: Vec<usize> = (0..self.size).filter(|&r| colors[r] == color as i64).collect();
        let rank = members.iter().position(|&r| r == self.rank).expect("a member of its own color");
        let n = self.splits.fetch_add(1, Ordering::SeqCst);
        let shared = {
            let mut children = self.shared.children.lock().unwrap_or_else(|e| e.into_inner());
            children.entry((n, color)).or_insert_with(|| Arc::new(Shared::new(members.len()))).clone()
        };
        let hosts = Arc::new(members.iter().map(|&r| self.hosts[r]).collect());
        Threads { rank, size: members.len(), hosts, shared, splits: AtomicU64::new(0) }
    }
}
