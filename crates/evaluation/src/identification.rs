//! 1:N identification (open-set search of a gallery): CMC rank-k identification rates and TPIR at
//! FPIR, the metrics of the IJB-B/C 1:N protocol (Whitelam et al. 2017, Maze et al. 2018) and of NIST
//! FRVT 1:N (Grother et al., NISTIR 8271, 2019), from a probe-by-gallery similarity matrix.
//!
//! Definitions, as implemented (docs/evaluation.md, "1:N identification"):
//! - The gallery holds one entry per identity (labels unique). A probe is *mated* when its identity
//!   is in the gallery, *non-mated* otherwise (the open-set impostors).
//! - Rank of a mated probe: `1 + #{gallery entries scoring strictly higher than its mate}` (ties go
//!   to the mate). CMC at rank k: the fraction of mated probes of rank `<= k`.
//! - FPIR at threshold `t`: the fraction of non-mated probes whose best score is `> t`. For a target
//!   FPIR `f` over `N` non-mated probes, `k = floor(f N)` false alarms are allowed and the threshold is
//!   the `(k + 1)`-th highest non-mated best score (for `k >= N`: minus infinity), so at most `k`
//!   non-mated probes exceed it; the achieved FPIR is reported beside the target.
//! - TPIR at that threshold: the fraction of mated probes whose mate is at rank 1 *and* scores `> t`
//!   (FNIR = 1 - TPIR).

use std::collections::HashMap;

use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// The CMC ranks reported by default.
pub const CMC_RANKS: [usize; 3] = [1, 5, 10];
/// The FPIR targets reported by default.
pub const FPIR_TARGETS: [f64; 3] = [1e-3, 1e-2, 1e-1];

/// One CMC point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CmcPoint {
    pub rank: usize,
    /// Fraction of mated probes whose mate is within `rank`.
    pub rate: f64,
}

/// TPIR at one FPIR target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TpirAtFpir {
    /// The target FPIR.
    pub fpir: f64,
    /// The FPIR actually reached at `threshold` (at most the target).
    pub achieved_fpir: f64,
    /// Scores `> threshold` are accepted (`-inf`: all).
    pub threshold: f64,
    pub tpir: f64,
}

/// What a 1:N search measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentificationReport {
    /// Gallery entries (identities).
    pub gallery: usize,
    pub probes: usize,
    pub mated: usize,
    pub non_mated: usize,
    /// Empty when no probe is mated.
    pub cmc: Vec<CmcPoint>,
    /// Empty when no probe is non-mated (a closed-set search).
    pub tpir_at_fpir: Vec<TpirAtFpir>,
}

impl IdentificationReport {
    /// One line per metric, for the text report.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "gallery {} identities, {} probes ({} mated, {} non-mated)\n",
            self.gallery, self.probes, self.mated, self.non_mated
        );
        for c in &self.cmc {
            s.push_str(&format!("  CMC rank-{:<3} {:.5}\n", c.rank, c.rate));
        }
        for t in &self.tpir_at_fpir {
            s.push_str(&format!(
                "  TPIR@FPIR={:.0e} {:.5} (threshold {:.4}, achieved FPIR {:.2e})\n",
                t.fpir, t.tpir, t.threshold, t.achieved_fpir
            ));
        }
        s
    }
}

/// One template per identity: the mean of the L2-normalised rows of each label, L2-normalised, in
/// order of first appearance. Returns the labels and `[L, D]` templates.
///
/// # Shapes
/// `emb`: `[N, D]`; returns `[L, D]` Float on the CPU.
///
/// # Panics
/// If `labels.len()` differs from the row count.
pub fn identity_templates<L: Clone + Eq + std::hash::Hash>(
    emb: &Tensor,
    labels: &[L],
) -> (Vec<L>, Tensor) {
    assert_eq!(emb.size()[0] as usize, labels.len(), "one label per row");
    let e = crate::embed::l2_normalize(&emb.to_kind(Kind::Double).to_device(Device::Cpu));
    let mut order: Vec<L> = Vec::new();
    let mut rows: HashMap<L, Vec<i64>> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        rows.entry(l.clone())
            .or_insert_with(|| {
                order.push(l.clone());
                Vec::new()
            })
            .push(i as i64);
    }
    let t: Vec<Tensor> = order
        .iter()
        .map(|l| {
            e.index_select(0, &Tensor::from_slice(&rows[l]))
                .mean_dim(0, false, Kind::Double)
        })
        .collect();
    let t = crate::embed::l2_normalize(&Tensor::stack(&t, 0)).to_kind(Kind::Float);
    (order, t)
}

/// Cosine similarity of every probe with every gallery entry (rows are L2-normalised here).
///
/// # Shapes
/// `probes`: `[P, D]`, `gallery`: `[G, D]`; returns `[P, G]` Double on the CPU.
pub fn similarity(probes: &Tensor, gallery: &Tensor) -> Tensor {
    let p = crate::embed::l2_normalize(&probes.to_kind(Kind::Double).to_device(Device::Cpu));
    let g = crate::embed::l2_normalize(&gallery.to_kind(Kind::Double).to_device(Device::Cpu));
    p.matmul(&g.transpose(0, 1))
}

/// CMC at `ranks` and TPIR at `fpirs` (see the module docs) from `scores` `[P, G]` (higher = more
/// alike). Errors: gallery labels that repeat, a score matrix of another shape, a non-finite score,
/// no probes.
///
/// # Shapes
/// `scores`: `[P, G]` with `P = probe_labels.len()`, `G = gallery_labels.len()`.
pub fn identify<L: Eq + std::hash::Hash + std::fmt::Debug>(
    scores: &Tensor,
    gallery_labels: &[L],
    probe_labels: &[L],
    ranks: &[usize],
    fpirs: &[f64],
) -> Result<IdentificationReport> {
    let (p, g) = (probe_labels.len(), gallery_labels.len());
    ensure!(p > 0, "no probes");
    ensure!(g > 0, "an empty gallery");
    ensure!(
        scores.size() == [p as i64, g as i64],
        "score matrix {:?}, expected [{p}, {g}] (probes x gallery)",
        scores.size()
    );
    let mut index = HashMap::with_capacity(g);
    for (j, l) in gallery_labels.iter().enumerate() {
        ensure!(
            index.insert(l, j).is_none(),
            "gallery identity {l:?} appears twice: one gallery entry per identity"
        );
    }
    let s = scores.to_kind(Kind::Double).to_device(Device::Cpu);
    // (rank, mate score) of mated probes; best score of non-mated ones.
    let (mut mated, mut non_mated) = (Vec::new(), Vec::new());
    const CHUNK: usize = 1024;
    for lo in (0..p).step_by(CHUNK) {
        let n = CHUNK.min(p - lo);
        let rows = Vec::<f64>::try_from(s.narrow(0, lo as i64, n as i64).flatten(0, -1))?;
        for (r, row) in rows.chunks(g).enumerate() {
            ensure!(
                row.iter().all(|x| x.is_finite()),
                "probe {}: a non-finite score",
                lo + r
            );
            match index.get(&probe_labels[lo + r]) {
                Some(&m) => {
                    let mate = row[m];
                    let rank = 1 + row.iter().filter(|&&x| x > mate).count();
                    mated.push((rank, mate));
                }
                None => non_mated.push(row.iter().cloned().fold(f64::NEG_INFINITY, f64::max)),
            }
        }
    }
    let cmc = if mated.is_empty() {
        Vec::new()
    } else {
        ranks
            .iter()
            .map(|&k| CmcPoint {
                rank: k,
                rate: mated.iter().filter(|m| m.0 <= k).count() as f64 / mated.len() as f64,
            })
            .collect()
    };
    let tpir_at_fpir = if non_mated.is_empty() || mated.is_empty() {
        Vec::new()
    } else {
        let mut best = non_mated.clone();
        best.sort_by(|a, b| b.total_cmp(a));
        let nn = best.len();
        fpirs
            .iter()
            .map(|&f| {
                let k = (f * nn as f64).floor() as usize;
                let threshold = if k >= nn { f64::NEG_INFINITY } else { best[k] };
                let alarms = best.iter().filter(|&&x| x > threshold).count();
                let hits = mated
                    .iter()
                    .filter(|&&(rank, s)| rank == 1 && s > threshold)
                    .count();
                TpirAtFpir {
                    fpir: f,
                    achieved_fpir: alarms as f64 / nn as f64,
                    threshold,
                    tpir: hits as f64 / mated.len() as f64,
                }
            })
            .collect()
    };
    Ok(IdentificationReport {
        gallery: g,
        probes: p,
        mated: mated.len(),
        non_mated: non_mated.len(),
        cmc,
        tpir_at_fpir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A case worked out by hand: 3 gallery identities (A, B, C); mated probes of rank 1, 1, 2, 3;
    /// 10 non-mated probes whose best scores are 0.10, 0.20, ..., 1.00.
    #[test]
    fn hand_computed_case() {
        let gallery = ["A", "B", "C"];
        let mut labels = vec!["A", "B", "A", "C"];
        let mut rows = vec![
            [0.9, 0.1, 0.2], // A, rank 1, mate 0.9
            [0.3, 0.8, 0.1], // B, rank 1, mate 0.8
            [0.5, 0.6, 0.0], // A, rank 2
            [0.7, 0.4, 0.3], // C, rank 3
        ];
        for k in 1..=10 {
            labels.push("X");
            rows.push([0.0, k as f64 / 10.0, -0.5]);
        }
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        let s = Tensor::from_slice(&flat).view([14, 3]);
        let r = identify(&s, &gallery, &labels, &[1, 2, 5], &[0.1, 0.25, 0.05, 1.0]).unwrap();
        assert_eq!((r.mated, r.non_mated, r.gallery), (4, 10, 3));
        let cmc: Vec<f64> = r.cmc.iter().map(|c| c.rate).collect();
        assert_eq!(cmc, [0.5, 0.75, 1.0]);
        // FPIR 0.1: 1 false alarm allowed, threshold = 2nd best non-mate = 0.9; only the A probe
        // (0.9) is not above it, the B probe (0.8) neither: TPIR 0.
        // FPIR 0.25: 2 allowed, threshold 0.8: mate scores above it: 0.9 -> TPIR 1/4.
        // FPIR 0.05: none allowed, threshold 1.0: TPIR 0. FPIR 1: all accepted: TPIR 2/4.
        let t: Vec<(f64, f64, f64)> = r
            .tpir_at_fpir
            .iter()
            .map(|t| (t.threshold, t.achieved_fpir, t.tpir))
            .collect();
        assert_eq!(
            t,
            [
                (0.9, 0.1, 0.0),
                (0.8, 0.2, 0.25),
                (1.0, 0.0, 0.0),
                (f64::NEG_INFINITY, 1.0, 0.5)
            ]
        );
        assert!(identify(&s, &["A", "A", "C"], &labels, &[1], &[0.1]).is_err());
        assert!(identify(&s.narrow(0, 0, 3), &gallery, &labels, &[1], &[0.1]).is_err());
    }

    #[test]
    fn templates_are_normalised_means_in_first_seen_order() {
        let e = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 2.0, 0.0, 5.0]).view([3, 2]);
        let (labels, t) = identity_templates(&e, &[7, 3, 7]);
        assert_eq!(labels, [7, 3]);
        let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        for (a, b) in v.iter().zip([h, h, 0.0, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }
}
