//! `balanced_pairs`: counts, validity, uniqueness, determinism and mixing.

use std::collections::HashSet;

use facerec_evaluation::{balanced_pairs, Pair};

fn check(labels: &[usize], pairs: &[Pair], negatives_expected: usize) {
    let mut count = std::collections::HashMap::new();
    labels
        .iter()
        .for_each(|&l| *count.entry(l).or_insert(0usize) += 1);
    let positives_expected: usize = count.values().map(|&n| n * (n - 1) / 2).sum();
    let pos = pairs.iter().filter(|p| p.same).count();
    assert_eq!(pos, positives_expected);
    assert_eq!(pairs.len() - pos, negatives_expected);
    let mut seen = HashSet::new();
    for p in pairs {
        assert!(p.a < p.b && p.b < labels.len(), "{p:?}");
        assert_eq!(p.same, labels[p.a] == labels[p.b], "{p:?}");
        assert!(seen.insert((p.a, p.b)), "duplicate {p:?}");
    }
}

fn labels_of(sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| std::iter::repeat_n(c, n))
        .collect()
}

#[test]
fn counts_validity_and_determinism() {
    let labels = labels_of(&[3, 2, 4, 1, 5, 5, 6]);
    let pos = (3 + 1 + 6) + 10 + 10 + 15;
    let pairs = balanced_pairs(&labels, 7);
    check(&labels, &pairs, pos);
    assert_eq!(pairs, balanced_pairs(&labels, 7));
    assert_ne!(pairs, balanced_pairs(&labels, 8));
}

#[test]
fn interleaved_labels_and_large_sets() {
    // Labels not grouped by index; 200 identities of 6 images: 3000 positives among 719400 pairs.
    let labels: Vec<usize> = (0..1200).map(|i| (i * 7) % 200).collect();
    let pairs = balanced_pairs(&labels, 1);
    check(&labels, &pairs, 3000);
    // Shuffled: every tenth (a contiguous fold) holds both kinds in roughly equal numbers.
    for fold in pairs.chunks(600) {
        let pos = fold.iter().filter(|p| p.same).count();
        assert!(
            (200..400).contains(&pos),
            "fold with {pos} positives of 600"
        );
    }
}

#[test]
fn few_negatives_are_all_taken() {
    // One big identity and two singletons: 190 positives but only 20 + 20 + 1 = 41 different-label pairs.
    let labels = labels_of(&[20, 1, 1]);
    let pairs = balanced_pairs(&labels, 3);
    check(&labels, &pairs, 41);
}

#[test]
fn dense_branch_draws_a_subset() {
    // 4 identities of 3: 12 positives, 54 negatives available (more than half taken: enumerate branch).
    let labels = labels_of(&[3, 3, 3, 3]);
    let a = balanced_pairs(&labels, 11);
    check(&labels, &a, 12);
    let b = balanced_pairs(&labels, 12);
    let neg = |v: &[Pair]| {
        v.iter()
            .filter(|p| !p.same)
            .map(|p| (p.a, p.b))
            .collect::<HashSet<_>>()
    };
    assert_ne!(
        neg(&a),
        neg(&b),
        "different seeds should draw different negatives"
    );
}

#[test]
fn no_positives_no_pairs() {
    assert!(balanced_pairs(&[0, 1, 2, 3], 0).is_empty());
    assert!(balanced_pairs(&[], 0).is_empty());
}
