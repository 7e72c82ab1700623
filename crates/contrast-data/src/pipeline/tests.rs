//! Pipeline tests: step order, bounded memory, recycled buffers, bad samples.

use super::*;

/// A test pipeline layout; tests override the fields they care about.
fn layout(rank: usize, world_size: usize, global_batch: usize, workers: usize, end_step: usize) -> PipelineConfig {
    PipelineConfig {
        seed: 0,
        rank,
        world_size,
        global_batch,
        workers,
        prefetch: 2,
        start_step: 0,
        end_step,
        mode: Mode::Views,
        mix: None,
        shuffle_view: None,
        gated_epochs: Default::default(),
    }
}

use crate::augment::AugParams;

fn images(n: usize) -> Arc<Images> {
    let pixels = (0..n * 64).map(|i| ((i * 37) % 251) as u8).collect();
    Arc::new(Images { pixels, labels: (0..n).map(|i| (i % 10) as u8).collect(), height: 8, width: 8 })
}

fn aug() -> Augmenter {
    let params = AugParams { jitter_prob: 0.8, mean_std: (0.5, 0.5), ..crate::augment::tests::all_ops() };
    Augmenter::new(params, 8, 8)
}

fn run(world: usize, workers: usize, mode: Mode) -> Vec<Vec<HostBatch>> {
    (0..world)
        .map(|rank| {
            let cfg = PipelineConfig {
                seed: 11,
                rank,
                world_size: world,
                global_batch: 12,
                workers,
                prefetch: 3,
                start_step: 2,
                end_step: 9,
                mode: mode.clone(),
                mix: None,
                shuffle_view: None,
                gated_epochs: Default::default(),
            };
            Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
        })
        .collect()
}

#[test]
fn shuffle_bn_views_are_those_of_the_permuted_rows() {
    let run_with = |world: usize, shuffle: Option<usize>| -> Vec<Vec<HostBatch>> {
        (0..world)
            .map(|rank| {
                let cfg = PipelineConfig { seed: 11, shuffle_view: shuffle, ..layout(rank, world, 12, 2, 3) };
                Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
            })
            .collect()
    };
    let plain = run_with(1, None);
    let len = plain[0][0].views[1].len() / 12;
    for world in [1usize, 3] {
        let shuffled = run_with(world, Some(1));
        for step in 0..3 {
            let order = Sampler::shuffle_order(11, step, 12);
            for (r, rank) in shuffled.iter().enumerate() {
                let b = 12 / world;
                let batch = &rank[step];
                // The other view and the rows' indices are unchanged.
                assert_eq!(batch.views[0], plain[0][step].views[0][r * b * len..(r + 1) * b * len]);
                for row in 0..b {
                    let g = order[r * b + row];
                    assert_eq!(
                        batch.views[1][row * len..(row + 1) * len],
                        plain[0][step].views[1][g * len..(g + 1) * len]
                    );
                }
            }
        }
    }
}

#[test]
fn batches_are_identical_whatever_world_size_and_workers() {
    let one = run(1, 1, Mode::Views);
    for (world, workers) in [(2, 1), (3, 3), (4, 2)] {
        let many = run(world, workers, Mode::Views);
        for (s, b1) in one[0].iter().enumerate() {
            let mut idx: Vec<usize> = Vec::new();
            let mut v0: Vec<f32> = Vec::new();
            for rank in &many {
                assert_eq!(rank[s].step, b1.step);
                idx.extend(&rank[s].indices);
                v0.extend(&rank[s].views[0]);
            }
            assert_eq!(idx, b1.indices);
            assert_eq!(v0, b1.views[0], "view bytes differ at world {world}, workers {workers}");
        }
    }
    let steps: Vec<usize> = one[0].iter().map(|b| b.step).collect();
    assert_eq!(steps, (2..9).collect::<Vec<_>>());
    assert_ne!(one[0][0].views[0], one[0][0].views[1]);
}

#[test]
fn captions_follow_labels() {
    let mode = Mode::ImageText {
        context: 48,
        tokenizer: Arc::new(text::Tokenizer::Bytes),
        class_names: (0..10).map(|c| format!("class{c}")).collect(),
        text: TextAug::default(),
    };
    let b = &run(1, 2, mode)[0][0];
    assert_eq!(b.views.len(), 1);
    for (row, &label) in b.labels.iter().enumerate() {
        let toks = &b.tokens[row * 48..(row + 1) * 48];
        assert_eq!(toks[b.text_end[row] as usize], text::EOT, "the text ends at its EOT");
        let text: String = toks[1..].iter().take_while(|&&t| t < 256 && t > 0).map(|&t| t as u8 as char).collect();
        assert!(text.contains(&format!("class{label}")), "{text}");
    }
}

#[test]
fn early_drop_does_not_hang() {
    let cfg = layout(0, 1, 4, 2, 1000);
    let mut p = Pipeline::start(images(50), aug(), cfg).unwrap();
    assert!(p.next_batch().unwrap().is_ok());
    drop(p);
}

#[test]
fn worker_panic_becomes_an_error() {
    // Images whose pixel buffer is shorter than their size says: the worker panics slicing it.
    let broken = Arc::new(Images { pixels: vec![0; 10], labels: vec![0; 50], height: 8, width: 8 });
    let cfg = PipelineConfig { prefetch: 1, ..layout(0, 1, 4, 1, 3) };
    let mut p = Pipeline::start(broken, aug(), cfg).unwrap();
    let err = p.next_batch().unwrap().unwrap_err().to_string();
    assert!(err.contains("panicked"), "{err}");
}

fn folder(n: usize, corrupt: &[usize]) -> (tempfile::TempDir, Arc<dyn Source>) {
    let dir = tempfile::tempdir().unwrap();
    for c in 0..2 {
        std::fs::create_dir(dir.path().join(format!("class{c}"))).unwrap();
    }
    for i in 0..n {
        let path = dir.path().join(format!("class{}", i % 2)).join(format!("{i:03}.png"));
        if corrupt.contains(&i) {
            std::fs::write(path, b"this is not a png").unwrap();
        } else {
            let img = image::RgbImage::from_fn(20 + i as u32 % 7, 16, |x, y| {
                image::Rgb([(x * 9) as u8, (y * 13) as u8, i as u8])
            });
            img.save(path).unwrap();
        }
    }
    let src: Arc<dyn Source> = Arc::new(crate::source::ImageFolder::open(dir.path()).unwrap());
    (dir, src)
}

fn run_files(
    src: &Arc<dyn Source>,
    world: usize,
    workers: usize,
    max_bad: f64,
) -> Vec<Vec<Result<HostBatch, DataError>>> {
    (0..world)
        .map(|rank| {
            let cfg = PipelineConfig {
                seed: 5,
                rank,
                world_size: world,
                global_batch: 8,
                workers,
                prefetch: 2,
                start_step: 0,
                end_step: 4,
                mode: Mode::Views,
                mix: None,
                shuffle_view: None,
                gated_epochs: Default::default(),
            };
            let input = Input::Files {
                source: src.clone(),
                augment: vec![RgbAugParams::simclr(12); 2],
                max_bad_fraction: max_bad,
            };
            Pipeline::start_input(input, cfg).unwrap().collect()
        })
        .collect()
}

#[test]
fn file_batches_are_identical_whatever_world_size_and_workers() {
    let (_dir, src) = folder(20, &[]);
    let one = run_files(&src, 1, 1, 0.0);
    let two = run_files(&src, 2, 2, 0.0);
    for s in 0..4 {
        let b1 = one[0][s].as_ref().unwrap();
        assert_eq!(b1.views[0].len(), 8 * 3 * 12 * 12);
        let joined: Vec<f32> = two.iter().flat_map(|r| r[s].as_ref().unwrap().views[1].clone()).collect();
        assert_eq!(joined, b1.views[1]);
    }
}

#[test]
fn corrupt_files_are_skipped_replaced_counted_and_bounded() {
    let (_dir, src) = folder(20, &[3, 11]);
    let a = run_files(&src, 1, 2, 0.2);
    let b = run_files(&src, 2, 1, 0.2);
    let c = run_files(&src, 2, 3, 0.2);
    let bad_of = |runs: &[Vec<Result<HostBatch, DataError>>], s: usize| -> Vec<usize> {
        let mut all: Vec<usize> = runs.iter().flat_map(|r| r[s].as_ref().unwrap().bad.clone()).collect();
        all.sort_unstable();
        all
    };
    for s in 0..4 {
        let joined: Vec<f32> = b.iter().flat_map(|r| r[s].as_ref().unwrap().views[0].clone()).collect();
        assert_eq!(joined, a[0][s].as_ref().unwrap().views[0], "replacement depends on the layout");
        // Each step reports the same bad samples whatever the ranks, workers or timing.
        assert_eq!(bad_of(&a, s), bad_of(&b, s), "step {s}");
        assert_eq!(bad_of(&b, s), bad_of(&c, s), "step {s}");
    }
    // `HostBatch::indices` names the item each row shows: never a corrupt file,
    // and the same item whatever the layout.
    let bad: Vec<usize> = (0..4).flat_map(|s| bad_of(&a, s)).collect();
    assert!(!bad.is_empty(), "the steps met a corrupt file");
    for s in 0..4 {
        let shown: Vec<usize> = b.iter().flat_map(|r| r[s].as_ref().unwrap().indices.clone()).collect();
        assert_eq!(shown, a[0][s].as_ref().unwrap().indices, "step {s}");
        assert!(shown.iter().all(|i| !bad.contains(i)), "step {s}: a replaced row keeps a bad index: {shown:?}");
    }
    let mut budget = BadBudget::new(0.2, 20, []);
    for s in 0..4 {
        budget.add(bad_of(&a, s)).unwrap();
    }
    assert_eq!(budget.count(), 2, "both corrupt files are met in 4 steps of 8 over 20 samples");
    let mut strict = BadBudget::new(0.05, 20, []);
    let err = (0..4).find_map(|s| strict.add(bad_of(&a, s)).err()).expect("a bad fraction above the limit stops");
    assert!(err.contains("2 of 20") && err.contains("max_bad_fraction"), "{err}");
    // A resume keeps counting from the checkpointed set.
    assert_eq!(BadBudget::new(0.05, 20, budget.seen()).add([]).unwrap_err(), err);
}

#[test]
fn mixed_batches_are_identical_whatever_world_size() {
    use crate::mix::{MixConfig, MixKind};
    let run_mix = |world: usize, kind: MixKind| -> Vec<Vec<HostBatch>> {
        (0..world)
            .map(|rank| {
                let cfg = PipelineConfig {
                    seed: 2,
                    rank,
                    world_size: world,
                    global_batch: 12,
                    workers: 2,
                    prefetch: 2,
                    start_step: 0,
                    end_step: 3,
                    mode: Mode::Views,
                    mix: Some((MixConfig { kind, alpha: 1.0, group: 3 }, 1)),
                    shuffle_view: None,
                    gated_epochs: Default::default(),
                };
                Pipeline::start(images(50), aug(), cfg).unwrap().map(|b| b.unwrap()).collect()
            })
            .collect()
    };
    for kind in [MixKind::Mixup, MixKind::CutMix] {
        let one = run_mix(1, kind);
        let four = run_mix(4, kind);
        for s in 0..3 {
            let joined: Vec<f32> = four.iter().flat_map(|r| r[s].views[0].clone()).collect();
            assert_eq!(joined, one[0][s].views[0]);
            assert_eq!(four[3][s].mix, one[0][s].mix);
        }
    }
    // A group that does not divide the local batch is refused before any work.
    let cfg = PipelineConfig {
        seed: 2,
        prefetch: 1,
        mix: Some((MixConfig { kind: MixKind::Mixup, alpha: 1.0, group: 4 }, 1)),
        ..layout(0, 2, 12, 1, 1)
    };
    let err = Pipeline::start(images(50), aug(), cfg).err().unwrap().to_string();
    assert!(err.contains("must divide the local batch 6"), "{err}");
}

#[test]
fn recycled_buffers_give_the_same_bytes_and_bound_allocations() {
    let cfg = || PipelineConfig { seed: 4, ..layout(0, 1, 12, 2, 20) };
    let fresh: Vec<HostBatch> = Pipeline::start(images(50), aug(), cfg()).unwrap().map(|b| b.unwrap()).collect();
    let mut p = Pipeline::start(images(50), aug(), cfg()).unwrap();
    let mut n = 0;
    while let Some(b) = p.next_batch() {
        let b = b.unwrap();
        assert_eq!(b.views, fresh[n].views, "step {n}: a recycled buffer changed the bytes");
        assert_eq!((&b.indices, &b.labels), (&fresh[n].indices, &fresh[n].labels));
        p.recycle(b);
        n += 1;
    }
    assert_eq!(n, 20);
    // prefetch 2 + workers 2 + the one the trainer holds.
    assert!(p.allocated_batches() <= 5, "{} allocations for 20 steps", p.allocated_batches());
    // Captions too: a recycled token buffer holding longer captions is rewritten whole.
    let mode = Mode::ImageText {
        context: 32,
        tokenizer: Arc::new(text::Tokenizer::Bytes),
        class_names: (0..10)
            .map(|c| {
                if c % 2 == 0 {
                    format!("class {c} with a name longer than the context {c}")
                } else {
                    format!("c{c}")
                }
            })
            .collect(),
        text: TextAug::default(),
    };
    let text_cfg = || PipelineConfig { mode: mode.clone(), ..cfg() };
    let fresh: Vec<HostBatch> = Pipeline::start(images(50), aug(), text_cfg()).unwrap().map(|b| b.unwrap()).collect();
    let mut p = Pipeline::start(images(50), aug(), text_cfg()).unwrap();
    for want in &fresh {
        let b = p.next_batch().unwrap().unwrap();
        assert_eq!(b.tokens, want.tokens);
        p.recycle(b);
    }
}

#[test]
fn idx_multi_crop_views_have_their_own_sizes() {
    let small = Augmenter::new(AugParams { crop_scale: Some([0.05, 0.3]), ..aug().params }, 8, 8).resized(4, 4);
    let augment = vec![aug(), aug(), small.clone(), small];
    let run = |world: usize| -> Vec<HostBatch> {
        (0..world)
            .flat_map(|rank| {
                let input = Input::Idx { images: images(50), augment: augment.clone() };
                Pipeline::start_input(input, layout(rank, world, 6, 2, 1)).unwrap().map(|b| b.unwrap())
            })
            .collect()
    };
    let one = run(1);
    let lens: Vec<usize> = one[0].views.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![6 * 64, 6 * 64, 6 * 16, 6 * 16]);
    assert_ne!(one[0].views[2], one[0].views[3]);
    let two = run(2);
    let joined: Vec<f32> = two.iter().flat_map(|b| b.views[3].clone()).collect();
    assert_eq!(joined, one[0].views[3]);
}

#[test]
fn multi_crop_views_have_their_own_sizes() {
    let (_dir, src) = folder(16, &[]);
    let cfg = PipelineConfig { seed: 1, ..layout(0, 1, 4, 2, 2) };
    let augment = RgbAugParams::preset("swav", 16, 8, 3).unwrap();
    let input = Input::Files { source: src, augment, max_bad_fraction: 0.0 };
    let b = Pipeline::start_input(input, cfg).unwrap().next().unwrap().unwrap();
    let lens: Vec<usize> = b.views.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![4 * 3 * 256, 4 * 3 * 256, 4 * 3 * 64, 4 * 3 * 64, 4 * 3 * 64]);
    assert_ne!(b.views[2], b.views[3]);
}

#[test]
fn a_gated_epoch_waits_for_its_sampling_and_draws_by_it_on_every_layout() {
    // 50 items, global batch 12: 4 steps per epoch; epoch 1 waits, epochs 0 and 2 are uniform.
    let even = Sampling::Weighted(Arc::new((0..50).map(|i| ((i + 1) % 2) as f64).collect()));
    let global = |world: usize| -> Vec<Vec<usize>> {
        let mut ranks: Vec<Vec<Vec<usize>>> = Vec::new();
        for rank in 0..world {
            let cfg = PipelineConfig { gated_epochs: [1].into(), prefetch: 3, ..layout(rank, world, 12, 2, 12) };
            let mut p = Pipeline::start(images(50), aug(), cfg).unwrap();
            let mut steps: Vec<Vec<usize>> = (0..4).map(|_| p.next_batch().unwrap().unwrap().indices).collect();
            assert_eq!(p.next_ticket, 4, "prefetch stops at the gated epoch's first step");
            let err = p.next_batch().unwrap().unwrap_err().to_string();
            assert!(err.contains("step 5 waits for epoch 1"), "{err}");
            assert!(p.open_epoch(2, Sampling::Uniform).is_err(), "epoch 2 is not gated");
            let short = Sampling::Balanced(Arc::new(vec![0; 49]));
            assert!(p.open_epoch(1, short).unwrap_err().to_string().contains("49 entries for 50"));
            p.open_epoch(1, even.clone()).unwrap();
            assert!(p.open_epoch(1, even.clone()).is_err(), "opened once");
            steps.extend(p.map(|b| b.unwrap().indices));
            ranks.push(steps);
        }
        (0..12).map(|t| ranks.iter().flat_map(|r| r[t].clone()).collect()).collect()
    };
    let one = global(1);
    let sampler = Sampler::new(50, 12, 0).unwrap();
    for (t, g) in one.iter().enumerate() {
        let epoch = t / 4;
        let order = sampler.order(epoch, if epoch == 1 { &even } else { &Sampling::Uniform });
        assert_eq!(g, &sampler.global_batch_of(t, &order), "step {t}");
        assert_eq!(epoch == 1, g.iter().all(|i| i % 2 == 0), "step {t}: {g:?}");
    }
    assert_eq!(global(2), one);
    assert_eq!(global(3), one);
}

#[test]
fn a_randaugment_schedule_switches_the_views_at_its_steps_on_any_layout() {
    use crate::schedule::{Phase, RandAugSchedule};
    let schedule = RandAugSchedule::new(vec![Phase { step: 0, n: 0, m: 0 }, Phase { step: 2, n: 2, m: 15 }]).unwrap();
    let views = |ra: Option<(usize, u32)>, schedule: Option<&RandAugSchedule>, world: usize| -> Vec<Vec<f32>> {
        let params = AugParams { randaugment: ra, ..aug().params };
        let per_rank: Vec<Vec<HostBatch>> = (0..world)
            .map(|rank| {
                let input = Input::Idx { images: images(50), augment: vec![Augmenter::new(params.clone(), 8, 8); 2] };
                let p =
                    Pipeline::start_scheduled(input, layout(rank, world, 12, 2, 4), schedule.cloned().map(Arc::new));
                p.unwrap().map(|b| b.unwrap()).collect()
            })
            .collect();
        // Each step's first view, its ranks' rows in order.
        (0..4).map(|s| per_rank.iter().flat_map(|r| r[s].views[0].clone()).collect()).collect()
    };
    let (plain, fixed) = (views(None, None, 1), views(Some((2, 15)), None, 1));
    for world in [1, 2, 3] {
        let replay = views(Some((5, 30)), Some(&schedule), world);
        assert_eq!(
            replay[..2],
            plain[..2],
            "steps 1-2 take phase 0 (no op), over the views' own (5, 30), on {world} rank(s)"
        );
        assert_eq!(replay[2..], fixed[2..], "steps 3-4 take (2, 15) on {world} rank(s)");
    }
    assert_ne!(plain[2], fixed[2]);
}
