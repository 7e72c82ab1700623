//! Optimisers written on tensors, so that their state is plain named tensors
//! that checkpoints can hold, and the learning-rate schedule.
//!
//! Semantics follow PyTorch: [`Sgd`] is `torch.optim.SGD` (momentum buffer
//! initialised with the first gradient, optional Nesterov, L2 weight decay
//! added to the gradient); [`AdamW`] is `torch.optim.AdamW` (decoupled decay,
//! bias-corrected moments, `eps` added after the square root). Weight decay is
//! applied only to parameters with two or more dimensions, so never to biases,
//! norm weights or the logit scale (open_clip's rule).
//!
//! Each [`Param`] carries its group's settings: whether decay applies, a
//! learning-rate factor and whether LARS adapts it. LARS wraps either
//! optimiser as apex's `LARC` (which solo-learn's LARS follows) does: for an
//! adapted parameter the gradient becomes (g + λw)·η‖w‖/(‖g‖ + λ‖w‖ + ε) and the
//! base optimiser then applies no decay of its own; biases and norm weights
//! are neither adapted nor decayed (the BYOL and SimCLR references' exclusion).

use tch::{Kind, Tensor};

/// A named trainable parameter.
pub struct Param {
    /// Var-store name.
    pub name: String,
    /// The tensor (shares storage with the var store).
    pub tensor: Tensor,
    /// Whether weight decay applies.
    pub decay: bool,
    /// The learning rate of this parameter is the schedule's times this factor.
    pub lr_factor: f64,
    /// Whether LARS adapts this parameter (when the optimiser is wrapped in LARS).
    pub lars: bool,
}

impl Param {
    /// The default group: decay and LARS adaptation for tensors of 2 or more
    /// dimensions (weights), neither for biases, norm weights and scalars.
    pub fn new(name: String, tensor: Tensor) -> Self {
        let weight = tensor.dim() >= 2;
        Self { name, tensor, decay: weight, lr_factor: 1.0, lars: weight }
    }
}

/// LARC's ε.
const LARS_EPS: f64 = 1e-8;

/// The LARS-adapted gradient (g + λw)·η‖w‖/(‖g‖ + λ‖w‖ + ε); unchanged where ‖w‖ or ‖g‖ is 0.
fn lars_grad(g: &Tensor, w: &Tensor, decay: f64, eta: f64) -> Tensor {
    let (wn, gn) = (w.norm().double_value(&[]), g.norm().double_value(&[]));
    let d = if decay > 0.0 { g + w * decay } else { g.shallow_clone() };
    if wn > 0.0 && gn > 0.0 {
        d * (eta * wn / (gn + decay * wn + LARS_EPS))
    } else {
        d
    }
}

/// The trainable parameters of a var store, sorted by name (a fixed order on every rank).
pub fn named_params(vs: &tch::nn::VarStore) -> Vec<Param> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|(n, t)| Param::new(n, t)).collect()
}

/// Hyper-parameters shared by the optimisers.
#[derive(Debug, Clone)]
pub enum OptimizerKind {
    /// SGD with momentum.
    Sgd {
        /// Momentum μ.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// AdamW.
    AdamW {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε.
        eps: f64,
    },
}

/// An optimiser over a fixed list of parameters.
pub struct Optimizer {
    /// Kind and hyper-parameters.
    pub kind: OptimizerKind,
    /// Weight decay λ.
    pub weight_decay: f64,
    /// Parameters.
    pub params: Vec<Param>,
    /// Per-parameter state tensors, named `<param>.<slot>` (`momentum`, `exp_avg`, `exp_avg_sq`).
    pub state: Vec<Vec<Tensor>>,
    /// LARS trust coefficient η when the optimiser is wrapped in LARS.
    pub lars: Option<f64>,
    /// Steps taken.
    pub steps: i64,
    /// Parameters left out of every update for now (no decay, no moments, no
    /// change): the exclusion list a method sets for a while (frozen prototypes).
    excluded: std::collections::BTreeSet<String>,
    /// Parameters whose state a method restarts ([`Optimizer::restart`]), with
    /// the step count at their last restart (saved as `<param>.restarted_at`).
    restarted_at: std::collections::BTreeMap<String, i64>,
}

impl Optimizer {
    /// A fresh optimiser (zero state).
    pub fn new(kind: OptimizerKind, weight_decay: f64, params: Vec<Param>) -> Self {
        let slots = match kind {
            OptimizerKind::Sgd { .. } => 1,
            OptimizerKind::AdamW { .. } => 2,
        };
        let state = params.iter().map(|p| (0..slots).map(|_| p.tensor.zeros_like().detach()).collect()).collect();
        let (excluded, restarted_at) = Default::default();
        Self { kind, weight_decay, params, state, lars: None, steps: 0, excluded, restarted_at }
    }

    /// Let [`Optimizer::restart`] restart the parameters named `names` (a
    /// method's classifier that is re-initialised each epoch): their restart
    /// step becomes checkpoint state. An unknown name is an error.
    pub fn track_restarts<S: AsRef<str>>(&mut self, names: &[S]) -> Result<(), String> {
        for n in names {
            let n = n.as_ref();
            if !self.params.iter().any(|p| p.name == n) {
                return Err(format!("`{n}` is not a parameter the optimiser holds"));
            }
            self.restarted_at.insert(n.to_string(), 0);
        }
        Ok(())
    }

    /// Restart the state of the tracked parameters named `names`, as a fresh
    /// optimiser over them would start: zero moments, and the next step is
    /// their first (AdamW's bias correction counts from it; SGD's momentum
    /// buffer takes the first gradient as it is).
    pub fn restart<S: AsRef<str>>(&mut self, names: &[S]) -> Result<(), String> {
        for n in names {
            let at = self
                .restarted_at
                .get_mut(n.as_ref())
                .ok_or_else(|| format!("`{}` is not tracked for restarts", n.as_ref()))?;
            *at = self.steps;
            let i = self.params.iter().position(|p| p.name == n.as_ref()).expect("tracked parameters are held");
            tch::no_grad(|| self.state[i].iter_mut().for_each(|t| drop(t.zero_())));
        }
        Ok(())
    }

    /// Wrap in LARS with trust coefficient `eta` (parameters with `lars` set are adapted).
    pub fn with_lars(mut self, eta: f64) -> Self {
        self.lars = Some(eta);
        self
    }

    fn slot_names(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::Sgd { .. } => &["momentum"],
            OptimizerKind::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// Leave the parameters named `names` out of every update until
    /// [`Optimizer::include`] (no decay, no moments, no change).
    pub fn exclude<S: AsRef<str>>(&mut self, names: &[S]) {
        self.excluded.extend(names.iter().map(|n| n.as_ref().to_string()));
    }

    /// Update the parameters named `names` again.
    pub fn include<S: AsRef<str>>(&mut self, names: &[S]) {
        for n in names {
            self.excluded.remove(n.as_ref());
        }
    }

    /// The exclusion list, for a method to change before a step
    /// ([`crate::method::Method::before_optimizer_step`]).
    pub fn exclusions(&mut self) -> Exclusions<'_> {
        Exclusions { opt: self }
    }

    /// Zero every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// The parameter tensors (for the engine's all-reduce).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.shallow_clone()).collect()
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        self.params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                if g.defined() {
                    g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            .sqrt()
    }

    /// Scale gradients so that their global norm is at most `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for p in &self.params {
                    let mut g = p.tensor.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            });
        }
        norm
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let wd = self.weight_decay;
        tch::no_grad(|| {
            for (p, st) in self.params.iter().zip(self.state.iter_mut()) {
                let g = p.tensor.grad();
                if !g.defined() || self.excluded.contains(&p.name) {
                    continue;
                }
                // Steps since the parameter's state (re)started.
                let since = self.steps - self.restarted_at.get(&p.name).copied().unwrap_or(0);
                let t = since as f64;
                let mut w = p.tensor.shallow_clone();
                let decay = if p.decay { wd } else { 0.0 };
                let (g, decay) = match self.lars {
                    Some(eta) if p.lars => (lars_grad(&g, &w, decay, eta), 0.0),
                    _ => (g, decay),
                };
                let lr = lr * p.lr_factor;
                match self.kind {
                    OptimizerKind::Sgd { momentum, nesterov } => {
                        let d = if decay > 0.0 { &g + &w * decay } else { g.shallow_clone() };
                        let d = if momentum > 0.0 {
                            let buf = &mut st[0];
                            if since == 1 {
                                let _ = buf.copy_(&d);
                            } else {
                                let _ = buf.g_mul_scalar_(momentum).g_add_(&d);
                            }
                            if nesterov {
                                d + &*buf * momentum
                            } else {
                                buf.shallow_clone()
                            }
                        } else {
                            d
                        };
                        let _ = w.g_sub_(&(d * lr));
                    }
                    OptimizerKind::AdamW { beta1, beta2, eps } => {
                        if decay > 0.0 {
                            let _ = w.g_mul_scalar_(1.0 - lr * decay);
                        }
                        let (m, v) = st.split_at_mut(1);
                        let (m, v) = (&mut m[0], &mut v[0]);
                        let _ = m.g_mul_scalar_(beta1).g_add_(&(&g * (1.0 - beta1)));
                        let _ = v.g_mul_scalar_(beta2).g_add_(&(g.square() * (1.0 - beta2)));
                        let bc1 = 1.0 - beta1.powf(t);
                        let bc2 = 1.0 - beta2.powf(t);
                        let denom = (&*v / bc2).sqrt() + eps;
                        let _ = w.g_sub_(&(&*m / &denom * (lr / bc1)));
                    }
                }
            }
        });
    }

    /// State tensors named `<param>.<slot>`, plus `__steps__`, for a checkpoint.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let names = self.slot_names();
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.state)
            .flat_map(|(p, st)| st.iter().zip(names).map(move |(t, s)| (format!("{}.{s}", p.name), t.shallow_clone())))
            .collect();
        out.push(("__steps__".into(), Tensor::from_slice(&[self.steps])));
        out.extend(self.restarted_at.iter().map(|(n, &at)| (format!("{n}.restarted_at"), Tensor::from_slice(&[at]))));
        out
    }

    /// Restore state written by [`Optimizer::named_state`]; every slot must be present.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let names = self.slot_names();
        for (p, st) in self.params.iter().zip(self.state.iter_mut()) {
            for (t, s) in st.iter_mut().zip(names) {
                let key = format!("{}.{s}", p.name);
                let src = map.get(key.as_str()).ok_or_else(|| format!("optimizer state `{key}` is missing"))?;
                if src.size() != t.size() {
                    return Err(format!("optimizer state `{key}` has shape {:?}, expected {:?}", src.size(), t.size()));
                }
                tch::no_grad(|| t.copy_(&src.to_device(t.device()).to_kind(t.kind())));
            }
        }
        self.steps = map.get("__steps__").map(|t| t.int64_value(&[0])).ok_or("optimizer `__steps__` is missing")?;
        for (n, at) in self.restarted_at.iter_mut() {
            let key = format!("{n}.restarted_at");
            *at = map.get(key.as_str()).map(|t| t.int64_value(&[0])).ok_or(format!("optimizer `{key}` is missing"))?;
        }
        Ok(())
    }
}

/// The optimiser's exclusion list as a method sees it: parameters left out of
/// every update (no decay, no moments, no change) until included again.
pub struct Exclusions<'a> {
    opt: &'a mut Optimizer,
}

impl Exclusions<'_> {
    /// Leave out the parameters named `names`; an unknown name is an error.
    pub fn exclude<S: AsRef<str>>(&mut self, names: &[S]) -> Result<(), String> {
        self.known(names)?;
        self.opt.exclude(names);
        Ok(())
    }

    /// Update the parameters named `names` again.
    pub fn include<S: AsRef<str>>(&mut self, names: &[S]) {
        self.opt.include(names)
    }

    /// Whether `name` is left out.
    pub fn contains(&self, name: &str) -> bool {
        self.opt.excluded.contains(name)
    }

    fn known<S: AsRef<str>>(&self, names: &[S]) -> Result<(), String> {
        match names.iter().find(|n| !self.opt.params.iter().any(|p| p.name == n.as_ref())) {
            Some(n) => Err(format!("`{}` is not a parameter the optimiser holds", n.as_ref())),
            None => Ok(()),
        }
    }
}

/// Linear warm-up then cosine decay (or constant), as a function of the step.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
    /// Cosine ends at `final_frac · peak`.
    pub final_frac: f64,
    /// Cosine (else constant after warm-up).
    pub cosine: bool,
}

impl Schedule {
    /// Learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        if !self.cosine {
            return self.peak;
        }
        let span = (self.total.saturating_sub(self.warmup)).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let low = self.peak * self.final_frac;
        low + (self.peak - low) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
