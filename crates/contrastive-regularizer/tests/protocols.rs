//! Protocol invariants, the supervised mask and the special cases that must reduce to known losses.
//!
//! - `Protocol::layout` (a plain description) has, per row, the documented counts of positives,
//!   negatives, masked and excluded entries, and repeats each pair the documented number of times.
//! - `contrastive_logits` (the tensor implementation) equals that description entry by entry.
//! - The mask: with every label equal, the loss has the closed form of one positive against
//!   `K − 1` logits of 0; masked entries get no gradient; distinct labels mask nothing.
//! - Fixed `m = 0` with distinct labels is InfoNCE (one way) and NT-Xent (2N).

use std::collections::HashMap;

use facerec_contrastive_regularizer::{
    contrastive_logits, normalize, LayoutRow, Protocol, Role, ViewRef,
};
use facerec_loss_heads::cross_entropy;
use facerec_testkit::randn;
use tch::{Kind, Tensor};

const PROTOCOLS: [Protocol; 3] = [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN];
/// Identity 7 three times, identity 2 twice, three singletons.
const LABELS: [i64; 8] = [7, 2, 7, 5, 2, 7, 9, 4];

fn count(row: &LayoutRow, role: Role) -> usize {
    row.entries.iter().filter(|(_, r)| *r == role).count()
}

#[test]
fn rows_have_the_documented_counts() {
    let b = LABELS.len();
    let n_same = |i: usize| LABELS.iter().filter(|&&l| l == LABELS[i]).count();
    for protocol in PROTOCOLS {
        let rows = protocol.layout(&LABELS);
        let (n_rows, width) = match protocol {
            Protocol::OneWay => (b, b),
            Protocol::BothWays => (2 * b, b),
            Protocol::TwoN => (2 * b, 2 * b),
        };
        assert_eq!(rows.len(), n_rows, "{protocol:?}");
        for row in &rows {
            let i = row.anchor.image;
            assert_eq!(row.entries.len(), width);
            assert_eq!(count(row, Role::Positive), 1, "{protocol:?} {row:?}");
            let (masked, excluded) = match protocol {
                Protocol::TwoN => (2 * (n_same(i) - 1), 1),
                _ => (n_same(i) - 1, 0),
            };
            assert_eq!(count(row, Role::Masked), masked, "{protocol:?} row {i}");
            assert_eq!(count(row, Role::Excluded), excluded, "{protocol:?} row {i}");
            // Negatives: every other image of another identity (once per candidate view).
            let views = if protocol == Protocol::TwoN { 2 } else { 1 };
            assert_eq!(count(row, Role::Negative), views * (b - n_same(i)));
            // The positive is the same image in the other view; the anchor never sees itself.
            let (pos, _) = row
                .entries
                .iter()
                .find(|(_, r)| *r == Role::Positive)
                .unwrap();
            assert_eq!(pos.image, i);
            assert_ne!(pos.view, row.anchor.view);
        }
    }
}

/// How often each cosine (unordered pair of embeddings) and each image pair enters a softmax row.
#[test]
fn which_pairs_repeat() {
    let b = LABELS.len();
    for protocol in PROTOCOLS {
        let mut per_cosine: HashMap<(ViewRef, ViewRef), usize> = HashMap::new();
        let mut per_image_pair: HashMap<(usize, usize), usize> = HashMap::new();
        for row in protocol.layout(&LABELS) {
            for (c, role) in &row.entries {
                if *role == Role::Excluded {
                    continue;
                }
                let key = if row.anchor < *c {
                    (row.anchor, *c)
                } else {
                    (*c, row.anchor)
                };
                *per_cosine.entry(key).or_default() += 1;
                let (i, j) = (row.anchor.image.min(c.image), row.anchor.image.max(c.image));
                *per_image_pair.entry((i, j)).or_default() += 1;
            }
        }
        let within_view = per_cosine.keys().filter(|(a, c)| a.view == c.view).count();
        let cross_view = per_cosine.len() - within_view;
        // Every cross-view cosine is present (B² of them) in every protocol.
        assert_eq!(cross_view, b * b, "{protocol:?}");
        let (times, within, per_pair, per_same_image) = match protocol {
            // Each cosine once; an image pair {i, j} twice: (i¹, j²) and (j¹, i²).
            Protocol::OneWay => (1, 0, 2, 1),
            // Each cosine twice (S and Sᵀ): the repetition the paper warns about.
            Protocol::BothWays => (2, 0, 4, 2),
            // Each cosine twice, and within-view cosines (i¹, j¹), (i², j²) are added.
            Protocol::TwoN => (2, b * (b - 1), 8, 2),
        };
        assert_eq!(within_view, within, "{protocol:?}");
        assert!(per_cosine.values().all(|&n| n == times), "{protocol:?}");
        for ((i, j), n) in per_image_pair {
            let want = if i == j { per_same_image } else { per_pair };
            assert_eq!(n, want, "{protocol:?} images ({i}, {j})");
        }
    }
}

/// The tensor implementation is the layout: each entry's logit per its role.
#[test]
fn tensors_follow_the_layout() {
    let b = LABELS.len() as i64;
    let (v1, v2) = (randn(1, &[b, 4]), randn(2, &[b, 4]));
    let (e1, e2) = (normalize(&v1), normalize(&v2));
    let emb = |r: ViewRef| {
        if r.view == 1 {
            e1.get(r.image as i64)
        } else {
            e2.get(r.image as i64)
        }
    };
    let labels = Tensor::from_slice(&LABELS);
    let (s, m) = (5.0, 0.3);
    for protocol in PROTOCOLS {
        let lg = contrastive_logits(&v1, &v2, &labels, protocol);
        let z = lg.logits(s, &Tensor::from(m));
        let targets = Vec::<i64>::try_from(&lg.targets_r).unwrap();
        let layout = protocol.layout(&LABELS);
        assert_eq!(
            z.size(),
            [layout.len() as i64, layout[0].entries.len() as i64]
        );
        for (r, row) in layout.iter().enumerate() {
            for (k, (c, role)) in row.entries.iter().enumerate() {
                let got = z.double_value(&[r as i64, k as i64]);
                let cos = emb(row.anchor).dot(&emb(*c)).double_value(&[]);
                let want = match role {
                    Role::Positive => s * (cos - m),
                    Role::Negative => s * cos,
                    Role::Masked => 0.0,
                    Role::Excluded => f64::NEG_INFINITY,
                };
                assert!(
                    got == want || (got - want).abs() < 1e-12,
                    "{protocol:?} row {r} col {k} ({role:?}): {got} vs {want}"
                );
                if *role == Role::Positive {
                    assert_eq!(targets[r], k as i64);
                }
            }
        }
    }
}

#[test]
fn one_identity_batch_has_the_closed_form_and_masked_entries_get_no_gradient() {
    let b = 5;
    let labels = Tensor::from_slice(&[3i64; 5]);
    let v1 = randn(3, &[b, 4]).set_requires_grad(true);
    let v2 = randn(4, &[b, 4]).set_requires_grad(true);
    let (s, m) = (8.0, 0.2);
    for protocol in PROTOCOLS {
        let loss = contrastive_logits(&v1, &v2, &labels, protocol).loss(s, &Tensor::from(m));
        // Every row: the positive logit z = s(c_ii' − m) against K − 1 zeros (masked entries stay
        // in the denominator as e^0 = 1).
        let cos_pos = (normalize(&v1) * normalize(&v2)).sum_dim_intlist(1, false, Kind::Double);
        let z = (cos_pos - m) * s;
        let others = match protocol {
            Protocol::TwoN => 2 * b - 2,
            _ => b - 1,
        } as f64;
        let row_loss = -&z + (z.exp() + others).log();
        let want = row_loss.mean(Kind::Double).double_value(&[]);
        let got = loss.double_value(&[]);
        assert!((got - want).abs() < 1e-12, "{protocol:?}: {got} vs {want}");
        // Masked entries carry no gradient: every entry but the positive is masked (or excluded),
        // so the gradient w.r.t. view-1 row k depends on rows k of the views only, and changing
        // view-1 row 0 leaves the gradient of rows 1.. unchanged.
        let g = Tensor::run_backward(&[&loss], &[&v1], false, false);
        let v1b = v1.detach().copy();
        let _ = v1b.get(0).fill_(0.5);
        let v1b = v1b.set_requires_grad(true);
        let loss_b = contrastive_logits(&v1b, &v2, &labels, protocol).loss(s, &Tensor::from(m));
        let gb = Tensor::run_backward(&[&loss_b], &[&v1b], false, false);
        let rest = |t: &Tensor| t.narrow(0, 1, b - 1);
        assert!(
            rest(&g[0]).allclose(&rest(&gb[0]), 1e-12, 1e-14, false),
            "{protocol:?}"
        );
        assert!(
            !g[0].get(0).allclose(&gb[0].get(0), 1e-6, 1e-9, false),
            "row 0 must change"
        );
    }
}

#[test]
fn distinct_labels_mask_nothing_and_reduce_to_infonce_and_nt_xent() {
    let b = 6;
    let labels = Tensor::arange(b, (Kind::Int64, tch::Device::Cpu));
    let (v1, v2) = (randn(5, &[b, 4]), randn(6, &[b, 4]));
    let (e1, e2) = (normalize(&v1), normalize(&v2));
    let s = 10.0;
    let zero = Tensor::from(0.0);
    // One way: InfoNCE with view-2 candidates.
    let want = cross_entropy(&(e1.mm(&e2.tr()) * s), &labels);
    let got = contrastive_logits(&v1, &v2, &labels, Protocol::OneWay).loss(s, &zero);
    assert!(got.allclose(&want, 1e-12, 1e-12, false));
    // Both ways: the mean of the two directions.
    let back = cross_entropy(&(e2.mm(&e1.tr()) * s), &labels);
    let got = contrastive_logits(&v1, &v2, &labels, Protocol::BothWays).loss(s, &zero);
    assert!(got.allclose(&((&want + back) * 0.5), 1e-12, 1e-12, false));
    // 2N: NT-Xent, the diagonal removed from the softmax.
    let zcat = Tensor::cat(&[&e1, &e2], 0);
    let sim = zcat.mm(&zcat.tr()) * s;
    let n = 2 * b;
    let sim = sim.masked_fill(
        &Tensor::eye(n, (Kind::Bool, tch::Device::Cpu)),
        f64::NEG_INFINITY,
    );
    let targets = (Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)) + b).remainder(n);
    let want = cross_entropy(&sim, &targets);
    let got = contrastive_logits(&v1, &v2, &labels, Protocol::TwoN).loss(s, &zero);
    assert!(got.allclose(&want, 1e-12, 1e-12, false));
}

#[test]
#[should_panic(expected = "B >= 2")]
fn a_single_image_batch_panics() {
    let v = randn(7, &[1, 4]);
    let _ = contrastive_logits(&v, &v, &Tensor::from_slice(&[0i64]), Protocol::OneWay);
}
