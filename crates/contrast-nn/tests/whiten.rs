//! Whitening (Su et al. 2021): the fitted transform whitens, matches a plain
//! transcription of their code (`np.cov`, SVD, `u · diag(1/√s)`) up to each
//! column's sign, and P ranks fit the statistics of one rank holding every row.

use crate::common::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_nn::whiten::Whitening;
use tch::{Kind, Tensor};

const D: i64 = 4;

/// 40 rows with distinct variances along mixed directions.
fn rows() -> Tensor {
    let z = Tensor::from_slice(&randn_vec(40 * D as usize, 3)).view([40, D]);
    let scale = Tensor::from_slice(&[3.0, 1.5, 0.7, 0.2]);
    let mix = Tensor::from_slice(&randn_vec((D * D) as usize, 4)).view([D, D]);
    (z * scale).matmul(&mix) + 0.5
}

#[test]
fn whitening_whitens_matches_su_et_al_and_is_exact_across_ranks() {
    let x = rows();
    let w = Whitening::fit(&x, &Solo, None).unwrap();
    // The whitened rows have zero mean and identity (unbiased) covariance.
    let y = w.apply(&x);
    let cov = y.tr().matmul(&y) / 39.0;
    assert!(rel_err(&Host::of(&cov).data, &Host::of(&Tensor::eye(D, (Kind::Double, tch::Device::Cpu))).data) < 1e-9);
    assert!(y.mean_dim([0i64].as_slice(), false, Kind::Double).abs().max().double_value(&[]) < 1e-9);
    // Su et al.: mu = x.mean(0); cov = np.cov(x.T); u, s, vh = svd(cov); W = u · diag(1/√s).
    let mu = x.mean_dim([0i64].as_slice(), false, Kind::Double);
    let c = (&x - &mu).tr().matmul(&(&x - &mu)) / 39.0;
    let (u, s, _) = c.svd(true, true);
    let reference = &u * s.rsqrt().unsqueeze(0);
    let signs = (&reference * &w.transform).sum_dim_intlist([0i64].as_slice(), false, Kind::Double).sign();
    let reference = reference * signs.unsqueeze(0);
    assert!(rel_err(&Host::of(&w.transform).data, &Host::of(&reference).data) < 1e-9);
    // A cut keeps the directions of largest variance.
    let cut = Whitening::fit(&x, &Solo, Some(2)).unwrap();
    assert_eq!(cut.transform.size(), [D, 2]);
    assert!(rel_err(&Host::of(&cut.transform).data, &Host::of(&w.transform.narrow(1, 0, 2)).data) < 1e-12);
    // P ranks, each with its own rows (any split), fit the same whitening.
    let all = Host::of(&x);
    for p in [2usize, 4] {
        let got = Threads::run(p, |c| {
            let mine: Vec<i64> = (c.rank() as i64..40).step_by(p).collect();
            let x = all.t().index_select(0, &Tensor::from_slice(&mine));
            let w = Whitening::fit(&x, &c, None).unwrap();
            (Host::of(&w.mean).data, Host::of(&w.transform).data)
        });
        for (mean, transform) in got {
            assert!(rel_err(&mean, &Host::of(&w.mean).data) < 1e-9, "P={p} mean");
            assert!(rel_err(&transform, &Host::of(&w.transform).data) < 1e-9, "P={p} transform");
        }
    }
}

#[test]
fn whitening_refuses_a_cut_above_the_dimension_and_too_few_rows() {
    let x = rows();
    let err = Whitening::fit(&x, &Solo, Some(5)).err().unwrap().to_string();
    assert!(err.contains("5 dimensions of 4-dimensional"), "{err}");
    let err = Whitening::fit(&x.narrow(0, 0, 1), &Solo, None).err().unwrap().to_string();
    assert!(err.contains("at least 2 rows"), "{err}");
}
