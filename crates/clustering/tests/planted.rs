//! Planted clusters: well-separated Gaussian blobs on the unit sphere must be recovered exactly by
//! every algorithm; results must not depend on the block size; k-means is reproducible by seed.

use facerec_clustering::finch::{refine_to_k, select};
use facerec_clustering::{
    cosine_kmeans, evaluate, finch, knn_graph_clusters, FinchConfig, FinchSelect, GraphConfig,
    KMeansConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tch::Tensor;

const K: usize = 8;
const PER: usize = 40;
const D: usize = 32;

/// `K` random unit centres in `D` dims, `PER` points each: centre + N(0, sigma²) per coordinate,
/// then normalised; rows shuffled. Returns (embeddings [N, D] f32, true labels).
fn blobs(seed: u64, sigma: f64) -> (Tensor, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f64>> = (0..K)
        .map(|_| {
            let v: Vec<f64> = (0..D).map(|_| rng.sample(StandardNormal)).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect();
    let mut rows: Vec<(Vec<f32>, i64)> = Vec::new();
    for (c, mu) in centres.iter().enumerate() {
        for _ in 0..PER {
            let v: Vec<f32> = mu
                .iter()
                .map(|m| (m + sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect();
            rows.push((v, c as i64));
        }
    }
    for i in (1..rows.len()).rev() {
        let j = rng.gen_range(0..=i);
        rows.swap(i, j);
    }
    let flat: Vec<f32> = rows.iter().flat_map(|(v, _)| v.clone()).collect();
    let labels = rows.iter().map(|(_, l)| *l).collect();
    (
        Tensor::from_slice(&flat).view([(K * PER) as i64, D as i64]),
        labels,
    )
}

fn assert_perfect(what: &str, pred: &[i64], truth: &[i64]) {
    let m = evaluate(pred, truth).unwrap();
    assert!(
        m.pairwise_f == 1.0 && m.bcubed_f == 1.0 && (m.nmi - 1.0).abs() < 1e-12,
        "{what}: {m}"
    );
}

#[test]
fn kmeans_recovers_planted_blobs_and_is_seeded() {
    let (x, truth) = blobs(1, 0.08);
    let cfg = KMeansConfig {
        k: K,
        seed: 3,
        ..Default::default()
    };
    let a = cosine_kmeans(&x, &cfg);
    assert_perfect("kmeans", &a.assignments, &truth);
    assert!(a.mean_cosine > 0.8, "{}", a.mean_cosine);
    // Same seed, tiny blocks: identical assignments and centres.
    let b = cosine_kmeans(
        &x,
        &KMeansConfig {
            chunk_elems: 7,
            ..cfg.clone()
        },
    );
    assert_eq!(a.assignments, b.assignments);
    assert!(a.centres_kd.allclose(&b.centres_kd, 1e-6, 1e-6, false));
    // Centres are unit vectors.
    let norms = a.centres_kd.norm_scalaropt_dim(2, [1], false);
    assert!(norms.allclose(&norms.ones_like(), 1e-5, 1e-5, false));
}

#[test]
fn kmeans_recovers_blobs_for_many_seeds() {
    // k-means++ seeding on well separated blobs: every one of these seeds must find them all.
    let (x, truth) = blobs(2, 0.08);
    for seed in 0..5 {
        let r = cosine_kmeans(
            &x,
            &KMeansConfig {
                k: K,
                seed,
                ..Default::default()
            },
        );
        assert_perfect(&format!("kmeans seed {seed}"), &r.assignments, &truth);
    }
}

#[test]
fn graph_components_recover_planted_blobs() {
    let (x, truth) = blobs(3, 0.08);
    let cfg = GraphConfig {
        k: 10,
        threshold: 0.5,
        ..Default::default()
    };
    let p = knn_graph_clusters(&x, &cfg);
    assert_perfect("graph", &p, &truth);
    assert_eq!(
        p,
        knn_graph_clusters(
            &x,
            &GraphConfig {
                chunk_elems: 5,
                ..cfg
            }
        )
    );
    // A threshold above every similarity leaves singletons.
    let single = knn_graph_clusters(
        &x,
        &GraphConfig {
            threshold: 1.0,
            ..Default::default()
        },
    );
    assert_eq!(evaluate(&single, &truth).unwrap().num_clusters, K * PER);
}

#[test]
fn finch_recovers_planted_blobs() {
    let (x, truth) = blobs(4, 0.08);
    // With a link threshold the hierarchy stops at the blobs.
    let parts = finch(
        &x,
        &FinchConfig {
            threshold: Some(0.5),
            ..Default::default()
        },
    );
    assert_perfect("finch threshold", parts.last().unwrap(), &truth);
    // Parameter-free: the hierarchy is strictly coarsening, and some level is the planted one.
    let parts = finch(&x, &FinchConfig::default());
    let counts: Vec<usize> = parts
        .iter()
        .map(|p| evaluate(p, &truth).unwrap().num_clusters)
        .collect();
    assert!(counts.windows(2).all(|w| w[1] < w[0]), "{counts:?}");
    // Parameter-free FINCH jumps over the planted level here ([63, 10, 3, 1] clusters); every
    // level with >= K clusters must still be pure (only same-blob merges).
    for p in parts
        .iter()
        .filter(|p| evaluate(p, &truth).unwrap().num_clusters >= K)
    {
        assert_eq!(
            evaluate(p, &truth).unwrap().pairwise_precision,
            1.0,
            "{counts:?}"
        );
    }
    // FINCH's refinement to a required K from the first level with >= K clusters recovers them.
    let start = parts
        .iter()
        .rev()
        .find(|p| evaluate(p, &truth).unwrap().num_clusters >= K)
        .unwrap();
    let refined = refine_to_k(&x, start, K);
    assert_perfect(
        &format!("finch refined to {K} (levels {counts:?})"),
        &refined,
        &truth,
    );
    let _ = select(&parts, FinchSelect::ClosestTo(K));
    let tiny = finch(
        &x,
        &FinchConfig {
            chunk_elems: 3,
            ..Default::default()
        },
    );
    assert_eq!(parts, tiny);
}
