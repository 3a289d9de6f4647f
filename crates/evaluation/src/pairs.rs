//! Verification pair lists over labelled items (held-out identities of our own data sets), and the fold
//! rule every pair list is verified with ([`PairSet`]).
//!
//! [`balanced_pairs`] makes a set in the spirit of the LFW protocol (half genuine, half impostor pairs) when
//! no official pair list exists. Official lists (LFW `pairs.txt`, `.bin` packs) produce the same [`Pair`]
//! type.
//!
//! The fold rule (one, for the trainer's evaluation and `facerec eval` alike): a pair list is verified
//! with the folds of its [`PairSet`], fold `f` being the `f`-th contiguous block of
//! [`crate::verification::kfold`]. A `.bin` pack and generated balanced pairs have no sets of their own:
//! 10 contiguous folds (insightface). An LFW list with `S > 1` sets: `S` folds, its sets
//! ([`crate::LfwPairs::resolve`] orders the pairs so); a single set (View 1): 10 folds, each a tenth of its
//! matched and a tenth of its mismatched pairs.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Number of folds of the insightface protocol.
pub const PROTOCOL_FOLDS: usize = 10;

/// One verification pair: item indices `a` and `b` (`a < b` for generated pairs) and whether they share a
/// label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pair {
    pub a: usize,
    pub b: usize,
    pub same: bool,
}

/// Pairs and the number of contiguous folds the verification protocol splits them into (see the module
/// doc for the rule). Build it with [`PairSet::contiguous`], [`crate::BinPack::pair_set`] or
/// [`crate::LfwPairs::resolve`], never by pairing a list with a fold count by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSet {
    /// The pairs, in fold order.
    pub pairs: Vec<Pair>,
    /// Number of folds; fold `f` is block `f` of `kfold(pairs.len(), folds)`.
    pub folds: usize,
}

impl PairSet {
    /// A list without sets of its own (a `.bin` pack, [`balanced_pairs`]): insightface's 10 contiguous
    /// folds ([`PROTOCOL_FOLDS`]).
    pub fn contiguous(pairs: Vec<Pair>) -> Self {
        Self {
            pairs,
            folds: PROTOCOL_FOLDS,
        }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// No pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether each pair is genuine, in order.
    pub fn issame(&self) -> Vec<bool> {
        self.pairs.iter().map(|p| p.same).collect()
    }

    /// Fails unless the list can be verified: at least one pair per fold, a fold count of at least 1.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.folds >= 1 && self.pairs.len() >= self.folds,
            "{} pairs cannot be split into {} folds (need at least one pair per fold)",
            self.pairs.len(),
            self.folds
        );
        Ok(())
    }
}

/// A balanced pair set over labelled items: every same-label pair, plus an equal number of distinct
/// different-label pairs drawn with the seed, the whole list shuffled with the seed so contiguous folds mix
/// both kinds.
///
/// Positives: all `sum_c C(n_c, 2)` pairs `a < b` with equal labels. Negatives: as many distinct unordered
/// different-label pairs, drawn uniformly without replacement (ChaCha8 seeded with `seed`); if fewer exist,
/// all of them. No self pairs, no duplicates; the same labels and seed give the same list.
pub fn balanced_pairs(labels: &[usize], seed: u64) -> Vec<Pair> {
    let n = labels.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pairs: Vec<Pair> = (0..n)
        .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
        .filter(|&(a, b)| labels[a] == labels[b])
        .map(|(a, b)| Pair { a, b, same: true })
        .collect();
    let positives = pairs.len();
    let negatives_available = n * n.saturating_sub(1) / 2 - positives;
    let want = positives.min(negatives_available);
    let negative = |a: usize, b: usize| Pair {
        a: a.min(b),
        b: a.max(b),
        same: false,
    };
    if 2 * want >= negatives_available {
        // Dense: enumerate every different-label pair and keep a random subset.
        let mut all: Vec<Pair> = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .filter(|&(a, b)| labels[a] != labels[b])
            .map(|(a, b)| negative(a, b))
            .collect();
        all.shuffle(&mut rng);
        all.truncate(want);
        pairs.extend(all);
    } else {
        // Sparse: rejection sampling; at least a third of all pairs are negatives and at most half of
        // them get taken, so the expected number of draws stays small.
        let mut seen = HashSet::with_capacity(want);
        while seen.len() < want {
            let (a, b) = (rng.gen_range(0..n), rng.gen_range(0..n));
            if labels[a] != labels[b] && seen.insert((a.min(b), a.max(b))) {
                pairs.push(negative(a, b));
            }
        }
    }
    pairs.shuffle(&mut rng);
    pairs
}
