//! insightface's 10-fold verification protocol ("Accuracy-Flip") on already-computed embeddings:
//! best-threshold accuracy with k-fold cross-validation, and VAL@FAR = 1e-3 (SPEC 6.1, the procedure of
//! `recognition/arcface_torch/eval/verification.py`, re-implemented from the spec's description).
//!
//! Owns the threshold grids (`np.arange` semantics), the contiguous fold split (sklearn `KFold`, no shuffle),
//! the accuracy and VAL/FAR procedures and a replica of scipy `interp1d(kind='slinear')` as insightface uses it.
//! Counting uses sorted distances and binary search instead of one pass per threshold; the integer counts,
//! hence every accuracy, are identical to the per-threshold loop. Deliberate differences from insightface
//! (see docs/evaluation.md): squared distances are summed in f64 (insightface: float32), and an empty class in
//! a fold gives VAL or FAR 0 where insightface raises `ZeroDivisionError`.

use std::ops::Range;

use serde::Serialize;

/// Upper end (exclusive) of both threshold grids: squared distances of unit vectors lie in [0, 4].
pub const THRESHOLD_STOP: f64 = 4.0;
/// Step of the accuracy threshold grid (400 thresholds).
pub const ACCURACY_THRESHOLD_STEP: f64 = 0.01;
/// Step of the VAL@FAR threshold grid (4000 thresholds).
pub const VAL_THRESHOLD_STEP: f64 = 0.001;
/// The false accept rate at which VAL is reported.
pub const FAR_TARGET: f64 = 1e-3;

/// Result of [`verify`]; field names are what the trainer logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerificationReport {
    /// Number of pairs evaluated.
    pub num_pairs: usize,
    /// Mean of `fold_accuracies`.
    pub accuracy_mean: f64,
    /// Population standard deviation (numpy default, ddof = 0) of `fold_accuracies`.
    pub accuracy_std: f64,
    /// Accuracy on each held-out fold at the threshold chosen on the other folds.
    pub fold_accuracies: Vec<f64>,
    /// The threshold chosen for each fold (a value of the 0.01 grid).
    pub fold_thresholds: Vec<f64>,
    /// Mean over folds of VAL (true accept rate) at the threshold interpolated for FAR = 1e-3.
    pub val_mean: f64,
    /// Population standard deviation of the per-fold VAL.
    pub val_std: f64,
    /// Mean over folds of the FAR measured on the held-out fold at that threshold.
    pub far_mean: f64,
}

/// Per-fold VAL@FAR details, the building block of the VAL fields of [`VerificationReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValFar {
    /// Threshold interpolated on the train folds for the FAR target (0 when unreachable).
    pub fold_thresholds: Vec<f64>,
    /// True accept rate on the held-out fold.
    pub fold_val: Vec<f64>,
    /// False accept rate on the held-out fold.
    pub fold_far: Vec<f64>,
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values, value i is
/// `start + i * delta` with `delta = (start + step) - start` (numpy's fill rule), so the grids carry
/// exactly numpy's rounding.
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// Contiguous test folds of sklearn `KFold(n_splits=folds, shuffle=False)` over `n` items: the first
/// `n % folds` folds hold one extra item. The train set of a fold is everything else; with `folds == 1`
/// insightface's `LFold` trains and tests on all items (see [`verify_distances`]).
///
/// # Panics
/// If `folds == 0` or `folds > n`.
pub fn kfold(n: usize, folds: usize) -> Vec<Range<usize>> {
    assert!(
        folds >= 1 && folds <= n,
        "kfold: need 1 <= folds ({folds}) <= items ({n})"
    );
    let (base, extra) = (n / folds, n % folds);
    let mut start = 0;
    (0..folds)
        .map(|f| {
            let len = base + usize::from(f < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Squared Euclidean distance of each pair: `d_k = ||e_2k - e_2k+1||^2`, each component difference and the
/// sum taken in f64, summed left to right over the dimensions.
///
/// # Shapes
/// `emb`: `[2P, dim]` row-major; returns `P` values.
///
/// # Panics
/// If `dim == 0` or `emb.len()` is not a multiple of `2 * dim`.
pub fn squared_distances(emb: &[f32], dim: usize) -> Vec<f64> {
    assert!(
        dim > 0 && emb.len().is_multiple_of(2 * dim),
        "squared_distances: {} floats do not form pairs of {dim}-dim rows",
        emb.len()
    );
    emb.chunks_exact(2 * dim)
        .map(|pair| {
            let (a, b) = pair.split_at(dim);
            squared_distance(a, b)
        })
        .collect()
}

/// `||a - b||^2` of two equally long rows, each component difference and the sum taken in f64, summed
/// left to right: the one rule behind [`squared_distances`] and [`crate::pair_distances`].
pub(crate) fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |acc, (&x, &y)| {
        let d = f64::from(x) - f64::from(y);
        acc + d * d
    })
}

/// insightface 10-fold "Accuracy-Flip" on already-computed embeddings.
///
/// `emb` holds 2P rows of `dim` floats, row-major; rows 2k and 2k+1 form pair k with label `issame[k]`.
/// The caller L2-normalises the embeddings (see `embed_with_flip`). `folds` is 10 in the protocol.
///
/// # Shapes
/// `emb`: `[2 * issame.len(), dim]` row-major.
///
/// # Panics
/// If `emb.len() != 2 * issame.len() * dim`, `dim == 0`, `folds == 0` or `folds > issame.len()`.
pub fn verify(emb: &[f32], dim: usize, issame: &[bool], folds: usize) -> VerificationReport {
    assert_eq!(
        emb.len(),
        2 * issame.len() * dim,
        "verify: {} floats for {} pairs of {dim}-dim embeddings",
        emb.len(),
        issame.len()
    );
    verify_distances(&squared_distances(emb, dim), issame, folds)
}

/// [`verify`] on precomputed squared distances (one per pair).
///
/// # Panics
/// If `dist.len() != issame.len()`, `folds == 0` or `folds > dist.len()`.
pub fn verify_distances(dist: &[f64], issame: &[bool], folds: usize) -> VerificationReport {
    assert_eq!(
        dist.len(),
        issame.len(),
        "verify_distances: {} distances for {} labels",
        dist.len(),
        issame.len()
    );
    let splits = Splits::new(dist, issame, folds);
    let thresholds = arange(0.0, THRESHOLD_STOP, ACCURACY_THRESHOLD_STEP);
    let (mut fold_accuracies, mut fold_thresholds) = (Vec::new(), Vec::new());
    for (train, test) in splits.iter() {
        // First maximum of the train accuracy, i.e. the smallest threshold among ties.
        let mut best = (0usize, thresholds[0]);
        for &t in &thresholds {
            let correct = train.correct(t);
            if correct > best.0 {
                best = (correct, t);
            }
        }
        fold_thresholds.push(best.1);
        fold_accuracies.push(test.correct(best.1) as f64 / test.len() as f64);
    }
    let vf = val_far_from_splits(&splits, FAR_TARGET);
    let (accuracy_mean, accuracy_std) = mean_std(&fold_accuracies);
    let (val_mean, val_std) = mean_std(&vf.fold_val);
    VerificationReport {
        num_pairs: dist.len(),
        accuracy_mean,
        accuracy_std,
        fold_accuracies,
        fold_thresholds,
        val_mean,
        val_std,
        far_mean: mean_std(&vf.fold_far).0,
    }
}

/// VAL at the given FAR target per fold, insightface style: FAR of every threshold of the 0.001 grid on the
/// train folds; if the largest reaches the target, the threshold is `interp1d(far, thresholds,
/// kind='slinear')(target)` (see [`interp1d_slinear`]), else 0; VAL and FAR are then measured on the
/// held-out fold with that threshold.
///
/// # Panics
/// As [`verify_distances`].
pub fn val_at_far(dist: &[f64], issame: &[bool], folds: usize, far_target: f64) -> ValFar {
    assert_eq!(dist.len(), issame.len(), "val_at_far: length mismatch");
    val_far_from_splits(&Splits::new(dist, issame, folds), far_target)
}

fn val_far_from_splits(splits: &Splits, far_target: f64) -> ValFar {
    let thresholds = arange(0.0, THRESHOLD_STOP, VAL_THRESHOLD_STEP);
    let mut out = ValFar {
        fold_thresholds: Vec::new(),
        fold_val: Vec::new(),
        fold_far: Vec::new(),
    };
    for (train, test) in splits.iter() {
        let far_train: Vec<f64> = thresholds.iter().map(|&t| train.val_far(t).1).collect();
        let reachable = far_train.iter().any(|&f| f >= far_target);
        let t = if reachable {
            interp1d_slinear(&far_train, &thresholds, far_target)
        } else {
            0.0
        };
        let (val, far) = test.val_far(t);
        out.fold_thresholds.push(t);
        out.fold_val.push(val);
        out.fold_far.push(far);
    }
    out
}

/// Replica of `scipy.interpolate.interp1d(x, y, kind='slinear')(at)` for `x[0] <= at <= max(x)`, including
/// its behaviour on repeated `x` values (insightface feeds it a non-decreasing FAR curve full of repeats).
///
/// scipy sorts `x` stably, builds a degree-1 B-spline with knots `[x0, x0, x1, .., x_last, x_last]` and
/// coefficients `y` (no uniqueness check for degree 1), finds the knot interval by scanning from the left
/// for the first knot greater than `at` (capped at the last interval), and evaluates with de Boor's
/// recursion. The result: linear interpolation between the *last* point with `x <= at` and the point after
/// it. Quirk kept: if `at` equals the largest `x` and the last two `x` are equal, the interval is
/// degenerate and scipy returns 0. Arithmetic follows scipy's evaluation order exactly.
///
/// # Panics
/// If the lengths differ, fewer than 2 points, or `at` is outside `[min(x), max(x)]` (scipy raises).
pub fn interp1d_slinear(x: &[f64], y: &[f64], at: f64) -> f64 {
    assert!(
        x.len() == y.len() && x.len() >= 2,
        "interp1d_slinear: bad input lengths"
    );
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j])); // stable, as numpy's mergesort
    let (xs, ys): (Vec<f64>, Vec<f64>) = order.iter().map(|&i| (x[i], y[i])).unzip();
    let m = xs.len();
    assert!(
        at >= xs[0] && at <= xs[m - 1],
        "interp1d_slinear: {at} outside [{}, {}]",
        xs[0],
        xs[m - 1]
    );
    // Interval: first index i >= 1 with xs[i] > at, capped at m - 1; interpolate on [xs[i-1], xs[i]].
    let i = (1..m).find(|&i| xs[i] > at).unwrap_or(m - 1);
    let (xa, xb) = (xs[i - 1], xs[i]);
    if xa == xb {
        return 0.0;
    }
    let w = 1.0 / (xb - xa);
    let (h0, h1) = (w * (xb - at), w * (at - xa));
    0.0 + ys[i - 1] * h0 + ys[i] * h1
}

/// Mean and population standard deviation (ddof = 0), as `np.mean` / `np.std`.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Sorted distances of one set of pairs, split by label, for counting `d < t` by binary search.
/// NaN distances are stored as +inf: both are never `< t`, as `np.less` says for NaN.
#[derive(Debug, Clone, Default)]
struct Counts {
    pos: Vec<f64>,
    neg: Vec<f64>,
}

impl Counts {
    fn new(pairs: impl Iterator<Item = (f64, bool)>) -> Self {
        let mut c = Self::default();
        for (d, same) in pairs {
            let d = if d.is_nan() { f64::INFINITY } else { d };
            if same { &mut c.pos } else { &mut c.neg }.push(d);
        }
        c.pos.sort_by(f64::total_cmp);
        c.neg.sort_by(f64::total_cmp);
        c
    }

    /// (true accepts, false accepts) at threshold `t`: pairs with `d < t`.
    fn accepts(&self, t: f64) -> (usize, usize) {
        let below = |v: &[f64]| v.partition_point(|&d| d < t);
        (below(&self.pos), below(&self.neg))
    }
}

/// Counts of a fold's train or test side; the train side of a k-fold split is "all minus test".
#[derive(Clone, Copy)]
struct Side<'a> {
    plus: &'a Counts,
    minus: Option<&'a Counts>,
}

impl Side<'_> {
    fn num(&self) -> (usize, usize) {
        let m = self.minus.map_or((0, 0), |c| (c.pos.len(), c.neg.len()));
        (self.plus.pos.len() - m.0, self.plus.neg.len() - m.1)
    }

    fn len(&self) -> usize {
        let (p, n) = self.num();
        p + n
    }

    fn accepts(&self, t: f64) -> (usize, usize) {
        let (tp, fp) = self.plus.accepts(t);
        let m = self.minus.map_or((0, 0), |c| c.accepts(t));
        (tp - m.0, fp - m.1)
    }

    /// Correct predictions at `t`: true accepts plus true rejects.
    fn correct(&self, t: f64) -> usize {
        let (tp, fp) = self.accepts(t);
        tp + self.num().1 - fp
    }

    /// (VAL, FAR) at `t`; a rate over an empty class is 0 (insightface divides by zero).
    fn val_far(&self, t: f64) -> (f64, f64) {
        let ((tp, fp), (np, nn)) = (self.accepts(t), self.num());
        let rate = |a: usize, n: usize| if n == 0 { 0.0 } else { a as f64 / n as f64 };
        (rate(tp, np), rate(fp, nn))
    }
}

/// All pairs and each contiguous test fold, pre-sorted.
struct Splits {
    all: Counts,
    folds: Vec<Counts>,
}

impl Splits {
    fn new(dist: &[f64], issame: &[bool], folds: usize) -> Self {
        let pairs = |r: Range<usize>| {
            dist[r.clone()]
                .iter()
                .copied()
                .zip(issame[r].iter().copied())
        };
        Self {
            all: Counts::new(pairs(0..dist.len())),
            folds: kfold(dist.len(), folds)
                .into_iter()
                .map(|r| Counts::new(pairs(r)))
                .collect(),
        }
    }

    /// (train, test) per fold; one fold trains and tests on everything (insightface `LFold`).
    fn iter(&self) -> impl Iterator<Item = (Side<'_>, Side<'_>)> {
        let single = self.folds.len() == 1;
        self.folds.iter().map(move |f| {
            let train = Side {
                plus: &self.all,
                minus: (!single).then_some(f),
            };
            (
                train,
                Side {
                    plus: f,
                    minus: None,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_have_numpy_lengths_and_fill_rule() {
        let acc = arange(0.0, 4.0, 0.01);
        let val = arange(0.0, 4.0, 0.001);
        assert_eq!((acc.len(), val.len()), (400, 4000));
        assert_eq!(acc[0], 0.0);
        assert_eq!(acc[399], 399.0 * 0.01);
        assert!((acc[123] - 1.23).abs() < 1e-12);
    }

    #[test]
    fn kfold_first_folds_get_the_extra_item() {
        let f = kfold(457, 10);
        assert_eq!(
            f.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [46, 46, 46, 46, 46, 46, 46, 45, 45, 45]
        );
        assert_eq!((f[0].start, f[9].end), (0, 457));
        assert!(f.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    #[should_panic(expected = "folds")]
    fn kfold_rejects_more_folds_than_items() {
        kfold(3, 10);
    }

    #[test]
    fn interp_uses_last_point_not_above_target() {
        let x = [0.0, 0.0, 0.5, 1.0, 1.0];
        let y = [0.0, 1.0, 2.0, 3.0, 4.0];
        // Last x <= 0.25 is index 1 (x=0, y=1), next is (0.5, 2): 1.5.
        assert_eq!(interp1d_slinear(&x, &y, 0.25), 1.5);
        assert_eq!(interp1d_slinear(&x, &y, 0.0), 1.0);
        assert_eq!(interp1d_slinear(&x, &y, 0.75), 2.5);
        // scipy's degenerate last interval.
        assert_eq!(interp1d_slinear(&x, &y, 1.0), 0.0);
        // Unsorted input is sorted stably first.
        assert_eq!(interp1d_slinear(&[1.0, 0.0], &[10.0, 0.0], 0.5), 5.0);
    }

    #[test]
    fn mean_std_is_population() {
        let (m, s) = mean_std(&[1.0, 0.5]);
        assert_eq!((m, s), (0.75, 0.25));
    }
}
