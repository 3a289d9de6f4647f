//! Clustering metrics against ground-truth identities: pairwise precision / recall / F, BCubed
//! precision / recall / F, and normalised mutual information.
//!
//! All are computed from the contingency table `n_ij` = number of items of class `i` in cluster
//! `j`, with class sizes `a_i = Σ_j n_ij`, cluster sizes `b_j = Σ_i n_ij`, `N = Σ n_ij`:
//!
//! - pairwise (item pairs put together): `TP = Σ C(n_ij, 2)`, `P = TP / Σ_j C(b_j, 2)`,
//!   `R = TP / Σ_i C(a_i, 2)`, `F = 2PR/(P+R)`;
//! - BCubed (Bagga & Baldwin 1998; Amigó et al., Information Retrieval 12, 2009): per item, the
//!   fraction of its cluster that shares its class (precision) and of its class that shares its
//!   cluster (recall), averaged over items: `P = (1/N) Σ n_ij²/b_j`, `R = (1/N) Σ n_ij²/a_i`;
//! - NMI (Strehl & Ghosh 2002): `I(U;V) / ((H(U) + H(V))/2)`, natural logs; the arithmetic-mean
//!   normalisation (scikit-learn's default). [`ClusterMetrics::nmi_sqrt`] gives the geometric one.
//!
//! Conventions for degenerate inputs (documented, tested): a ratio `0/0` is 1 (no predicted pairs:
//! nothing was merged wrongly; no true pairs: nothing could be missed); `F` is 0 when `P + R = 0`;
//! NMI is 1 when both labelings have a single cluster (both entropies 0), and 0 when exactly one
//! has.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use serde::Serialize;

/// Every metric of one clustering against the truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClusterMetrics {
    /// Items.
    pub n: usize,
    /// Distinct predicted clusters.
    pub num_clusters: usize,
    /// Distinct true classes.
    pub num_classes: usize,
    pub pairwise_precision: f64,
    pub pairwise_recall: f64,
    pub pairwise_f: f64,
    pub bcubed_precision: f64,
    pub bcubed_recall: f64,
    pub bcubed_f: f64,
    /// NMI with the arithmetic-mean normalisation.
    pub nmi: f64,
    /// NMI with the geometric-mean normalisation `I / sqrt(H(U)·H(V))`.
    pub nmi_sqrt: f64,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        1.0
    } else {
        num / den
    }
}

fn f_score(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

fn pairs(x: u64) -> f64 {
    (x as f64) * (x as f64 - 1.0) / 2.0
}

fn entropy(sizes: &HashMap<i64, u64>, n: f64) -> f64 {
    sizes
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

/// Scores the predicted clusters `pred` against the true classes `truth` (any integer labels).
///
/// Errors if the lengths differ or the lists are empty.
pub fn evaluate(pred: &[i64], truth: &[i64]) -> Result<ClusterMetrics> {
    ensure!(
        pred.len() == truth.len(),
        "clustering metrics: {} predicted labels for {} true labels",
        pred.len(),
        truth.len()
    );
    ensure!(!pred.is_empty(), "clustering metrics: no items");
    let n = pred.len();
    let mut table: HashMap<(i64, i64), u64> = HashMap::new();
    let mut a: HashMap<i64, u64> = HashMap::new();
    let mut b: HashMap<i64, u64> = HashMap::new();
    for (&p, &t) in pred.iter().zip(truth) {
        *table.entry((t, p)).or_default() += 1;
        *a.entry(t).or_default() += 1;
        *b.entry(p).or_default() += 1;
    }
    let nf = n as f64;
    let tp: f64 = table.values().map(|&x| pairs(x)).sum();
    let pred_pairs: f64 = b.values().map(|&x| pairs(x)).sum();
    let true_pairs: f64 = a.values().map(|&x| pairs(x)).sum();
    let pairwise_precision = ratio(tp, pred_pairs);
    let pairwise_recall = ratio(tp, true_pairs);
    let (mut bp, mut br, mut mi) = (0.0, 0.0, 0.0);
    for (&(t, p), &x) in &table {
        let (x, at, bp_) = (x as f64, a[&t] as f64, b[&p] as f64);
        bp += x * x / bp_;
        br += x * x / at;
        mi += (x / nf) * (nf * x / (at * bp_)).ln();
    }
    let (bcubed_precision, bcubed_recall) = (bp / nf, br / nf);
    let (hu, hv) = (entropy(&a, nf), entropy(&b, nf));
    let mi = mi.max(0.0);
    let (nmi, nmi_sqrt) = if hu == 0.0 && hv == 0.0 {
        (1.0, 1.0)
    } else if hu == 0.0 || hv == 0.0 {
        (0.0, 0.0)
    } else {
        (mi / ((hu + hv) / 2.0), mi / (hu * hv).sqrt())
    };
    Ok(ClusterMetrics {
        n,
        num_clusters: b.len(),
        num_classes: a.len(),
        pairwise_precision,
        pairwise_recall,
        pairwise_f: f_score(pairwise_precision, pairwise_recall),
        bcubed_precision,
        bcubed_recall,
        bcubed_f: f_score(bcubed_precision, bcubed_recall),
        nmi: nmi.min(1.0),
        nmi_sqrt: nmi_sqrt.min(1.0),
    })
}

impl std::fmt::Display for ClusterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} items, {} clusters, {} classes | pairwise P {:.4} R {:.4} F {:.4} | \
             BCubed P {:.4} R {:.4} F {:.4} | NMI {:.4}",
            self.n,
            self.num_clusters,
            self.num_classes,
            self.pairwise_precision,
            self.pairwise_recall,
            self.pairwise_f,
            self.bcubed_precision,
            self.bcubed_recall,
            self.bcubed_f,
            self.nmi
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// truth  = [0 0 0 1 1 2], pred = [0 0 1 1 1 2]; contingency (class, cluster):
    /// (0,0)=2 (0,1)=1 (1,1)=2 (2,2)=1; a = (3,2,1), b = (2,3,1).
    /// Pairwise: TP = 1 + 0 + 1 + 0 = 2; predicted pairs 1 + 3 + 0 = 4; true pairs 3 + 1 + 0 = 4:
    /// P = R = F = 1/2. BCubed P = (4/2 + 1/3 + 4/3 + 1/1)/6 = (14/3)/6 = 7/9;
    /// R = (4/3 + 1/3 + 4/2 + 1/1)/6 = (14/3)/6 = 7/9.
    #[test]
    fn hand_computed_case() {
        let m = evaluate(&[0, 0, 1, 1, 1, 2], &[0, 0, 0, 1, 1, 2]).unwrap();
        close(m.pairwise_precision, 0.5);
        close(m.pairwise_recall, 0.5);
        close(m.pairwise_f, 0.5);
        close(m.bcubed_precision, 7.0 / 9.0);
        close(m.bcubed_recall, 7.0 / 9.0);
        close(m.bcubed_f, 7.0 / 9.0);
        // H(U) = H(V) = -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6);
        // I = 2/6 ln(6·2/6) + 1/6 ln(6·1/9) + 2/6 ln(6·2/6) + 1/6 ln(6·1/1).
        let h = -(0.5f64 * 0.5f64.ln()
            + (1.0 / 3.0) * (1.0f64 / 3.0).ln()
            + (1.0 / 6.0) * (1.0f64 / 6.0).ln());
        let i = (2.0 / 6.0) * 2.0f64.ln()
            + (1.0 / 6.0) * (6.0f64 / 9.0).ln()
            + (2.0 / 6.0) * 2.0f64.ln()
            + (1.0 / 6.0) * 6.0f64.ln();
        close(m.nmi, i / h);
        close(m.nmi_sqrt, i / h);
    }

    #[test]
    fn perfect_and_label_permutation_invariant() {
        let m = evaluate(&[7, 7, 3, 3, 9], &[0, 0, 1, 1, 2]).unwrap();
        for v in [m.pairwise_f, m.bcubed_f, m.nmi] {
            close(v, 1.0);
        }
    }

    #[test]
    fn degenerate_cases() {
        // All singletons: no predicted pair (P = 1 by convention), recall 0, F 0; BCubed P = 1,
        // R = (1/2 + 1/2 + 1/2 + 1/2)/4 = 1/2.
        let m = evaluate(&[0, 1, 2, 3], &[0, 0, 1, 1]).unwrap();
        close(m.pairwise_precision, 1.0);
        close(m.pairwise_recall, 0.0);
        close(m.pairwise_f, 0.0);
        close(m.bcubed_precision, 1.0);
        close(m.bcubed_recall, 0.5);
        // One cluster for two classes: P = 2/6, R = 1; NMI = 0 (one entropy is 0).
        let m = evaluate(&[0, 0, 0, 0], &[0, 0, 1, 1]).unwrap();
        close(m.pairwise_precision, 2.0 / 6.0);
        close(m.pairwise_recall, 1.0);
        close(m.nmi, 0.0);
        // Both single: NMI 1.
        close(evaluate(&[4, 4], &[1, 1]).unwrap().nmi, 1.0);
        assert!(evaluate(&[0], &[0, 1]).is_err());
        assert!(evaluate(&[], &[]).is_err());
    }
}
