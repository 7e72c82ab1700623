//! The population's record, `checkpoint.dir/population.json`: each member's
//! RandAugment schedule and every exploit-and-explore round so far. Every rank
//! holds the same record (each round is a function of the all-reduced
//! scores); rank 0 writes it, atomically, before the losers take the best
//! member's state, so that a resume can finish a round that was cut short.

use anyhow::{bail, Context, Result};
use contrast_data::rng::key;
use contrast_data::schedule::{explore, initial, Phase, RandAugSchedule};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Keys the schedules' random draws (with the seed, the step and the member).
const STREAM: u64 = 0x5042_4121;

/// One exploit-and-explore round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Round {
    /// The step every member had reached.
    pub step: usize,
    /// Each member's kNN top-1 on the held-out images.
    pub scores: Vec<f64>,
    /// The member the losers copied.
    pub best: usize,
    /// The worst quarter (at least one), worst first.
    pub losers: Vec<usize>,
}

/// The population's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Population {
    /// `method.population`.
    pub population: usize,
    /// `method.interval`.
    pub interval: usize,
    /// The run's seed.
    pub seed: u64,
    /// Each member's schedule, as `data.aug.randaugment_schedule` reads it.
    pub schedules: Vec<Vec<Phase>>,
    /// Every round so far, in order.
    pub rounds: Vec<Round>,
    /// The member with the best held-out kNN top-1 at the last step, once trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<usize>,
}

impl Population {
    /// A fresh population: member k starts from a schedule drawn from (seed, k).
    pub fn new(population: usize, interval: usize, seed: u64) -> Self {
        let schedules = (0..population)
            .map(|k| {
                let (n, m) = initial(key(&[seed, STREAM, 0, k as u64]));
                vec![Phase { step: 0, n, m }]
            })
            .collect();
        Self { population, interval, seed, schedules, rounds: Vec::new(), best: None }
    }

    /// Parse a record written by [`Population::to_json`], checked against the
    /// run's keys (an error names the key that changed).
    pub fn parse(text: &str, path: &Path, population: usize, interval: usize, seed: u64) -> Result<Self> {
        let p: Self = serde_json::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
        for (key, was, now) in [
            ("method.population", p.population as u64, population as u64),
            ("method.interval", p.interval as u64, interval as u64),
            ("seed", p.seed, seed),
        ] {
            if was != now {
                bail!("{}: `{key}` was {was} and is {now}: a resumed population must keep it", path.display());
            }
        }
        if p.schedules.len() != population {
            bail!("{}: {} schedules for a population of {population}", path.display(), p.schedules.len());
        }
        for (k, s) in p.schedules.iter().enumerate() {
            RandAugSchedule::new(s.clone())
                .map_err(|e| anyhow::anyhow!("{}: member {k}'s schedule {e}", path.display()))?;
        }
        Ok(p)
    }

    /// The record as its file's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the record serialises")
    }

    /// Member k's schedule.
    pub fn schedule(&self, k: usize) -> RandAugSchedule {
        RandAugSchedule::new(self.schedules[k].clone()).expect("checked when made or read")
    }

    /// The members from best to worst by score (ties: the lower index first).
    pub fn ranking(scores: &[f64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order
    }

    /// The round at `step` with these scores: the worst quarter (at least one)
    /// takes the best member's schedule, and each perturbs it from `step` on.
    pub fn round(&mut self, step: usize, scores: Vec<f64>) -> Round {
        let order = Self::ranking(&scores);
        let best = order[0];
        let quarter = (self.population / 4).max(1);
        let losers: Vec<usize> = order.iter().rev().take(quarter).copied().collect();
        for &k in &losers {
            let mut s = self.schedules[best].clone();
            let last = *s.last().expect("a schedule has a phase");
            let (n, m) = explore(last.n, last.m, key(&[self.seed, STREAM, step as u64, k as u64]));
            if (n, m) != (last.n, last.m) {
                s.push(Phase { step, n, m });
            }
            self.schedules[k] = s;
        }
        let round = Round { step, scores, best, losers };
        self.rounds.push(round.clone());
        round
    }
}
