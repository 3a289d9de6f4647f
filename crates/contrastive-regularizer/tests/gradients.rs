//! Finite-difference gradient checks in f64 (`facerec_testkit::gradcheck`) of the contrastive
//! loss w.r.t. both views, for every protocol, with margins 0 and 0.3 and scales 8 and 64, on a
//! batch with repeated identities. The margin is a constant of the loss (computed from detached
//! values), so the check runs [`ContrastiveLogits::loss`] with a given margin; a second check goes
//! through `CoReFace::forward` with a fixed margin, and a third through an FC + BatchNorm1d neck
//! (the embedding augmentation path) with fixed dropout masks.

use facerec_contrastive_regularizer::{
    contrastive_logits, CoReFace, CoReFaceConfig, ContrastiveRegularizer, FixedMarginConfig,
    MarginConfig, Protocol,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::randn;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const B: i64 = 6;
const D: i64 = 5;
const LABELS: [i64; 6] = [0, 1, 0, 2, 1, 0];
const PROTOCOLS: [Protocol; 3] = [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN];

fn views() -> (Tensor, Tensor) {
    let v1 = randn(1, &[B, D]);
    let v2 = &v1 + randn(2, &[B, D]) * 0.5;
    (v1.set_requires_grad(true), v2.set_requires_grad(true))
}

#[test]
fn loss_gradient_matches_finite_differences_for_every_protocol() {
    let (v1, v2) = views();
    let labels = Tensor::from_slice(&LABELS);
    for protocol in PROTOCOLS {
        for m in [0.0, 0.3] {
            for s in [8.0, 64.0] {
                let margin = Tensor::from(m);
                let f = || contrastive_logits(&v1, &v2, &labels, protocol).loss(s, &margin);
                let loss = f64::try_from(f()).unwrap();
                assert!(
                    loss > 1e-3,
                    "{protocol:?} s={s} m={m}: loss {loss} too saturated to test"
                );
                check_gradients(f, &[("view1", &v1), ("view2", &v2)], &GradCheck::default())
                    .unwrap_or_else(|e| panic!("{protocol:?} s={s} m={m}: {e:#}"));
            }
        }
    }
}

#[test]
fn regularizer_forward_gradient_matches_finite_differences() {
    let (v1, v2) = views();
    let labels = Tensor::from_slice(&LABELS);
    for protocol in PROTOCOLS {
        let cfg = CoReFaceConfig {
            protocol,
            s: 16.0,
            margin: MarginConfig::Fixed(FixedMarginConfig { m: 0.2 }),
            ..Default::default()
        };
        let reg = std::cell::RefCell::new(CoReFace::standalone(&cfg, Device::Cpu, Kind::Double));
        let f = || reg.borrow_mut().forward(&v1, &v2, &labels).loss;
        check_gradients(f, &[("view1", &v1), ("view2", &v2)], &GradCheck::default())
            .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"));
    }
}

/// Trunk features -> two fixed inverted-dropout masks -> shared Linear + BatchNorm1d (batch
/// statistics, per view) -> CoReFace loss, differentiated w.r.t. the trunk features and the
/// Linear weight.
#[test]
fn gradient_through_two_dropout_views_and_a_batch_norm_neck() {
    let f_dim = 7;
    let h = randn(3, &[B, f_dim]).set_requires_grad(true);
    let w = (randn(4, &[D, f_dim]) * 0.4).set_requires_grad(true);
    let p = 0.4;
    let mask = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..B * f_dim)
            .map(|_| {
                if rng.gen::<f64>() < p {
                    0.0
                } else {
                    1.0 / (1.0 - p)
                }
            })
            .collect();
        Tensor::from_slice(&v).view([B, f_dim])
    };
    let (m1, m2) = (mask(5), mask(6));
    let labels = Tensor::from_slice(&LABELS);
    let neck = |x: &Tensor| {
        x.matmul(&w.tr()).batch_norm(
            None::<Tensor>,
            None::<Tensor>,
            None::<Tensor>,
            None::<Tensor>,
            true,
            0.1,
            1e-5,
            false,
        )
    };
    for protocol in PROTOCOLS {
        let margin = Tensor::from(0.1);
        let f = || {
            let v1 = neck(&(&h * &m1));
            let v2 = neck(&(&h * &m2));
            contrastive_logits(&v1, &v2, &labels, protocol).loss(16.0, &margin)
        };
        check_gradients(
            f,
            &[("trunk", &h), ("fc.weight", &w)],
            &GradCheck::default(),
        )
        .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"));
    }
}
