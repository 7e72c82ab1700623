//! Tests of the in-process backends and the launch checks.

use super::*;

#[test]
fn threaded_collectives_match_their_definitions() {
    for p in 1..=4usize {
        let out = Threads::run(p, |c| {
            let r = c.rank() as i64;
            let g = c.all_gather(&[r, 10 * r]);
            let want: Vec<i64> = (0..p as i64).flat_map(|k| [k, 10 * k]).collect();
            assert_eq!(g, want);

            let send: Vec<f64> = (0..2 * p).map(|j| (c.rank() * 100 + j) as f64).collect();
            let rs = c.reduce_scatter_sum(&send);
            let expect: Vec<f64> = (0..2).map(|k| (0..p).map(|q| (q * 100 + c.rank() * 2 + k) as f64).sum()).collect();
            assert_eq!(rs, expect);

            let mut s = [c.rank() as f32 + 1.0];
            c.all_reduce_sum(&mut s);
            assert_eq!(s[0], (p * (p + 1) / 2) as f32);

            let mut m = [c.rank() as u8, 7 - c.rank() as u8];
            c.all_reduce_max(&mut m);
            assert_eq!(m, [p as u8 - 1, 7]);

            let send: Vec<i64> = (0..p as i64).map(|j| 10 * r + j).collect();
            let a2a = c.all_to_all(&send);
            let want: Vec<i64> = (0..p as i64).map(|q| 10 * q + r).collect();
            assert_eq!(a2a, want);

            let mut b = [c.rank() as f32; 3];
            c.broadcast(&mut b, p - 1);
            assert_eq!(b, [(p - 1) as f32; 3]);
            c.barrier();
            c.rank()
        });
        assert_eq!(out, (0..p).collect::<Vec<_>>());
    }
}

#[test]
fn a_panicking_rank_fails_the_run_instead_of_deadlocking_it() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = std::panic::catch_unwind(|| {
            Threads::run(3, |c| {
                if c.rank() == 1 {
                    panic!("rank 1 fails");
                }
                let mut v = [1.0f64];
                c.all_reduce_sum(&mut v);
                v[0]
            })
        });
        let message = out.err().and_then(|e| e.downcast_ref::<&str>().map(|s| s.to_string()));
        let _ = tx.send(message);
    });
    let message = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the threaded ranks deadlocked");
    assert_eq!(message.as_deref(), Some("rank 1 fails"));
}

#[test]
fn local_ranks_follow_hosts() {
    let got = Threads::run_on_hosts(5, 2, |c| (c.local_rank(), c.local_size()));
    assert_eq!(got, vec![(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]);
}

#[test]
fn launches_that_would_not_form_one_job_are_refused() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |v: &str| pairs.iter().find(|(k, _)| *k == v).map(|(_, x)| x.to_string())
    };
    assert_eq!(launcher_world_size(env(&[("PMI_SIZE", "4"), ("SLURM_STEP_NUM_TASKS", "8")])), Some((4, "PMI_SIZE")));
    assert_eq!(launcher_world_size(env(&[("SLURM_STEP_NUM_TASKS", "8")])), Some((8, "SLURM_STEP_NUM_TASKS")));
    assert_eq!(launcher_world_size(env(&[("SLURM_NTASKS", "8")])), None, "the batch shell is no step");
    assert_eq!(launcher_rank(env(&[("PMIX_RANK", "3")])), Some(3));
    assert_eq!(launcher_rank(env(&[("SLURM_PROCID", "5")])), Some(5));
    // A build without MPI under srun or MPICH.
    let err = check_launch(Some((4, "PMI_SIZE")), None).unwrap_err();
    assert!(err.contains("without feature `mpi`") && err.contains("PMI_SIZE=4"), "{err}");
    assert!(check_launch(Some((1, "SLURM_STEP_NUM_TASKS")), None).is_ok());
    assert!(check_launch(None, None).is_ok());
    // srun without a PMI plugin: every task is a world of one.
    let err = check_launch(Some((8, "SLURM_STEP_NUM_TASKS")), Some(1)).unwrap_err();
    assert!(err.contains("--mpi=pmix"), "{err}");
    assert!(check_launch(Some((2, "OMPI_COMM_WORLD_SIZE")), Some(2)).is_ok());
}

#[test]
fn solo_is_identity() {
    let c = Solo;
    assert_eq!(c.all_gather(&[1.0f32, 2.0]), vec![1.0, 2.0]);
    assert_eq!((c.rank(), c.world_size()), (0, 1));
}

#[test]
fn split_groups_the_ranks_of_a_color_in_rank_order_and_nests() {
    let out = Threads::run_on_hosts(5, 2, |c| {
        // Colors 0 (ranks 0, 2, 4) and 1 (ranks 1, 3).
        let sub = c.split(c.rank() % 2);
        let members: Vec<i64> = sub.all_gather(&[c.rank() as i64]);
        assert_eq!(sub.rank(), c.rank() / 2);
        let mut sum = [c.rank() as f64];
        sub.all_reduce_sum(&mut sum);
        let mut b = [c.rank() as u8];
        sub.broadcast(&mut b, sub.world_size() - 1);
        // Hosts of two ranks: {0,1} {2,3} {4}; color 0's ranks 0, 2, 4 sit on three hosts.
        let local = (sub.local_rank(), sub.local_size());
        // The parent still works, and a split of a split groups within it.
        let mut all = [1i64];
        c.all_reduce_sum(&mut all);
        assert_eq!(all[0], 5);
        let inner = sub.split(usize::from(sub.rank() == 0));
        let mut n = [1i64];
        inner.all_reduce_sum(&mut n);
        (members, sum[0], b[0], local, n[0])
    });
    assert_eq!(out[0], (vec![0, 2, 4], 6.0, 4, (0, 1), 1));
    assert_eq!(out[1], (vec![1, 3], 4.0, 3, (0, 1), 1));
    assert_eq!(out[2], (vec![0, 2, 4], 6.0, 4, (0, 1), 2));
    assert_eq!(out[3], (vec![1, 3], 4.0, 3, (0, 1), 1));
    assert_eq!(out[4].4, 2);
    assert_eq!(Solo.split(3).world_size(), 1);
}

#[test]
fn a_panic_in_a_split_group_breaks_every_group_instead_of_hanging() {
    let caught = std::panic::catch_unwind(|| {
        Threads::run(4, |c| {
            let sub = c.split(c.rank() % 2);
            if c.rank() == 1 {
                panic!("rank 1 fails");
            }
            sub.barrier();
            c.barrier();
        })
    });
    let e = caught.expect_err("the panic is re-raised");
    assert_eq!(e.downcast_ref::<&str>(), Some(&"rank 1 fails"));
}
