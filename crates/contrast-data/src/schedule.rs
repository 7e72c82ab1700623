//! A RandAugment schedule: the (N ops, magnitude M) in force from each step on
//! (`data.aug.randaugment_schedule`), the form population-based augmentation
//! (PBA) writes the schedule it found in, so that a normal run replays it.
//!
//! The file is a JSON list of phases, `[{"step": 0, "n": 1, "m": 5}, {"step":
//! 300, "n": 2, "m": 9}, …]`: the first starts at step 0, steps increase, N is
//! at most 16 and M at most 30 (RandAugment's 31 bins). Step s (0-based) uses
//! the last phase whose step is at most s; N = 0 applies no op.

use crate::DataError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Most RandAugment ops per view.
pub const MAX_OPS: usize = 16;
/// The largest magnitude (of bins 0..=30).
pub const MAX_MAGNITUDE: u32 = 30;

/// One phase of a schedule: from `step` on, `n` ops at magnitude `m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// The first step (0-based) of the phase.
    pub step: usize,
    /// RandAugment ops per view.
    pub n: usize,
    /// Their magnitude.
    pub m: u32,
}

/// A checked schedule of RandAugment phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandAugSchedule {
    phases: Vec<Phase>,
}

impl RandAugSchedule {
    /// A schedule of `phases`, or what is wrong with them.
    pub fn new(phases: Vec<Phase>) -> Result<Self, String> {
        match phases.first() {
            None => return Err("holds no phase".into()),
            Some(p) if p.step != 0 => return Err(format!("its first phase starts at step {}, not 0", p.step)),
            _ => {}
        }
        for (i, p) in phases.iter().enumerate() {
            if i > 0 && p.step <= phases[i - 1].step {
                return Err(format!(
                    "phase {i} starts at step {}, not after phase {}'s {}",
                    p.step,
                    i - 1,
                    phases[i - 1].step
                ));
            }
            if p.n > MAX_OPS || p.m > MAX_MAGNITUDE {
                return Err(format!(
                    "phase {i}: n {} and m {} must lie in 0..={MAX_OPS} and 0..={MAX_MAGNITUDE}",
                    p.n, p.m
                ));
            }
        }
        Ok(Self { phases })
    }

    /// Read a schedule file; an error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
        let text =
            std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        let phases: Vec<Phase> = serde_json::from_str(&text)
            .map_err(|e| format(format!("not a RandAugment schedule ([{{\"step\", \"n\", \"m\"}}, …]): {e}")))?;
        Self::new(phases).map_err(format)
    }

    /// The (N, M) of step `step` (0-based).
    pub fn at(&self, step: usize) -> (usize, u32) {
        let i = self.phases.partition_point(|p| p.step <= step);
        let p = &self.phases[i.max(1) - 1];
        (p.n, p.m)
    }

    /// The phases, in order.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// The schedule as its file's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.phases).expect("phases serialise")
    }
}

/// The ops per view population-based augmentation searches: 0..=`SEARCH_OPS`
/// (more than a few ops at once wash a 28-pixel image out).
pub const SEARCH_OPS: usize = 3;

/// A member's first (N, M) in population-based augmentation: uniform over
/// N in 0..=[`SEARCH_OPS`] and M in 0..=[`MAX_MAGNITUDE`], drawn from `key`
/// (of the seed and the member).
pub fn initial(key: u64) -> (usize, u32) {
    use rand::Rng;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(key);
    (rng.gen_range(0..=SEARCH_OPS), rng.gen_range(0..=MAX_MAGNITUDE))
}

/// PBA's explore step on a copied (N, M), drawn from `key` (of the seed, the
/// step and the member): with probability 0.2 each number is drawn afresh
/// over its range, else M moves by 0 to 3 bins and N by at most one op, in
/// either direction, clamped to the range (Ho et al. 2019, Algorithm 2, on
/// RandAugment's two numbers).
pub fn explore(n: usize, m: u32, key: u64) -> (usize, u32) {
    use rand::Rng;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(key);
    let n = if rng.gen_bool(0.2) {
        rng.gen_range(0..=SEARCH_OPS)
    } else {
        (n as i64 + rng.gen_range(-1..=1)).clamp(0, SEARCH_OPS as i64) as usize
    };
    let m = if rng.gen_bool(0.2) {
        rng.gen_range(0..=MAX_MAGNITUDE)
    } else {
        let step = rng.gen_range(0..=3) * if rng.gen_bool(0.5) { 1 } else { -1 };
        (m as i64 + step).clamp(0, MAX_MAGNITUDE as i64) as u32
    };
    (n, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(step: usize, n: usize, m: u32) -> Phase {
        Phase { step, n, m }
    }

    #[test]
    fn each_step_takes_the_last_phase_that_started() {
        let s = RandAugSchedule::new(vec![phase(0, 1, 5), phase(10, 2, 9), phase(25, 0, 0)]).unwrap();
        let at: Vec<(usize, u32)> = [0, 9, 10, 24, 25, 1000].iter().map(|&k| s.at(k)).collect();
        assert_eq!(at, [(1, 5), (1, 5), (2, 9), (2, 9), (0, 0), (0, 0)]);
        let back: Vec<Phase> = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(RandAugSchedule::new(back).unwrap(), s);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong_and_name_the_file() {
        for (phases, why) in [
            (vec![], "no phase"),
            (vec![phase(3, 1, 5)], "first phase starts at step 3"),
            (vec![phase(0, 1, 5), phase(0, 2, 5)], "phase 1 starts at step 0"),
            (vec![phase(0, 17, 5)], "phase 0: n 17"),
            (vec![phase(0, 1, 31)], "m 31"),
        ] {
            let err = RandAugSchedule::new(phases).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        for (text, why) in [
            ("{\"step\": 0}", "not a RandAugment schedule"),
            ("[{\"step\": 0, \"n\": 1, \"m\": 2, \"p\": 1}]", "unknown field"),
            ("[]", "no phase"),
        ] {
            let path = dir.path().join("s.json");
            std::fs::write(&path, text).unwrap();
            let err = RandAugSchedule::load(&path).unwrap_err().to_string();
            assert!(err.contains("s.json") && err.contains(why), "{err}");
        }
        assert!(RandAugSchedule::load(&dir.path().join("none.json")).unwrap_err().to_string().contains("none.json"));
    }

    #[test]
    fn exploring_stays_in_range_moves_a_little_and_is_keyed() {
        let mut moved = 0;
        for k in 0..2000u64 {
            let (n0, m0) = initial(k);
            assert!(n0 <= SEARCH_OPS && m0 <= MAX_MAGNITUDE);
            let (n, m) = explore(n0, m0, k);
            assert_eq!(explore(n0, m0, k), (n, m), "a function of its key");
            assert!(n <= SEARCH_OPS && m <= MAX_MAGNITUDE);
            moved += ((n, m) != (n0, m0)) as usize;
        }
        // Most draws move; none is resampled more often than about one in five per number.
        assert!(moved > 1000, "{moved}");
        let far = (0..2000u64).filter(|&k| explore(1, 15, k).1.abs_diff(15) > 3).count();
        assert!((150..=500).contains(&far), "{far}");
        assert_ne!((0..50).map(initial).collect::<Vec<_>>(), (50..100).map(initial).collect::<Vec<_>>());
    }
}
