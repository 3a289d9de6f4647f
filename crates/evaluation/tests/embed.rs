//! `embed_with_flip` and `verify_images` against hand computation with simple linear models.

use facerec_evaluation::{
    balanced_pairs, embed_with_flip, pair_distances, squared_distances, verify, verify_images,
    PairSet,
};
use tch::{Kind, Tensor};

fn images(n: i64, h: i64, w: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, 3, h, w], (Kind::Float, tch::Device::Cpu))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Mirror the width axis by an explicit reversed index, independent of `Tensor::flip`.
fn mirror(x: &Tensor) -> Tensor {
    let w = x.size()[3];
    x.index_select(
        3,
        &Tensor::arange_start_step(w - 1, -1, -1, (Kind::Int64, tch::Device::Cpu)),
    )
}

fn row_norms(x: &Tensor) -> Tensor {
    x.square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .sqrt()
}

#[test]
fn flip_invariant_model_gives_normalised_double() {
    // f(x) = sum over the width: flip-invariant, so e = normalize(2 f(x)) = f(x) / |f(x)|.
    let x = images(7, 4, 5, 0);
    let model = |t: &Tensor| {
        t.sum_dim_intlist([3i64].as_slice(), false, Kind::Float)
            .flatten(1, -1)
    };
    let (e, xnorm) = embed_with_flip(&model, &x, 3);
    let f = model(&x);
    let want = 2.0 * &f / row_norms(&(2.0 * &f)).unsqueeze(1);
    assert_eq!(e.size(), [7, 12]);
    assert!(max_abs(&e, &want) < 1e-6);
    let mean_norm = f64::try_from(row_norms(&f).mean(Kind::Float)).unwrap();
    assert!(
        (xnorm - mean_norm).abs() < 1e-5 * mean_norm,
        "{xnorm} vs {mean_norm}"
    );
}

#[test]
fn non_invariant_model_matches_manual_flip_test() {
    // A linear map of the flattened image depends on pixel positions, so f(flip x) != f(x).
    let x = images(5, 3, 4, 1);
    tch::manual_seed(2);
    let w = Tensor::randn([36, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let model = |t: &Tensor| t.flatten(1, -1).matmul(&w);
    let (e, xnorm) = embed_with_flip(&model, &x, 2);
    assert!(!e.requires_grad(), "embedding must run under no_grad");
    let _guard = tch::no_grad_guard();
    let (f, ff) = (model(&x), model(&mirror(&x)));
    assert!(
        max_abs(&f, &ff) > 1e-2,
        "the test model must not be flip-invariant"
    );
    let s = &f + &ff;
    let want = &s / row_norms(&s).unsqueeze(1);
    assert!(max_abs(&e, &want) < 1e-6);
    // XNorm: mean over the 2N un-normalised outputs, original and flipped.
    let mean_norm =
        f64::try_from(Tensor::cat(&[row_norms(&f), row_norms(&ff)], 0).mean(Kind::Float)).unwrap();
    assert!(
        (xnorm - mean_norm).abs() < 1e-5 * mean_norm,
        "{xnorm} vs {mean_norm}"
    );
    // Batch size does not change the result.
    let (e1, x1) = embed_with_flip(&model, &x, 100);
    assert!(max_abs(&e, &e1) < 1e-6 && (xnorm - x1).abs() < 1e-9);
}

#[test]
fn zero_output_stays_zero() {
    let x = images(2, 2, 2, 3);
    let model = |t: &Tensor| t.flatten(1, -1) * 0.0;
    let (e, xnorm) = embed_with_flip(&model, &x, 2);
    assert_eq!(f64::try_from(e.abs().sum(Kind::Float)).unwrap(), 0.0);
    assert_eq!(xnorm, 0.0);
}

#[test]
#[should_panic(expected = "model returned")]
fn wrong_model_output_panics() {
    let model = |t: &Tensor| t.flatten(0, -1);
    let _ = embed_with_flip(&model, &images(2, 2, 2, 4), 2);
}

#[test]
fn verify_images_equals_verify_on_gathered_rows() {
    let x = images(30, 3, 3, 5);
    let model = |t: &Tensor| t.flatten(1, -1).narrow(1, 0, 6);
    let labels: Vec<usize> = (0..30).map(|i| i % 6).collect();
    let pairs = balanced_pairs(&labels, 9);
    let (report, xnorm) =
        verify_images(&model, &x, &PairSet::contiguous(pairs.clone()), 8).unwrap();
    let (e, xnorm2) = embed_with_flip(&model, &x, 8);
    let mut flat = Vec::new();
    for p in &pairs {
        for r in [p.a, p.b] {
            flat.extend(Vec::<f32>::try_from(e.get(r as i64)).unwrap());
        }
    }
    let issame: Vec<bool> = pairs.iter().map(|p| p.same).collect();
    assert_eq!(report, verify(&flat, 6, &issame, 10));
    assert_eq!(report.num_pairs, pairs.len());
    assert_eq!(xnorm, xnorm2);
    // The pair set's folds decide: 5 folds give 5 fold accuracies, as verify with 5 folds.
    let five = PairSet {
        pairs: pairs.clone(),
        folds: 5,
    };
    let (report5, _) = verify_images(&model, &x, &five, 8).unwrap();
    assert_eq!(report5, verify(&flat, 6, &issame, 5));
    // Sizes are checked at the boundary: errors, not panics.
    let err = verify_images(&model, &x, &five, 0).unwrap_err().to_string();
    assert!(err.contains("batch size"), "{err}");
    let few = PairSet {
        pairs: pairs[..3].to_vec(),
        folds: 10,
    };
    let err = verify_images(&model, &x, &few, 8).unwrap_err().to_string();
    assert!(err.contains("3 pairs") && err.contains("10 folds"), "{err}");
}

#[test]
fn pair_distances_equal_squared_distances_of_gathered_rows() {
    // A transposed (non-contiguous) [N, D] view: rows are read in place, as the gathered copy.
    tch::manual_seed(11);
    let e = Tensor::randn([5, 7], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
    assert!(!e.is_contiguous());
    let pairs = balanced_pairs(&[0, 0, 1, 1, 2, 2, 2], 3);
    let mut flat = Vec::new();
    for p in &pairs {
        for r in [p.a, p.b] {
            flat.extend(Vec::<f32>::try_from(e.get(r as i64)).unwrap());
        }
    }
    assert_eq!(
        pair_distances(&e, &pairs),
        squared_distances(&flat, 5),
        "the same f64 arithmetic, bit for bit"
    );
}

#[test]
#[should_panic(expected = "out of range for 7 rows")]
fn pair_distances_reject_an_index_past_the_rows() {
    let e = images(7, 1, 1, 3).reshape([7, 3]);
    let bad = [facerec_evaluation::Pair {
        a: 2,
        b: 7,
        same: false,
    }];
    pair_distances(&e, &bad);
}
