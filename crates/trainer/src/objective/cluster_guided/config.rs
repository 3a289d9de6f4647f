//! The `[cluster_guided]` table: the trainer's schedule of refreshes plus the pieces of both
//! crates it composes (clustering: `clustering`, `hardness`, `scc`, `align`; loss-heads: `margin`,
//! the cluster-guided ArcFace head). Every choice is explained in docs/cluster-guided.md.
//!
//! ```toml
//! [cluster_guided]
//! refresh_every_epochs = 1
//! [cluster_guided.margin]   # facerec_loss_heads::ClusterMarginConfig
//! s = 32.0                  # must equal head.s (the head IS the cluster-guided ArcFace)
//! ```

use anyhow::{bail, Result};
use facerec_clustering::cluster_guided::{AlignConfig, ClassClustering, Hardness, SccConfig};
use facerec_loss_heads::{ClusterMarginConfig, HeadConfig};
use serde::{Deserialize, Serialize};

use crate::config::at_key;

/// The `[cluster_guided]` table of a training config. Every field has a documented default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterGuidedConfig {
    /// Refresh (embed, cluster, update margins and centres) at the end of every this many epochs
    /// (the first after epoch `R − 1`). Before the first refresh the head is plain ArcFace with
    /// `m0` and the centre losses are 0. Default 1.
    #[serde(default = "one")]
    pub refresh_every_epochs: usize,
    /// Images per identity embedded at a refresh (class-stratified subset); 0 = all. Default 0.
    #[serde(default)]
    pub samples_per_class: usize,
    /// Seed of the stratified subset (mixed with the epoch). Default 0.
    #[serde(default)]
    pub subset_seed: u64,
    /// How each identity's embeddings are clustered. Default `threshold`, τ = 0.5.
    #[serde(default)]
    pub clustering: ClassClustering,
    /// Hardness formula. Default `knn_purity`, k = 5.
    #[serde(default)]
    pub hardness: Hardness,
    /// The cluster-guided margin head (loss-heads).
    #[serde(default)]
    pub margin: ClusterMarginConfig,
    /// The supervised contrastive clustering loss.
    #[serde(default)]
    pub scc: SccConfig,
    /// Cluster aligning.
    #[serde(default)]
    pub align: AlignConfig,
}

fn one() -> usize {
    1
}

impl Default for ClusterGuidedConfig {
    fn default() -> Self {
        Self {
            refresh_every_epochs: 1,
            samples_per_class: 0,
            subset_seed: 0,
            clustering: ClassClustering::default(),
            hardness: Hardness::default(),
            margin: ClusterMarginConfig::default(),
            scc: SccConfig::default(),
            align: AlignConfig::default(),
        }
    }
}

impl ClusterGuidedConfig {
    /// Checks every value; errors name the key (``config key `cluster_guided.scc.ema`: ...``).
    pub fn validate(&self) -> Result<()> {
        if self.refresh_every_epochs < 1 {
            bail!("config key `cluster_guided.refresh_every_epochs`: must be >= 1");
        }
        at_key("cluster_guided.clustering", self.clustering.validate())?;
        at_key("cluster_guided.hardness", self.hardness.validate())?;
        at_key("cluster_guided.margin", self.margin.validate())?;
        at_key("cluster_guided.scc", self.scc.validate())?;
        at_key("cluster_guided.align", self.align.validate())
    }

    /// With `[cluster_guided]` the trained head is the cluster-guided ArcFace built from
    /// `cluster_guided.margin`, so `[head]` must be `arcface` and its `s`, `m` and `gradient` must
    /// be the ones the head uses (`margin.s`, `margin.m0`, `margin.gradient`): a differing value
    /// would be silently ignored, so it is an error naming the key.
    pub fn check_head(&self, head: &HeadConfig) -> Result<()> {
        let HeadConfig::Arcface(arc) = head else {
            bail!("config key `head.type`: [cluster_guided] trains its own cluster-guided ArcFace (s, m0 and gradient in `cluster_guided.margin`); set head.type = \"arcface\"");
        };
        let m = &self.margin;
        if arc.s != m.s {
            bail!("config key `head.s`: {} is not what [cluster_guided] trains with: its head takes the scale from `cluster_guided.margin.s` = {}; set both to the same value", arc.s, m.s);
        }
        if arc.m != m.m0 {
            bail!("config key `head.m`: {} is not what [cluster_guided] trains with: its head starts every identity at `cluster_guided.margin.m0` = {}; set both to the same value", arc.m, m.m0);
        }
        if arc.gradient != m.gradient {
            bail!("config key `head.gradient`: {:?} is not what [cluster_guided] trains with: its head uses `cluster_guided.margin.gradient` = {:?}; set both to the same value", arc.gradient, m.gradient);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use facerec_clustering::cluster_guided::{cluster_statistics, AlignMode};
    use facerec_loss_heads::{margins_from_hardness, ArcFaceConfig, ArcFaceGradient, MarginSign};
    use facerec_testkit::randn;
    use tch::Tensor;

    #[test]
    fn config_defaults_and_errors() {
        let cfg: ClusterGuidedConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, ClusterGuidedConfig::default());
        cfg.validate().unwrap();
        let cfg: ClusterGuidedConfig = toml::from_str(
            "refresh_every_epochs = 2\nsamples_per_class = 8\n[clustering]\ntype = \"none\"\n\
             [hardness]\ntype = \"mean_cosine\"\n[margin]\nslope = 0.0\nsign = \"harder_smaller\"\n\
             [scc]\nweight = 0.5\nema = 0.9\n[align]\nmode = \"both\"\nnorm = \"keep\"\n",
        )
        .unwrap();
        assert_eq!(cfg.clustering, ClassClustering::None);
        assert_eq!(cfg.margin.sign, MarginSign::HarderSmaller);
        assert_eq!(cfg.align.mode, AlignMode::Both);
        assert!(cfg.align.uses_loss() && cfg.align.uses_reimprint());
        assert!(toml::from_str::<ClusterGuidedConfig>("refresh = 2").is_err());
        assert!(toml::from_str::<ClusterGuidedConfig>("[margin]\nm = 0.5").is_err());
        let bad = ClusterGuidedConfig {
            margin: ClusterMarginConfig {
                m0: 0.8,
                ..Default::default()
            },
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("cluster_guided.margin"), "{e}");
        let bad = ClusterGuidedConfig {
            scc: SccConfig {
                ema: Some(1.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("config key `cluster_guided.scc.ema`: must be"),
            "{e}"
        );
    }

    #[test]
    fn head_must_agree_with_the_cluster_guided_margin() {
        let cfg = ClusterGuidedConfig::default();
        cfg.check_head(&HeadConfig::Arcface(ArcFaceConfig::default()))
            .unwrap();
        let arc = |s, m, gradient| HeadConfig::Arcface(ArcFaceConfig { s, m, gradient });
        for (head, key) in [
            (
                arc(32.0, 0.5, ArcFaceGradient::Exact),
                "config key `head.s`",
            ),
            (
                arc(64.0, 0.4, ArcFaceGradient::Exact),
                "config key `head.m`",
            ),
            (
                arc(64.0, 0.5, ArcFaceGradient::Detached),
                "config key `head.gradient`",
            ),
            (
                HeadConfig::Cosface(Default::default()),
                "config key `head.type`",
            ),
        ] {
            let e = cfg.check_head(&head).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
        let cfg = ClusterGuidedConfig {
            margin: ClusterMarginConfig {
                s: 32.0,
                ..Default::default()
            },
            ..Default::default()
        };
        cfg.check_head(&arc(32.0, 0.5, ArcFaceGradient::Exact))
            .unwrap();
    }

    /// Identity 0: 10 points around one direction; identity 1: 5 + 5 points around two
    /// opposite-ish directions (hard to cluster); identity 2 unseen.
    fn planted() -> (Tensor, Vec<i64>) {
        let d = 16;
        let a = randn(20, &[1, d]);
        let b1 = randn(21, &[1, d]);
        let b2 = randn(22, &[1, d]);
        let noise = randn(23, &[20, d]) * 0.1;
        let base = Tensor::cat(
            &[a.repeat([10, 1]), b1.repeat([5, 1]), b2.repeat([5, 1])],
            0,
        );
        let labels = [vec![0i64; 10], vec![1i64; 10]].concat();
        (base + noise, labels)
    }

    /// The composition the objective runs at a refresh: clustering's hardness, loss-heads'
    /// margins from it.
    #[test]
    fn split_identity_is_harder_and_gets_the_signed_margin() {
        let (emb, labels) = planted();
        for hardness in [Hardness::DominantFraction, Hardness::MeanCosine] {
            let cfg = ClusterGuidedConfig {
                hardness,
                ..Default::default()
            };
            let s = cluster_statistics(&emb, &labels, 3, cfg.clustering, cfg.hardness);
            assert!(
                s.hardness[1] > s.hardness[0] + 0.1,
                "{hardness:?}: {:?}",
                s.hardness
            );
            assert!(s.hardness[2].is_nan());
            assert_eq!(s.class_sizes, [10, 10, 0]);
            if hardness == Hardness::DominantFraction {
                assert_eq!(s.dominant_sizes, [10, 5, 0]);
            }
            let m = margins_from_hardness(&s.hardness, &cfg.margin);
            assert!(m[1] > 0.5 && m[0] < 0.5 && m[2] == 0.5, "{m:?}");
            let m = margins_from_hardness(
                &s.hardness,
                &ClusterMarginConfig {
                    sign: MarginSign::HarderSmaller,
                    ..Default::default()
                },
            );
            assert!(m[1] < 0.5 && m[0] > 0.5, "{m:?}");
        }
    }

    /// Zero slope: whatever the refresh measured, every margin is `m0`.
    #[test]
    fn zero_slope_margins_are_m0_after_a_refresh() {
        let emb = randn(1, &[40, 8]);
        let labels: Vec<i64> = (0..40).map(|i| i % 5).collect();
        let cfg = ClusterGuidedConfig {
            margin: ClusterMarginConfig {
                slope: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let stats = cluster_statistics(&emb, &labels, 5, cfg.clustering, cfg.hardness);
        let margins = margins_from_hardness(&stats.hardness, &cfg.margin);
        assert!(margins.iter().all(|&m| m == 0.5), "{margins:?}");
    }
}
