//! The survey's methods that start epochs (DeepCluster's k-means) or cut
//! images into patches (CPC), through `survey_methods`' harness: P ranks × B
//! equals 1 rank × P·B in the loss and every piece of state, stops resume on
//! another world size, and each loss matches a written-out transcription.

use crate::common::*;
use crate::survey_methods::*;
use contrast_comm::Solo;
use contrast_config::LossKind;
use contrast_nn::method::{build, Batch};
use contrast_nn::optim::{Optimizer, OptimizerKind};
use contrast_nn::GlobalBatch;
use std::collections::HashMap;
use tch::{Kind, Tensor};

const DEEPCLUSTER: Case = Case {
    name: "deepcluster",
    loss: LossKind::CrossEntropy,
    items: 22,
    n: 12,
    // Epochs of 3 steps: the stop after step 2 falls inside the first, and the
    // second starts (k-means, a fresh classifier) on the resumed world size.
    epoch_steps: 3,
    keys: |m| {
        set_key(m, "clusters", 4);
        set_key(m, "kmeans_iters", 3);
    },
};

#[test]
fn deepcluster_pseudo_labels_and_classifier_are_exact_across_ranks_and_resume() {
    check_layouts(&DEEPCLUSTER);
    // The clustering state: 22 labels in 0..4 and 4 centroids of the head's width.
    let (_, (model, optim)) = run(&DEEPCLUSTER, 2, &snapshot(&DEEPCLUSTER), None, 0..4);
    let item = |name: &str| model.iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap();
    let labels = item("method.pseudo_labels");
    assert_eq!(labels.shape, [22]);
    assert!(labels.data.iter().all(|&l| (0.0..4.0).contains(&l)), "{:?}", labels.data);
    assert_eq!(item("method.centroids").shape, [4, 6]);
    // The classifier restarted with the second epoch, at step 3.
    let restarted: Vec<f64> =
        optim.iter().filter(|(n, _)| n.ends_with("restarted_at")).map(|(_, t)| t.data[0]).collect();
    assert_eq!(restarted, [3.0, 3.0]);
}

#[test]
fn deepcluster_whitened_before_kmeans_is_exact_across_ranks_and_resumes() {
    let case = Case {
        keys: |m| {
            set_key(m, "clusters", 4);
            set_key(m, "kmeans_iters", 3);
            set_key(m, "pca_dim", 3);
        },
        ..DEEPCLUSTER
    };
    check_layouts(&case);
    let (_, (model, _)) = run(&case, 2, &snapshot(&case), None, 0..1);
    let centroids = model.iter().find(|(n, _)| n == "method.centroids").map(|(_, t)| t).unwrap();
    assert_eq!(centroids.shape, [4, 3], "k-means clusters the whitened features");
}

#[test]
fn deepcluster_samples_its_pseudo_classes_and_refuses_bad_state() {
    let mut m = build(&DEEPCLUSTER.spec(1, 0)).unwrap();
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.0, m.params());
    opt.track_restarts(&m.restarts()).unwrap();
    assert!(m.wants_features(0) && m.wants_features(7) && m.gates_epoch(3), "every epoch clusters");
    start_epoch(&Solo, &DEEPCLUSTER, m.as_mut(), &mut opt, 0);
    let labels = m.state().into_iter().find(|i| i.name == "method.pseudo_labels").unwrap().tensor;
    let want: Vec<u32> = contrast_nn::to_host::<i64>(&labels).into_iter().map(|l| l as u32).collect();
    match m.sampling(&Solo).unwrap() {
        Some(contrast_nn::method::Sampling::Balanced(got)) => assert_eq!(*got, want),
        _ => panic!("DeepCluster samples uniformly over its pseudo-classes"),
    }
    // The loss is PyTorch's mean cross-entropy over every view's rows.
    let (v, items) = (views(0, 12, 0, 12), items_of(0, 12, 22));
    let batch = Batch { step: 0, views: &v, captions: None, labels: None, mix: None, indices: &items };
    let towers = m.forward(&batch, &Solo).unwrap();
    let out = GlobalBatch::new(&Solo, 12)
        .step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
        .unwrap();
    let target = Tensor::from_slice(&items.iter().map(|&i| want[i] as i64).collect::<Vec<_>>());
    let logits = Tensor::cat(&towers.grad, 0).detach();
    // F.cross_entropy = nll_loss(log_softmax) (tch's `cross_entropy_for_logits` would round through f32).
    let torch = logits.log_softmax(-1, Kind::Double).nll_loss(&Tensor::cat(&[&target, &target], 0)).double_value(&[]);
    assert!((out.loss - torch).abs() <= 1e-12 * torch, "{} vs {torch}", out.loss);
    // A label outside the clusters, from a damaged checkpoint, is refused by name.
    let mut saved: HashMap<String, Tensor> = m.state().into_iter().map(|i| (i.name, i.tensor.copy())).collect();
    saved.insert("method.pseudo_labels".into(), Tensor::full([22], 9, (Kind::Int64, tch::Device::Cpu)));
    let err = m.load_state(&saved, 0, 1).err().unwrap().to_string();
    assert!(err.contains("`method.pseudo_labels` holds label 9 outside 0..4"), "{err}");
}

const CPC: Case = Case {
    name: "cpc",
    loss: LossKind::Cpc,
    items: 22,
    n: 12,
    epoch_steps: 0,
    // 8-pixel views: 6-pixel patches every pixel, a 3 × 3 grid, offsets 1 and 2.
    // (4-pixel patches would leave the convnet a 1 × 1 last map with one
    // channel per group, which group norm sets to its bias whatever the input:
    // codes that do not depend on the encoder test nothing of it.)
    keys: |m| {
        set_key(m, "patch_size", 6);
        set_key(m, "patch_stride", 1);
        set_key(m, "context_dim", 5);
    },
};

/// CPC scored by the cosine of prediction and code at a temperature.
const CPC_COSINE: Case = Case {
    keys: |m| {
        (CPC.keys)(m);
        set_key(m, "temperature", 0.1);
    },
    ..CPC
};

#[test]
fn cpc_codes_contexts_and_maps_are_exact_across_ranks_and_resume() {
    check_layouts(&CPC);
    check_layouts(&CPC_COSINE);
}

#[test]
fn cpc_loss_is_the_mean_infonce_over_offsets_and_positions() {
    for (case, temperature) in [(&CPC, None), (&CPC_COSINE, Some(0.1))] {
        cpc_loss_written_out(case, temperature);
    }
}

/// The CPC loss of `case` against a written-out mean of InfoNCE terms (bilinear
/// scores, or with `temperature` the cosine of W_k c and z over it).
fn cpc_loss_written_out(case: &Case, temperature: Option<f64>) {
    let m = build(&case.spec(1, 0)).unwrap();
    let (v, items) = (views(0, 12, 0, 12), items_of(0, 12, 22));
    let batch = Batch { step: 0, views: &v, captions: None, labels: None, mix: None, indices: &items };
    let towers = m.forward(&batch, &Solo).unwrap();
    let params: Vec<Tensor> = m.params().into_iter().map(|p| p.tensor).collect();
    let out = GlobalBatch::new(&Solo, 12)
        .step_towers(&towers, &params, &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
        .unwrap();
    // Written out: for k = 1, 2 and every (row, col) with a row k below, the
    // logits c_i(row, col)ᵀ W_kᵀ z_j(row + k, col) over the 12 images, label i.
    let vars = m.var_store().variables();
    let z = towers.grad[0].detach().view([12, 3, 3, -1]);
    let c = towers.grad[1].detach().view([12, 3, 3, -1]);
    let (mut sum, mut terms) = (0.0, 0);
    for k in 1..=2i64 {
        let w = &vars[&format!("predict.k{k}.weight")];
        for row in 0..3 - k {
            for col in 0..3 {
                let (pred, target) =
                    (c.select(1, row).select(1, col).matmul(&w.tr()), z.select(1, row + k).select(1, col));
                let unit = |x: &Tensor| x / x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
                let logits = match temperature {
                    Some(t) => unit(&pred).matmul(&unit(&target).tr()) / t,
                    None => pred.matmul(&target.tr()),
                };
                let labels = Tensor::arange(12, (Kind::Int64, tch::Device::Cpu));
                sum += logits.log_softmax(-1, Kind::Double).nll_loss(&labels).double_value(&[]);
                terms += 1;
            }
        }
    }
    let want = sum / terms as f64;
    assert_eq!(terms, 9);
    assert!((out.loss - want).abs() <= 1e-12 * want, "{} vs {want}", out.loss);
    // Evaluation embeds the whole image with the patch encoder.
    assert_eq!(m.features(&v[0]).size(), [12, 32]);
    // A grid with no row left to predict is refused at build, naming the keys.
    let mut spec = CPC.spec(1, 0);
    spec.image_size = 5;
    let err = build(&spec).err().unwrap().to_string();
    assert!(err.contains("method.patch_size 6 with method.patch_stride 1 gives a grid of 0 rows"), "{err}");
}
