//! The text methods (SimCSE, Quick-Thought) and the text tower they train:
//! P ranks × B equal 1 rank × P·B (the dropout masks keyed on the global row),
//! a stop resumes on another world size, the losses match a written-out
//! InfoNCE, and the bidirectional tower ignores padding.

use crate::common::*;
use crate::survey_methods::{captions, check_layouts, items_of, text_tower_config, Case, CONTEXT};
use contrast_comm::Solo;
use contrast_config::{LossKind, TextPool};
use contrast_nn::encoder::text::{dropout_mask, Captions, Noise, TextTower};
use contrast_nn::method::{build, Batch};
use contrast_nn::GlobalBatch;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const SIMCSE: Case = Case { name: "simcse", loss: LossKind::InfoNce, items: 30, n: 12, epoch_steps: 0, keys: |_| {} };

const QUICK_THOUGHT: Case = Case { name: "quick_thought", ..SIMCSE };

#[test]
fn simcse_is_exact_across_ranks_and_resumes_onto_another_world_size() {
    check_layouts(&SIMCSE);
    check_layouts(&Case { loss: LossKind::NtXent, ..SIMCSE });
}

#[test]
fn quick_thought_is_exact_across_ranks_and_resumes_onto_another_world_size() {
    check_layouts(&QUICK_THOUGHT);
    check_layouts(&Case { keys: |m| set_key(m, "normalize", true), ..QUICK_THOUGHT });
}

/// The loss of `case`'s method on batch 0 (one rank) and its two towers.
fn loss_and_towers(case: &Case) -> (f64, Tensor, Tensor, f64) {
    let m = build(&case.spec(1, 0)).unwrap();
    let c = captions(0, 0, 12, case.captions_per_row());
    let items = items_of(0, 12, 30);
    let batch = Batch { step: 0, views: &[], captions: Some(&c), labels: None, mix: None, indices: &items };
    let towers = m.forward(&batch, &Solo).unwrap();
    let params: Vec<Tensor> = m.params().into_iter().map(|p| p.tensor).collect();
    let out = GlobalBatch::new(&Solo, 12)
        .step_towers(&towers, &params, &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
        .unwrap();
    let t = case.spec(1, 0).temperature();
    (out.loss, towers.grad[0].detach(), towers.grad[1].detach(), t)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// −mean_i log softmax_j(s(a_i, b_j) / t)[i].
fn infonce(a: &Tensor, b: &Tensor, t: f64) -> f64 {
    let labels = Tensor::arange(a.size()[0], (Kind::Int64, Device::Cpu));
    (a.matmul(&b.tr()) / t).log_softmax(-1, Kind::Double).nll_loss(&labels).double_value(&[])
}

#[test]
fn simcse_and_quick_thought_losses_are_infonce_over_the_batch() {
    // SimCSE: cosine between the two dropout passes of each sentence; they differ only by their masks.
    let (loss, a, b, t) = loss_and_towers(&SIMCSE);
    let unit = |x: &Tensor| contrast_nn::loss::l2_normalize(x);
    assert!((loss - infonce(&unit(&a), &unit(&b), t)).abs() < 1e-12, "SimCSE {loss}");
    assert!(max_diff(&a, &b) > 1e-6, "the two passes draw different masks");
    // Quick-Thought: the paper's inner product f(s)·g(next), and cosine with method.normalize.
    let (loss, s, next, t) = loss_and_towers(&QUICK_THOUGHT);
    assert!((loss - infonce(&s, &next, t)).abs() < 1e-12, "Quick-Thought {loss}");
    let cosine = Case { keys: |m| set_key(m, "normalize", true), ..QUICK_THOUGHT };
    let (loss, s, next, t) = loss_and_towers(&cosine);
    assert!((loss - infonce(&unit(&s), &unit(&next), t)).abs() < 1e-12, "Quick-Thought cosine {loss}");
}

#[test]
fn quick_thought_embeds_both_encoders_and_refuses_single_captions() {
    let m = build(&QUICK_THOUGHT.spec(1, 0)).unwrap();
    let c = captions(0, 0, 4, 1);
    assert_eq!(m.backbone().out_dim(), 12, "[f(x), g(x)]: twice model.proj_dim");
    assert_eq!(m.features(&c.pack()).size(), [4, 12]);
    assert_eq!(m.encode_text(&c).unwrap().size(), [4, 12]);
    let items = [0usize, 1, 2, 3];
    let batch = Batch { step: 0, views: &[], captions: Some(&c), labels: None, mix: None, indices: &items };
    let err = m.forward(&batch, &Solo).err().unwrap().to_string();
    assert!(err.contains("2 caption(s) per row"), "{err}");
    let none = Batch { captions: None, ..batch };
    assert!(m.forward(&none, &Solo).err().unwrap().to_string().contains("no captions"));
}

fn tower(pool: TextPool, causal: bool, dropout: f64) -> (VarStore, TextTower) {
    tch::manual_seed(3);
    let mut vs = VarStore::new(Device::Cpu);
    let cfg = contrast_config::TextConfig { pool, causal, dropout, ..text_tower_config() };
    let t = TextTower::new(&vs.root(), 258, &cfg, 6);
    vs.double();
    (vs, t)
}

#[test]
fn dropout_masks_are_keyed_on_the_global_row_and_not_on_the_layout() {
    let (_vs, t) = tower(TextPool::Mean, false, 0.3);
    let c = captions(4, 0, 8, 1);
    let noise = Noise { seed: 9, step: 4, view: 0 };
    let whole = t.encode(&c, Some(&noise));
    // Two ranks of four rows (rows 4.. of the global batch on the second), and the gradient cache's chunks.
    let ranks =
        Tensor::cat(&[t.encode(&captions(4, 0, 4, 1), Some(&noise)), t.encode(&captions(4, 1, 4, 1), Some(&noise))], 0);
    let chunks = Tensor::cat(&[t.encode(&c.rows(0, 3), Some(&noise)), t.encode(&c.rows(3, 5), Some(&noise))], 0);
    for (what, x) in [("ranks", &ranks), ("chunks", &chunks)] {
        assert!(rel_err(&Host::of(x).data, &Host::of(&whole).data) < 1e-12, "{what}");
    }
    // Another view, step or seed draws other masks; eval mode draws none.
    for other in [Noise { view: 1, ..noise }, Noise { step: 5, ..noise }, Noise { seed: 10, ..noise }] {
        assert!(max_diff(&t.encode(&c, Some(&other)), &whole) > 1e-6, "{other:?}");
    }
    assert!(rel_err(&Host::of(&t.forward(&c)).data, &Host::of(&t.encode(&c, None)).data) == 0.0);
    // The rate and scale: 1/(1 − p) where kept, over 256 × 10 × 16 elements (σ = 0.0023).
    let rows = Tensor::arange(256, (Kind::Int64, Device::Cpu));
    let m = dropout_mask((256, 10, 16), &rows, &noise, 3, 0.3, Kind::Double);
    let dropped = m.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((dropped - 0.3).abs() < 0.012, "dropped {dropped}");
    let kept = m.masked_select(&m.ne(0.0));
    assert!((kept - 1.0 / 0.7).abs().max().double_value(&[]) < 1e-12);
    // Each row its own mask.
    assert!(m.get(0).ne_tensor(&m.get(1)).any().int64_value(&[]) == 1);
}

#[test]
fn the_bidirectional_tower_ignores_padding_and_pools_as_configured() {
    let c = captions(0, 0, 6, 1);
    // Other tokens after each text's end.
    let ends = Vec::<i64>::try_from(&c.ends).unwrap();
    let mut tokens = Vec::<i64>::try_from(&c.tokens.view([-1])).unwrap();
    for (i, &e) in ends.iter().enumerate() {
        for j in (e as usize + 1)..CONTEXT {
            tokens[i * CONTEXT + j] = 1 + (i * 7 + j) as i64 % 200;
        }
    }
    let padded = Captions::from_host(&tokens, &ends, Device::Cpu);
    let mut outputs = Vec::new();
    for (pool, causal) in [
        (TextPool::Mean, false),
        (TextPool::First, false),
        (TextPool::Last, false),
        (TextPool::Last, true),
        (TextPool::Mean, true),
    ] {
        let (_vs, t) = tower(pool, causal, 0.0);
        let (a, b) = (t.forward(&c), t.forward(&padded));
        assert!(rel_err(&Host::of(&a).data, &Host::of(&b).data) < 1e-12, "{pool:?} causal={causal}");
        outputs.push(a);
    }
    // The pools differ from each other.
    assert!(max_diff(&outputs[0], &outputs[1]) > 1e-6);
    assert!(max_diff(&outputs[1], &outputs[2]) > 1e-6);
    // Bidirectional attention differs from causal at the same pool.
    assert!(max_diff(&outputs[2], &outputs[3]) > 1e-6);
}
