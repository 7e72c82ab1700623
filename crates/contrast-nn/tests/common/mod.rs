//! Helpers shared by the nn tests: deterministic data without torch's global RNG
//! (tests run concurrently; `tch::manual_seed` is process-wide).

use contrast_config::{MethodPlan, ModelConfig, Norm};
use tch::{Device, Kind, Tensor};

/// Deterministic normal-ish values from a seed (sum of uniforms, xorshift).
pub fn randn_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n).map(|_| (0..4).map(|_| next()).sum::<f64>() - 2.0).collect()
}

/// A `[rows, cols]` f64 tensor of deterministic values.
pub fn randn(rows: usize, cols: usize, seed: u64) -> Tensor {
    Tensor::from_slice(&randn_vec(rows * cols, seed)).view([rows as i64, cols as i64])
}

/// Rows of a matrix as nested vectors.
pub fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let (r, c) = t.size2().unwrap();
    let flat = contrast_nn::to_host::<f64>(t);
    (0..r as usize).map(|i| flat[i * c as usize..(i + 1) * c as usize].to_vec()).collect()
}

/// Largest |a-b| relative to the largest |b| (or 1e-12).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Central finite differences of a scalar function of one tensor.
pub fn finite_diff(x: &Tensor, f: impl Fn(&Tensor) -> f64, h: f64) -> Vec<f64> {
    let base = contrast_nn::to_host::<f64>(x);
    let shape = x.size();
    (0..base.len())
        .map(|k| {
            let mut p = base.clone();
            p[k] += h;
            let up = f(&Tensor::from_slice(&p).view(shape.as_slice()));
            p[k] -= 2.0 * h;
            let down = f(&Tensor::from_slice(&p).view(shape.as_slice()));
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// The gradient of `f` at `x` by autograd.
pub fn autograd(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Vec<f64> {
    let x = x.to_kind(Kind::Double).detach().set_requires_grad(true);
    f(&x).backward();
    contrast_nn::to_host::<f64>(&x.grad())
}

/// `model.*` of a convnet with these sizes (its keys are the encoder's own).
pub fn convnet_model(width: i64, embed_dim: i64, proj_hidden: i64, proj_dim: i64, norm: Norm) -> ModelConfig {
    let mut m = ModelConfig { proj_hidden, proj_dim, ..Default::default() };
    m.encoder_keys.set("width", width);
    m.encoder_keys.set("embed_dim", embed_dim);
    m.encoder_keys.set("norm", norm);
    m
}

/// Set a method key where the method declares it (MoCo's queue, BYOL's predictor…).
pub fn set_key(plan: &mut MethodPlan, key: &str, value: impl serde::Serialize) {
    if plan.settings.get(key).is_some() {
        plan.settings.set(key, value);
    }
}

/// The device the parity tests run on: `CONTRAST_TEST_DEVICE` (`cpu`, the
/// default, or `cuda`: `launch/gpu-check.sh` sets it). Asking for `cuda`
/// where there is none fails, naming the variable, rather than testing the CPU.
pub fn test_device() -> Device {
    match std::env::var("CONTRAST_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => {
            assert!(tch::Cuda::is_available(), "CONTRAST_TEST_DEVICE=cuda, but libtorch sees no GPU");
            Device::Cuda(0)
        }
        Ok(other) => panic!("CONTRAST_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// A tensor on the host, shareable between the threaded backend's ranks.
#[derive(Clone)]
pub struct Host {
    pub data: Vec<f64>,
    pub shape: Vec<i64>,
    pub kind: Kind,
}

impl Host {
    pub fn of(t: &Tensor) -> Self {
        Self { data: contrast_nn::to_host::<f64>(t), shape: t.size(), kind: t.kind() }
    }
    pub fn t(&self) -> Tensor {
        Tensor::from_slice(&self.data).view(self.shape.as_slice()).to_kind(self.kind)
    }
}
