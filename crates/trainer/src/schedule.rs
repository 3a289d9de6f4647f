//! Learning-rate schedules, evaluated per optimiser step (arcface_torch steps its polynomial
//! schedule every iteration).

use crate::config::ScheduleConfig;

/// A schedule over `total_steps` optimiser steps with `steps_per_epoch` steps an epoch.
#[derive(Debug, Clone)]
pub struct Schedule {
    cfg: ScheduleConfig,
    base_lr: f64,
    total_steps: usize,
    steps_per_epoch: usize,
}

impl Schedule {
    /// Build a schedule.
    pub fn new(
        cfg: ScheduleConfig,
        base_lr: f64,
        total_steps: usize,
        steps_per_epoch: usize,
    ) -> Self {
        Schedule {
            cfg,
            base_lr,
            total_steps: total_steps.max(1),
            steps_per_epoch: steps_per_epoch.max(1),
        }
    }

    /// The lr for (0-based) step `step`. Warm-up is linear: `base * (step + 1) / warmup`.
    pub fn lr(&self, step: usize) -> f64 {
        let warmup = match &self.cfg {
            ScheduleConfig::Poly { warmup_steps, .. }
            | ScheduleConfig::Cosine { warmup_steps, .. }
            | ScheduleConfig::Multistep { warmup_steps, .. } => *warmup_steps,
        };
        if step < warmup {
            return self.base_lr * (step + 1) as f64 / warmup as f64;
        }
        let span = self.total_steps.saturating_sub(warmup).max(1) as f64;
        let t = ((step - warmup) as f64 / span).min(1.0);
        match &self.cfg {
            ScheduleConfig::Poly { power, .. } => self.base_lr * (1.0 - t).powf(*power),
            ScheduleConfig::Cosine { min_lr_ratio, .. } => {
                let min = self.base_lr * min_lr_ratio;
                min + (self.base_lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            ScheduleConfig::Multistep {
                milestones, gamma, ..
            } => {
                let epoch = step / self.steps_per_epoch;
                let drops = milestones.iter().filter(|&&m| epoch >= m).count();
                self.base_lr * gamma.powi(drops as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_with_warmup() {
        let s = Schedule::new(
            ScheduleConfig::Poly {
                warmup_steps: 10,
                power: 1.0,
            },
            0.1,
            110,
            10,
        );
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
    }

    #[test]
    fn cosine_and_multistep() {
        let c = Schedule::new(
            ScheduleConfig::Cosine {
                warmup_steps: 0,
                min_lr_ratio: 0.0,
            },
            1.0,
            100,
            10,
        );
        assert!((c.lr(0) - 1.0).abs() < 1e-12);
        assert!((c.lr(50) - 0.5).abs() < 1e-12);
        let m = Schedule::new(
            ScheduleConfig::Multistep {
                warmup_steps: 0,
                milestones: vec![2, 4],
                gamma: 0.1,
            },
            1.0,
            60,
            10,
        );
        assert_eq!(m.lr(19), 1.0);
        assert!((m.lr(20) - 0.1).abs() < 1e-12);
        assert!((m.lr(45) - 0.01).abs() < 1e-12);
    }
}
