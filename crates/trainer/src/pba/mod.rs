//! Population-based augmentation (`method.name: pba`): the population driver.
//!
//! The ranks split into one communicator per member (a member spans P /
//! population ranks) or per rank (a rank hosts population / P members, which
//! step in turn, each on its rank alone). Each member is a SimCLR training
//! loop of its own ([`Trainer`]) in `checkpoint.dir/member-<k>/`, with its own
//! seed (the run's + k) and its RandAugment schedule on top of the run's
//! augmentation. The members train in stretches of `method.interval` steps;
//! after each, every member is scored by kNN top-1 on held-out training images
//! ([`crate::data::held_out`]), the scores are all-reduced, and the worst
//! quarter takes the best member's checkpoint of that step (weights and
//! optimiser state) and its schedule, perturbed ([`population`]).
//!
//! At the end the best member (by the same score) is evaluated as any run is,
//! on the whole test split; its schedule is written to
//! `checkpoint.dir/randaugment_schedule.json`, which a normal run replays with
//! `data.aug.randaugment_schedule`.

mod population;

use crate::rundir;
use crate::trainer::{Parts, Ran, Trainer};
use crate::{data, Summary};
use anyhow::{bail, Context, Result};
use contrast_comm::Collective;
use contrast_config::{Plan, Settings, Topology};
use contrast_data::pipeline::Input;
use contrast_data::{Mode, Pipeline};
use contrast_nn::method::pba::{PbaSpec, Placement};
pub use population::{Population, Round};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

/// The population's record in the run directory.
pub const POPULATION_FILE: &str = "population.json";
/// The best member's schedule, for `data.aug.randaugment_schedule`.
pub const SCHEDULE_FILE: &str = "randaugment_schedule.json";

/// Member k's directory.
pub fn member_dir(root: &Path, k: usize) -> PathBuf {
    root.join(format!("member-{k}"))
}

/// The best member's directory of a population's run directory, once the run
/// named it in `population.json` (what `trainer eval`, `embed` and `export`
/// read when given the population's directory).
pub fn best_member_dir(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(root.join(POPULATION_FILE)).ok()?;
    Some(member_dir(root, serde_json::from_str::<Population>(&text).ok()?.best?))
}

/// One member hosted by this rank.
struct Member<'c, C: Collective> {
    k: usize,
    plan: Plan,
    trainer: Trainer<'c, C>,
    mode: Mode,
}

/// What the stretches and rounds share.
struct Run<'a, C: Collective> {
    comm: &'a C,
    plan: &'a Plan,
    input: Input,
    held: (crate::eval::EvalSet, crate::eval::EvalSet),
    pop: Population,
    placement: Placement,
}

/// Train the population of `plan` (resolved, its training data not yet open).
pub(crate) fn train<C: Collective>(comm: &C, mut plan: Plan) -> Result<Summary> {
    let keys = PbaSpec::keys(&plan.method.settings)?;
    let placement = Placement::of(keys.population, comm.world_size())?;
    let (hosted, colour) = placement.members_of(comm.rank());
    let sub = comm.split(colour);
    crate::compute_threads(&plan);
    let device = crate::resolve_device(&plan.config.train.device, comm.local_rank())?;
    let (input, class_names) = crate::open_training_input(comm, &plan)?;
    plan.resolve_epochs(input.len())?;
    plan.resolve_items(input.len())?;
    let e = &plan.config.eval;
    let held = data::held_out(&plan, &input, e.max_train, e.max_test)?;
    if comm.rank() == 0 {
        tracing::info!("{}", plan.describe());
        crate::write_resolved_config(&plan)?;
    }
    let pop = load_population(comm, &plan, keys.population, keys.interval)?;
    let mut members = Vec::new();
    for k in hosted {
        members.push(Member::new(comm, &sub, &plan, k, &input, device, class_names.clone())?);
    }
    let mut run = Run { comm, plan: &plan, input, held, pop, placement };
    run.check_resume(&mut members)?;
    if run.pop.best.is_some() && run.steps(&members).iter().all(|&s| s >= plan.steps) {
        return Ok(crate::nothing_to_train(comm, &plan, plan.steps));
    }
    let stopped = run.train(&mut members)?;
    let summary = match stopped {
        Some(at) => run.stopped(members, at)?,
        None => run.finish(members)?,
    };
    comm.barrier();
    Ok(summary)
}

/// The record to continue from: `population.json` on a resume (rank 0 reads
/// it, every rank parses the same text), else a fresh population.
fn load_population<C: Collective>(comm: &C, plan: &Plan, population: usize, interval: usize) -> Result<Population> {
    let c = &plan.config;
    let path = c.checkpoint.dir.join(POPULATION_FILE);
    let mine = match (comm.rank(), c.train.resume && path.is_file()) {
        (0, true) => std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
        _ => String::new(),
    };
    let text = crate::agree::broadcast_text(comm, &mine, 0);
    if text.is_empty() {
        return Ok(Population::new(population, interval, c.seed));
    }
    Population::parse(&text, &path, population, interval, c.seed)
}

/// Member k's plan: SimCLR with the run's loss, model and data, seed + k, in
/// `member-<k>/`, on `ranks` ranks, without metrics or evaluation of its own.
fn member_plan(plan: &Plan, k: usize, ranks: usize, local_size: usize) -> Result<Plan> {
    let mut c = plan.config.clone();
    c.seed = plan.config.seed + k as u64;
    c.method.name = Some("simclr".into());
    c.method.keys = Settings::default();
    c.checkpoint.dir = member_dir(&plan.config.checkpoint.dir, k);
    c.checkpoint.best = None;
    c.checkpoint.overwrite = false;
    c.metrics.enabled = false;
    c.metrics.textfile_dir = None;
    // The members do not evaluate themselves; their config.yaml evaluates as the run's final evaluation does.
    (c.eval.at_end, c.eval.every, c.eval.max_train, c.eval.max_test) = (false, 0, 0, 0);
    c.data.aug.randaugment_schedule = None;
    let own = |k: &String| k.starts_with("method.") || k.starts_with("metrics.") || k == "checkpoint.best";
    c.given.retain(|k| !own(k));
    let topo = Topology {
        world_size: ranks,
        local_size,
        host_cores: crate::host::host_cores(),
        rank_cores: crate::host::rank_cores(),
    };
    let mut member = Plan::resolve(c, topo, &contrast_nn::Registry).with_context(|| format!("member {k}"))?;
    member.steps = plan.steps;
    member.epochs = plan.epochs;
    member.items = plan.items;
    Ok(member)
}

impl<'c, C: Collective> Member<'c, C> {
    /// Member k on `sub`, resumed from its directory when the run resumes.
    fn new(
        comm: &C,
        sub: &'c C,
        plan: &Plan,
        k: usize,
        input: &Input,
        device: Device,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let mplan = member_plan(plan, k, sub.world_size(), comm.local_size())?;
        if comm.rank() == 0 && k == 0 {
            tracing::info!("each member:{}", mplan.describe().trim_start_matches("plan:"));
        }
        if sub.rank() == 0 {
            crate::write_resolved_config(&mplan)?;
        }
        let tokenizer = data::tokenizer(&mplan)?;
        let method = crate::build_method(sub, &mplan, device, &tokenizer)?;
        let view_shapes = (0..input.views().max(1)).map(|v| input.view_shape(v)).collect();
        let sampler = contrast_data::Sampler::new(input.len(), mplan.global_batch, mplan.config.seed)?;
        let mode = data::mode(&mplan, &tokenizer, class_names)?;
        let parts = Parts {
            method,
            device,
            tokenizer,
            view_shapes,
            eval: None,
            sampler,
            dataset_fingerprint: input.fingerprint(),
        };
        let _span = tracing::error_span!("member", member = k).entered();
        let trainer = Trainer::new(sub, mplan.clone(), parts)?;
        Ok(Self { k, plan: mplan, trainer, mode })
    }

    /// Train from where the member stands to step `until` with `schedule`.
    fn stretch(
        &mut self,
        input: &Input,
        until: usize,
        schedule: contrast_data::schedule::RandAugSchedule,
    ) -> Result<Ran> {
        let start = self.trainer.done();
        let mut cfg = crate::pipeline_config(self.trainer.comm(), &self.plan, start, self.mode.clone());
        cfg.end_step = until;
        cfg.gated_epochs = self.trainer.gated_epochs(start);
        let pipeline = Pipeline::start_scheduled(input.clone(), cfg, Some(Arc::new(schedule)))?;
        let _span = tracing::error_span!("member", member = self.k).entered();
        self.trainer.train_until(pipeline, until)
    }
}

impl<C: Collective> Run<'_, C> {
    /// Each member's step, gathered from the ranks that host it.
    fn steps(&self, members: &[Member<'_, C>]) -> Vec<usize> {
        let mut at = vec![-1i64; self.pop.population];
        members.iter().for_each(|m| at[m.k] = m.trainer.done() as i64);
        self.comm.all_reduce_max(&mut at);
        at.into_iter().map(|s| s.max(0) as usize).collect()
    }

    /// A resume: the members' checkpoints must lie between the last round and
    /// the next; a round cut short (its record written, some losers not yet
    /// moved) is finished by taking the best member's checkpoint again.
    fn check_resume(&mut self, members: &mut [Member<'_, C>]) -> Result<()> {
        let at = self.steps(members);
        let last = self.pop.rounds.last().map_or(0, |r| r.step);
        let next = (last + self.pop.interval).min(self.plan.steps);
        let root = &self.plan.config.checkpoint.dir;
        if let Some((k, &s)) = at.iter().enumerate().find(|&(_, &s)| s < last || s > next) {
            let record = root.join(POPULATION_FILE);
            let rounds = match self.pop.rounds.is_empty() {
                true => format!("{} records no round", record.display()),
                false => format!("{}'s last round is at step {last}", record.display()),
            };
            bail!(
                "{} is at step {s}, but {rounds} (members lie between it and step {next}): the member's checkpoint \
                 or the record is missing or damaged; start over with checkpoint.overwrite=true",
                member_dir(root, k).display(),
            );
        }
        let Some(round) = self.pop.rounds.last().cloned() else { return Ok(()) };
        let source = member_dir(root, round.best).join(rundir::step_dir_name(round.step));
        let mut there = [(self.comm.rank() == 0 && source.join(rundir::STATE_FILE).is_file()) as u8];
        self.comm.broadcast(&mut there, 0);
        if there[0] == 1 && at.iter().any(|&s| s == round.step) {
            tracing::info!("finishing the round at step {}: the losers take {} again", round.step, source.display());
            self.apply(members, &round)?;
        }
        Ok(())
    }

    /// Train every member to the end in stretches, with a round after each;
    /// `Some(step)` when a stop signal ended it (the slowest member's step).
    fn train(&mut self, members: &mut [Member<'_, C>]) -> Result<Option<usize>> {
        let (steps, interval) = (self.plan.steps, self.pop.interval);
        loop {
            let at = self.steps(members);
            let low = at.iter().copied().min().unwrap_or(steps);
            if low >= steps {
                return Ok(None);
            }
            let target = ((low / interval + 1) * interval).min(steps);
            let mut stop = [0u8];
            for m in members.iter_mut().filter(|m| m.trainer.done() < target) {
                match m.stretch(&self.input, target, self.pop.schedule(m.k))? {
                    Ran::Through => m.trainer.checkpoint_now()?,
                    Ran::Stopped { done, loss, ranks } => {
                        m.trainer.checkpoint_stop(done, loss, ranks)?;
                        stop[0] = 1;
                        break;
                    }
                }
            }
            self.comm.all_reduce_max(&mut stop);
            if stop[0] == 1 {
                return Ok(Some(self.steps(members).into_iter().min().unwrap_or(0)));
            }
            if target < steps {
                self.round(members, target)?;
            }
        }
    }

    /// Every member's held-out kNN top-1, all-reduced over the ranks.
    fn scores(&self, members: &[Member<'_, C>]) -> Vec<f64> {
        let mut scores = vec![f64::NEG_INFINITY; self.pop.population];
        for m in members {
            scores[m.k] = m.trainer.knn_top1_on(&self.held.0, &self.held.1);
        }
        self.comm.all_reduce_max(&mut scores);
        scores
    }

    /// Exploit and explore at `step`: record the round, then move the losers.
    fn round(&mut self, members: &mut [Member<'_, C>], step: usize) -> Result<()> {
        let scores = self.scores(members);
        let round = self.pop.round(step, scores);
        if self.comm.rank() == 0 {
            let shown: Vec<String> = round.scores.iter().map(|s| format!("{:.4}", s)).collect();
            tracing::info!(
                "PBA round at step {step}: held-out kNN top-1 [{}]; member {} copied into {:?}",
                shown.join(", "),
                round.best,
                round.losers
            );
            self.write(POPULATION_FILE, &self.pop.to_json())?;
        }
        self.comm.barrier();
        self.apply(members, &round)
    }

    /// The losers this rank hosts take the best member's checkpoint of the round's step.
    fn apply(&self, members: &mut [Member<'_, C>], round: &Round) -> Result<()> {
        let root = &self.plan.config.checkpoint.dir;
        let source = member_dir(root, round.best).join(rundir::step_dir_name(round.step));
        for m in members.iter_mut().filter(|m| round.losers.contains(&m.k) && m.trainer.done() == round.step) {
            m.trainer.adopt(&source).with_context(|| format!("member {} taking member {}", m.k, round.best))?;
        }
        self.comm.barrier();
        Ok(())
    }

    /// Write a file of the run directory atomically (rank 0).
    fn write(&self, name: &str, text: &str) -> Result<()> {
        let dir = &self.plan.config.checkpoint.dir;
        let tmp = dir.join(rundir::tmp_name(name, None));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("writing {}", dir.join(name).display()))
    }

    /// The end: rank the members once more, write the best one's schedule,
    /// evaluate it on the whole test split and write the run's summary from it.
    fn finish(mut self, members: Vec<Member<'_, C>>) -> Result<Summary> {
        let scores = self.scores(&members);
        let best = Population::ranking(&scores)[0];
        self.pop.best = Some(best);
        if self.comm.rank() == 0 {
            self.write(POPULATION_FILE, &self.pop.to_json())?;
            self.write(SCHEDULE_FILE, &self.pop.schedule(best).to_json())?;
            tracing::info!(
                "PBA: member {best} is the best (held-out kNN top-1 {:.4}); its schedule: {}",
                scores[best],
                self.plan.config.checkpoint.dir.join(SCHEDULE_FILE).display()
            );
        }
        let mut out = None;
        for mut m in members {
            if m.k == best && self.plan.config.eval.at_end {
                let mut full = self.plan.clone();
                (full.config.eval.max_train, full.config.eval.max_test) = (0, 0);
                if let Some(d) = data::load_eval(&full, None)?.ok() {
                    m.trainer.evaluate_at_end(d);
                }
            }
            let summary = m.trainer.summary(None)?;
            if m.k == best {
                out = Some(summary);
            }
        }
        let root = &self.plan.config.checkpoint.dir;
        let mut summary = out.unwrap_or_default();
        summary.best_member = Some(best);
        (summary.world_size, summary.global_batch) = (self.plan.world_size, self.plan.global_batch);
        // The best member's first rank writes what it measured.
        if self.comm.rank() == self.placement.first_rank(best) {
            crate::write_summary(root, &summary)?;
        }
        Ok(summary)
    }

    /// A stop signal ended the run after step `at` (the slowest member's):
    /// each member's summary says where it stopped, and so does the run's.
    fn stopped(self, members: Vec<Member<'_, C>>, at: usize) -> Result<Summary> {
        for m in members {
            let done = m.trainer.done();
            m.trainer.summary(Some(done))?;
        }
        let summary = Summary {
            steps: at,
            stopped_by_signal: true,
            final_loss: f64::NAN,
            world_size: self.plan.world_size,
            global_batch: self.plan.global_batch,
            ..Default::default()
        };
        if self.comm.rank() == 0 {
            crate::write_summary(&self.plan.config.checkpoint.dir, &summary)?;
        }
        Ok(summary)
    }
}
