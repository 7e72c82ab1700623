//! Population-based augmentation (PBA, Ho et al. 2019) around SimCLR: a
//! population of `method.population` SimCLR members trains side by side, each
//! with its own RandAugment schedule on top of the run's augmentation; every
//! `method.interval` steps the worst quarter copies the best member (weights,
//! optimiser state and schedule) and perturbs the schedule. The population
//! driver lives in the trainer (each member needs its own data pipeline); this
//! file holds the keys, their checks and where the members run.
//!
//! # Conventions
//! - A member is the `simclr` method with the run's loss (`loss.name`, NT-Xent
//!   by default) and `model.*`; its weights are SimCLR's (`backbone.*`,
//!   `head.*`), so `trainer eval` and `trainer embed` read a member's
//!   checkpoint with the run's config.
//! - The reference searches a policy of 15 ops with a probability and a
//!   magnitude each, for supervised training; this searches RandAugment's two
//!   numbers (N ops at magnitude M), the space `data.aug.randaugment_schedule`
//!   replays, and selects by kNN top-1 on a held-out part of the training split.

use super::simclr::SimclrSpec;
use super::MethodEntry;
use contrast_config::{invalid, AugmentPreset, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};

/// PBA's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbaKeys {
    /// Members of the population (at least 2). With P ranks, either each
    /// member spans P / population ranks or each rank hosts population / P
    /// members, stepping them in turn: one of the two must divide the other.
    pub population: usize,
    /// Steps between two exploit-and-explore rounds (the reference's 3 epochs).
    pub interval: usize,
}

impl Default for PbaKeys {
    fn default() -> Self {
        Self { population: 4, interval: 100 }
    }
}

/// Where the members of a population run on P ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Member k spans ranks `k·ranks .. (k+1)·ranks` (P ≥ population).
    Spans {
        /// Ranks of each member.
        ranks: usize,
    },
    /// Rank r hosts members `r·members .. (r+1)·members`, each on a communicator of its own rank.
    Shares {
        /// Members of each rank.
        members: usize,
    },
}

impl Placement {
    /// The placement of `population` members on `world` ranks, or why there is none (naming `method.population`).
    pub fn of(population: usize, world: usize) -> Result<Self, ConfigError> {
        let world = world.max(1);
        if population < 2 {
            return Err(invalid(
                "method.population",
                format!("a population holds at least 2 members, got {population}"),
            ));
        }
        if world >= population && world % population == 0 {
            return Ok(Placement::Spans { ranks: world / population });
        }
        if population > world && population % world == 0 {
            return Ok(Placement::Shares { members: population / world });
        }
        Err(invalid(
            "method.population",
            format!(
                "{population} members cannot be placed on {world} ranks: each member spans the same number of ranks, \
                 or each rank hosts the same number of members (choose a population that divides {world} or that {world} divides)"
            ),
        ))
    }

    /// The members rank `rank` hosts, and the colour of its communicator (ranks of one colour train one member).
    pub fn members_of(&self, rank: usize) -> (std::ops::Range<usize>, usize) {
        match *self {
            Placement::Spans { ranks } => (rank / ranks..rank / ranks + 1, rank / ranks),
            Placement::Shares { members } => (rank * members..(rank + 1) * members, rank),
        }
    }

    /// The world rank of member `k`'s first rank.
    pub fn first_rank(&self, k: usize) -> usize {
        match *self {
            Placement::Spans { ranks } => k * ranks,
            Placement::Shares { members } => k / members,
        }
    }
}

/// PBA's configuration: its keys, SimCLR's losses, augmentations and heads.
pub struct PbaSpec;

impl PbaSpec {
    /// The keys, parsed.
    pub fn keys(settings: &Settings) -> Result<PbaKeys, ConfigError> {
        settings.parse("method")
    }
}

impl MethodSpec for PbaSpec {
    fn name(&self) -> &'static str {
        "pba"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&PbaKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        SimclrSpec.own_loss()
    }

    fn accepts_loss(&self, loss: LossKind) -> bool {
        SimclrSpec.accepts_loss(loss)
    }

    fn accepts_augment(&self, preset: AugmentPreset, loss: LossKind) -> bool {
        SimclrSpec.accepts_augment(preset, loss)
    }

    fn runs_in_chunks(&self) -> bool {
        SimclrSpec.runs_in_chunks()
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        if k.interval == 0 {
            return Err(invalid("method.interval", "must be at least 1 step"));
        }
        Placement::of(k.population, run.world_size).map(|_| ())
    }

    fn describe(&self, settings: &Settings, run: &RunInfo) -> String {
        let Ok(k) = Self::keys(settings) else { return " method=PBA".into() };
        let placed = match Placement::of(k.population, run.world_size) {
            Ok(Placement::Spans { ranks }) => format!("{ranks} rank(s) per member"),
            Ok(Placement::Shares { members }) => format!("{members} members per rank"),
            Err(_) => "unplaced".into(),
        };
        format!(" method=PBA population={} ({placed}) interval={} members=Simclr", k.population, k.interval)
    }
}

/// The registration of PBA: it builds a member (SimCLR).
pub const ENTRY: MethodEntry = MethodEntry { spec: &PbaSpec, build: super::simclr::ENTRY.build };
