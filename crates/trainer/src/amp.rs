//! Mixed precision: the dynamic loss scaler (PyTorch's `torch.cuda.amp.GradScaler` rule, which tch
//! does not have) and the autocast switch, in fp16 or bf16 (the dtype is set through libtorch's
//! `at::autocast::set_autocast_dtype`, which tch does not wrap).
//!
//! The loss is multiplied by `scale` before backward; the gradients are divided by it before
//! clipping and the optimiser step. A non-finite gradient skips the step and multiplies the scale by
//! `backoff_factor`; `growth_interval` finite steps in a row multiply it by `growth_factor`. The
//! scale never drops below `min_scale`: reaching it is reported, which is how the "grad scale
//! collapsed to zero" failure of fp16 runs shows up here (see the NaN guard in `run.rs`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Which reduced precision the trunk and logits run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32 (default; the only choice on CPU).
    #[default]
    Off,
    /// CUDA fp16 autocast for the backbone and the classifier matmul, with the dynamic loss scaler.
    Fp16,
    /// CUDA bf16 autocast (same ops as fp16; bf16 has fp32's exponent range, so no loss scaling).
    Bf16,
}

impl Precision {
    /// Whether autocast runs at all.
    pub fn is_reduced(self) -> bool {
        self != Precision::Off
    }

    /// The CUDA autocast dtype: `None` when off, else `Half` or `BFloat16`.
    pub fn autocast_kind(self) -> Option<tch::Kind> {
        match self {
            Precision::Off => None,
            Precision::Fp16 => Some(tch::Kind::Half),
            Precision::Bf16 => Some(tch::Kind::BFloat16),
        }
    }
}

/// Loss-scaler settings (`[train.scaler]`), PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerConfig {
    /// Initial scale. Default 65536 (2^16).
    #[serde(default = "default_init")]
    pub init_scale: f64,
    /// Growth factor after `growth_interval` finite steps. Default 2.
    #[serde(default = "default_growth")]
    pub growth_factor: f64,
    /// Back-off factor on a non-finite gradient. Default 0.5.
    #[serde(default = "default_backoff")]
    pub backoff_factor: f64,
    /// Finite steps in a row before growing. Default 2000.
    #[serde(default = "default_interval")]
    pub growth_interval: u64,
    /// Lower bound of the scale. Default 1 (below it fp16 gradients underflow anyway).
    #[serde(default = "default_min")]
    pub min_scale: f64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            init_scale: default_init(),
            growth_factor: default_growth(),
            backoff_factor: default_backoff(),
            growth_interval: default_interval(),
            min_scale: default_min(),
        }
    }
}
fn default_init() -> f64 {
    65536.0
}
fn default_growth() -> f64 {
    2.0
}
fn default_backoff() -> f64 {
    0.5
}
fn default_interval() -> u64 {
    2000
}
fn default_min() -> f64 {
    1.0
}

/// What the scaler keeps between steps (saved in checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// Current scale.
    pub scale: f64,
    /// Finite steps since the last growth or back-off.
    pub growth_tracker: u64,
}

/// The dynamic loss scaler. Disabled, it is the identity (scale 1, never skips on its own).
#[derive(Debug, Clone)]
pub struct GradScaler {
    cfg: ScalerConfig,
    enabled: bool,
    state: ScalerState,
}

impl GradScaler {
    /// A scaler; `enabled = false` gives the identity.
    pub fn new(cfg: ScalerConfig, enabled: bool) -> Self {
        let scale = if enabled { cfg.init_scale } else { 1.0 };
        GradScaler {
            cfg,
            enabled,
            state: ScalerState {
                scale,
                growth_tracker: 0,
            },
        }
    }

    /// Whether scaling is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale (1 when disabled).
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// The state to checkpoint.
    pub fn state(&self) -> ScalerState {
        self.state
    }

    /// Restore a checkpointed state.
    pub fn load_state(&mut self, state: ScalerState) {
        if self.enabled {
            self.state = state;
        }
    }

    /// `loss * scale`.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        if self.enabled {
            loss * self.state.scale
        } else {
            loss.shallow_clone()
        }
    }

    /// Divide every gradient of `params` by the scale, in place. Call before clipping.
    pub fn unscale<'a>(&self, params: impl IntoIterator<Item = &'a Tensor>) {
        if !self.enabled {
            return;
        }
        let _guard = tch::no_grad_guard();
        let inv = 1.0 / self.state.scale;
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(inv);
            }
        }
    }

    /// Update after a step: `finite = false` backs off, otherwise count towards growth. Returns
    /// true when the scale has reached `min_scale` (fp16 cannot train further).
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.enabled {
            return false;
        }
        if finite {
            self.state.growth_tracker += 1;
            if self.state.growth_tracker >= self.cfg.growth_interval {
                self.state.scale *= self.cfg.growth_factor;
                self.state.growth_tracker = 0;
            }
            false
        } else {
            self.state.scale = (self.state.scale * self.cfg.backoff_factor).max(self.cfg.min_scale);
            self.state.growth_tracker = 0;
            self.state.scale <= self.cfg.min_scale
        }
    }
}

/// Run `f` under CUDA autocast in the precision's dtype (fp16 or bf16), or plainly when off.
pub fn autocast<T>(precision: Precision, f: impl FnOnce() -> T) -> T {
    facerec_backbone::autocast::with_cuda_autocast(precision.autocast_kind(), f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn backs_off_grows_and_reports_collapse() {
        let cfg = ScalerConfig {
            init_scale: 8.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 3,
            min_scale: 1.0,
        };
        let mut s = GradScaler::new(cfg, true);
        assert!(!s.update(false));
        assert_eq!(s.scale(), 4.0);
        for _ in 0..2 {
            s.update(true);
        }
        assert_eq!(s.scale(), 4.0, "grows only after 3 finite steps in a row");
        s.update(true);
        assert_eq!(s.scale(), 8.0);
        assert!(!s.update(false));
        assert!(!s.update(false));
        assert!(s.update(false), "scale 1 = collapse");
        assert_eq!(s.scale(), 1.0);
    }

    #[test]
    fn scaled_gradients_unscale_to_the_true_gradient() {
        let w = Tensor::from_slice(&[1.5f32, -2.0]).set_requires_grad(true);
        let s = GradScaler::new(ScalerConfig::default(), true);
        s.scale_loss(&(&w * &w).sum(Kind::Float)).backward();
        s.unscale(&[w.shallow_clone()]);
        let g: Vec<f32> = Vec::try_from(&w.grad()).unwrap();
        assert_eq!(g, vec![3.0, -4.0]);
    }

    #[test]
    fn disabled_is_identity() {
        let mut s = GradScaler::new(ScalerConfig::default(), false);
        assert_eq!(s.scale(), 1.0);
        assert!(!s.update(false));
        assert_eq!(s.scale(), 1.0);
    }
}
