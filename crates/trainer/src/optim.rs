//! Optimisers written with tensor ops over our own variable list, so their state can be saved and
//! loaded (exact resume), parameter groups can differ in weight decay, and Partial FC can freeze the
//! unsampled rows. tch's `nn::Sgd` / `nn::AdamW` can do none of these.
//!
//! - **SGD** is PyTorch's `torch.optim.SGD` with `dampening = 0`:
//!   `g = grad + wd * w; buf = g` on the first step, else `buf = momentum * buf + g`;
//!   `g = g + momentum * buf` (nesterov) or `g = buf`; `w -= lr * g`.
//! - **AdamW** is PyTorch's `torch.optim.AdamW` (decoupled decay, bias correction, `amsgrad = false`):
//!   `w *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²;
//!   w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, `t` = optimiser steps taken.
//!
//! A row mask (Partial FC) leaves the masked-out rows of a variable, their decay and every state
//! buffer of theirs exactly as they were. AdamW's `t` is the global step count, so a row sampled
//! for the first time at step `t` gets the bias correction of step `t` (the reference optimiser,
//! which sees zero gradients for unsampled rows, does the same).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// One group of variables sharing hyper-parameters.
pub struct ParamGroup {
    /// Variables updated by this group (only those that require grad are touched).
    pub params: Vec<Tensor>,
    /// Weight decay of this group (L2 for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Rows allowed to change in the next step (`[R]`, 1 = update, 0 = leave the row, its state
    /// and its weight decay alone) for variables whose first dimension is `R`: Partial FC's sampled
    /// classes. `None` updates everything.
    pub row_mask: Option<Tensor>,
}

impl ParamGroup {
    /// A group without a row mask.
    pub fn new(params: Vec<Tensor>, weight_decay: f64) -> Self {
        ParamGroup {
            params,
            weight_decay,
            row_mask: None,
        }
    }
}

/// The update rule and its constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// SGD with momentum (0 = plain SGD) and optional Nesterov.
    Sgd {
        /// Momentum.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// AdamW.
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
    },
}

impl Rule {
    /// Names of the per-variable state buffers (PyTorch's names).
    fn slots(&self) -> &'static [&'static str] {
        match self {
            Rule::Sgd { momentum, .. } if *momentum == 0.0 => &[],
            Rule::Sgd { .. } => &["momentum_buffer"],
            Rule::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// An optimiser over parameter groups with savable state.
pub struct Optimizer {
    groups: Vec<ParamGroup>,
    rule: Rule,
    /// `state[group][param][slot]`, created at the first step of each variable.
    state: Vec<Vec<Vec<Option<Tensor>>>>,
    /// Optimiser steps taken.
    steps: u64,
}

impl Optimizer {
    /// Build the optimiser over `groups`.
    pub fn new(groups: Vec<ParamGroup>, rule: Rule) -> Self {
        let n = rule.slots().len();
        let state = groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|_| (0..n).map(|_| None).collect())
                    .collect()
            })
            .collect();
        Optimizer {
            groups,
            rule,
            state,
            steps: 0,
        }
    }

    /// SGD (kept for callers that only want SGD).
    pub fn sgd(groups: Vec<ParamGroup>, momentum: f64, nesterov: bool) -> Self {
        Self::new(groups, Rule::Sgd { momentum, nesterov })
    }

    /// The update rule.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Every variable of every group, in order.
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| &g.params)
    }

    /// Restrict the next steps of group `group` to the rows where `mask` is 1 (see
    /// [`ParamGroup::row_mask`]); `None` lifts the restriction.
    pub fn set_row_mask(&mut self, group: usize, mask: Option<Tensor>) {
        self.groups[group].row_mask = mask;
    }

    /// Zero every gradient.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for p in &mut g.params {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
            }
        }
    }

    /// One update with learning rate `lr`. Variables without a gradient are left untouched, and so
    /// is their state.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        for (group, states) in self.groups.iter_mut().zip(&mut self.state) {
            for (p, slots) in group.params.iter_mut().zip(states.iter_mut()) {
                let grad = p.grad();
                if !p.requires_grad() || !grad.defined() {
                    continue;
                }
                // A row mask shaped for this variable: [R, 1, ...] broadcasting over the rest.
                let mask = group
                    .row_mask
                    .as_ref()
                    .filter(|m| p.dim() > 0 && p.size()[0] == m.size()[0])
                    .map(|m| {
                        let mut shape = vec![m.size()[0]];
                        shape.resize(p.dim(), 1);
                        m.to_kind(p.kind()).view(shape.as_slice())
                    });
                let update = match self.rule {
                    Rule::Sgd { momentum, nesterov } => sgd_update(
                        p,
                        &grad,
                        group.weight_decay,
                        momentum,
                        nesterov,
                        slots,
                        mask.as_ref(),
                    ),
                    Rule::AdamW { beta1, beta2, eps } => adamw_update(
                        p,
                        &grad,
                        lr,
                        group.weight_decay,
                        (beta1, beta2, eps),
                        t,
                        slots,
                        mask.as_ref(),
                    ),
                };
                let update = match &mask {
                    Some(m) => update * m,
                    None => update,
                };
                let _ = p.g_sub_(&(update * lr));
            }
        }
    }

    /// Whether every gradient is finite (the NaN guard checks before stepping).
    ///
    /// One pass over each gradient and one read for all of them: a gradient is finite exactly
    /// when its minimum and maximum are (both reductions propagate NaN, and ±inf is an extreme),
    /// which avoids `isfinite`'s four passes and three temporaries per gradient.
    pub fn grads_finite(&self) -> bool {
        let _guard = tch::no_grad_guard();
        let extremes: Vec<Tensor> = self
            .params()
            .map(|p| p.grad())
            .filter(|g| g.defined() && g.numel() > 0)
            .flat_map(|g| {
                let (lo, hi) = g.aminmax(None::<i64>, false);
                [lo.to_kind(Kind::Float), hi.to_kind(Kind::Float)]
            })
            .collect();
        extremes.is_empty()
            || bool::try_from(Tensor::stack(&extremes, 0).isfinite().all()).unwrap_or(false)
    }

    /// The state as named tensors (`g{group}.p{index}.{slot}` plus `steps`), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("steps".to_string(), Tensor::from(self.steps as i64))];
        let names = self.rule.slots();
        for (gi, states) in self.state.iter().enumerate() {
            for (pi, slots) in states.iter().enumerate() {
                for (slot, name) in slots.iter().zip(names) {
                    if let Some(t) = slot {
                        out.push((format!("g{gi}.p{pi}.{name}"), t.shallow_clone()));
                    }
                }
            }
        }
        out
    }

    /// Restore the state written by [`Optimizer::state_tensors`]. Every buffer must match its
    /// variable's shape; unknown names are an error (the checkpoint belongs to another model or
    /// optimiser).
    pub fn load_state(&mut self, mut named: HashMap<String, Tensor>) -> Result<()> {
        let steps = named
            .remove("steps")
            .context("optimizer state has no `steps` entry")?;
        let names = self.rule.slots();
        for (gi, (group, states)) in self.groups.iter().zip(&mut self.state).enumerate() {
            for (pi, (p, slots)) in group.params.iter().zip(states.iter_mut()).enumerate() {
                for (slot, name) in slots.iter_mut().zip(names) {
                    let key = format!("g{gi}.p{pi}.{name}");
                    *slot = match named.remove(&key) {
                        None => None,
                        Some(t) if t.size() == p.size() => {
                            Some(t.to_kind(p.kind()).to_device(p.device()))
                        }
                        Some(t) => bail!(
                            "optimizer state `{key}` has shape {:?}, the variable has {:?}",
                            t.size(),
                            p.size()
                        ),
                    };
                }
            }
        }
        if let Some(extra) = named.keys().next() {
            bail!(
                "optimizer state has an entry `{extra}` that this optimiser ({:?}) does not have",
                self.rule
            );
        }
        self.steps = i64::try_from(&steps).context("optimizer `steps`")? as u64;
        Ok(())
    }
}

/// SGD: updates the momentum buffer (masked rows keep theirs) and returns the step direction.
fn sgd_update(
    p: &Tensor,
    grad: &Tensor,
    wd: f64,
    momentum: f64,
    nesterov: bool,
    slots: &mut [Option<Tensor>],
    mask: Option<&Tensor>,
) -> Tensor {
    // `d` is only read or replaced below (never changed in place), so without decay it may alias
    // the gradient; the first momentum buffer copies it.
    let mut d = if wd != 0.0 {
        grad + p * wd
    } else {
        grad.shallow_clone()
    };
    if let Some(m) = mask {
        d *= m;
    }
    if momentum == 0.0 {
        return d;
    }
    let buf = &mut slots[0];
    match (buf.as_mut(), mask) {
        // Masked rows keep their buffer: b += m * ((mu - 1) b + d).
        (Some(b), Some(m)) => {
            let delta = (&*b * (momentum - 1.0) + &d) * m;
            let _ = b.g_add_(&delta);
        }
        (Some(b), None) => {
            let _ = b.g_mul_scalar_(momentum).g_add_(&d);
        }
        (None, _) => *buf = Some(d.copy()),
    }
    let b = buf.as_ref().expect("momentum buffer");
    if nesterov {
        d + b * momentum
    } else {
        // The caller only reads the direction (`update * mask`, `update * lr`): no copy needed.
        b.shallow_clone()
    }
}

/// AdamW: decays the weight in place, updates both moments (masked rows keep theirs) and returns
/// the step direction to be multiplied by `lr`.
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    p: &mut Tensor,
    grad: &Tensor,
    lr: f64,
    wd: f64,
    (b1, b2, eps): (f64, f64, f64),
    t: i32,
    slots: &mut [Option<Tensor>],
    mask: Option<&Tensor>,
) -> Tensor {
    if wd != 0.0 {
        let decay = match mask {
            Some(m) => &*p * m * (lr * wd),
            None => &*p * (lr * wd),
        };
        let _ = p.g_sub_(&decay);
    }
    let zeros = || grad.zeros_like();
    let m_old = slots[0].take().unwrap_or_else(zeros);
    let v_old = slots[1].take().unwrap_or_else(zeros);
    let mut m_new = &m_old * b1 + grad * (1.0 - b1);
    let mut v_new = &v_old * b2 + grad * grad * (1.0 - b2);
    if let Some(mask) = mask {
        m_new = &m_old + (m_new - &m_old) * mask;
        v_new = &v_old + (v_new - &v_old) * mask;
    }
    let bc1 = 1.0 - b1.powi(t);
    let bc2 = 1.0 - b2.powi(t);
    let denom = v_new.sqrt() / bc2.sqrt() + eps;
    let dir = &m_new / denom / bc1;
    slots[0] = Some(m_new);
    slots[1] = Some(v_new);
    dir
}

/// Scale the gradients of `params` so their joint L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let sq: Vec<Tensor> = grads.iter().map(|g| g.square().sum(g.kind())).collect();
    let total = f64::try_from(Tensor::stack(&sq, 0).sum(Kind::Double).sqrt()).unwrap_or(f64::NAN);
    if max_norm > 0.0 && total > max_norm {
        let coef = max_norm / (total + 1e-6);
        for mut g in grads {
            let _ = g.g_mul_scalar_(coef);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps by hand against the formula, with and without Nesterov.
    #[test]
    fn matches_pytorch_sgd_formula() {
        for nesterov in [false, true] {
            let w = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
            let mut opt = Optimizer::sgd(
                vec![ParamGroup::new(vec![w.shallow_clone()], 0.1)],
                0.9,
                nesterov,
            );
            let (lr, mu, wd) = (0.5, 0.9, 0.1);
            let mut w_ref = [1.0f64, -2.0];
            let mut buf = [0.0f64; 2];
            for step in 0..3 {
                opt.zero_grad();
                // loss = sum(w^3) -> grad = 3 w^2
                (&w * &w * &w).sum(Kind::Double).backward();
                opt.step(lr);
                for i in 0..2 {
                    let d = 3.0 * w_ref[i] * w_ref[i] + wd * w_ref[i];
                    buf[i] = if step == 0 { d } else { mu * buf[i] + d };
                    let upd = if nesterov { d + mu * buf[i] } else { buf[i] };
                    w_ref[i] -= lr * upd;
                }
                let got: Vec<f64> = Vec::try_from(&w).unwrap();
                for i in 0..2 {
                    assert!(
                        (got[i] - w_ref[i]).abs() <= 1e-12 * w_ref[i].abs().max(1.0),
                        "step {step} nesterov {nesterov}: {got:?} vs {w_ref:?}"
                    );
                }
            }
        }
    }

    /// Partial FC: rows outside the mask keep weight and momentum; sampled rows follow the formula.
    #[test]
    fn row_mask_freezes_unsampled_rows() {
        let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0])
            .view([3, 2])
            .set_requires_grad(true);
        let mut opt = Optimizer::sgd(
            vec![ParamGroup::new(vec![w.shallow_clone()], 0.1)],
            0.9,
            false,
        );
        let loss = |w: &Tensor| (w * w).sum(Kind::Double);
        // Step 1, all rows: buf = 2w + 0.1w = 2.1w, w -= 0.5 * buf.
        opt.zero_grad();
        loss(&w).backward();
        opt.step(0.5);
        let after1: Vec<f64> = Vec::try_from(w.flatten(0, -1)).unwrap();
        // Step 2, only row 1: rows 0 and 2 must not move (no momentum, no decay).
        opt.set_row_mask(0, Some(Tensor::from_slice(&[0.0f64, 1.0, 0.0])));
        opt.zero_grad();
        loss(&w).backward();
        opt.step(0.5);
        let after2: Vec<f64> = Vec::try_from(w.flatten(0, -1)).unwrap();
        for i in [0, 1, 4, 5] {
            assert_eq!(after2[i], after1[i], "unsampled element {i} changed");
        }
        for i in [2, 3] {
            let w0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0][i];
            let buf1 = 2.1 * w0;
            let buf2 = 0.9 * buf1 + 2.1 * after1[i];
            let expect = after1[i] - 0.5 * buf2;
            assert!(
                (after2[i] - expect).abs() < 1e-12,
                "{i}: {} vs {expect}",
                after2[i]
            );
        }
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let w = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&w * &w).sum(Kind::Float).backward(); // grad = (6, 8), norm 10
        let n = clip_grad_norm(&[w.shallow_clone()], 5.0);
        assert!((n - 10.0).abs() < 1e-5);
        let g: Vec<f32> = Vec::try_from(&w.grad()).unwrap();
        let norm = (g[0] * g[0] + g[1] * g[1]).sqrt();
        assert!((norm - 5.0).abs() < 1e-3, "{g:?}");
    }

    #[test]
    fn nonfinite_gradient_is_detected() {
        let w = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        w.sqrt().sum(Kind::Float).backward(); // d sqrt(x)/dx at 0 = inf
        let opt = Optimizer::sgd(
            vec![ParamGroup::new(vec![w.shallow_clone()], 0.0)],
            0.9,
            false,
        );
        assert!(!opt.grads_finite());
    }

    /// NaN, +inf and -inf anywhere in any gradient (here the second of two) are caught; finite
    /// gradients, however large, pass; a variable without a gradient is ignored.
    #[test]
    fn grads_finite_checks_every_element_of_every_gradient() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX] {
            let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
            let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
            let unused = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
            let coef = Tensor::from_slice(&[1.0f32, bad, -4.0]);
            ((&a * 3.0).sum(Kind::Float) + (&b * &coef).sum(Kind::Float)).backward();
            let opt = Optimizer::sgd(vec![ParamGroup::new(vec![a, b, unused], 0.0)], 0.9, false);
            assert_eq!(
                opt.grads_finite(),
                bad.is_finite(),
                "gradient element {bad}"
            );
        }
    }

    /// Three AdamW steps against PyTorch's formula by hand.
    #[test]
    fn matches_pytorch_adamw_formula() {
        let w = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let (lr, wd, b1, b2, eps) = (0.01, 0.05, 0.9, 0.999, 1e-8);
        let mut opt = Optimizer::new(
            vec![ParamGroup::new(vec![w.shallow_clone()], wd)],
            Rule::AdamW {
                beta1: b1,
                beta2: b2,
                eps,
            },
        );
        let mut w_ref = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            opt.zero_grad();
            (&w * &w * &w).sum(Kind::Double).backward();
            opt.step(lr);
            for i in 0..2 {
                let g = 3.0 * w_ref[i] * w_ref[i];
                w_ref[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
                w_ref[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
            let got: Vec<f64> = Vec::try_from(&w).unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - w_ref[i]).abs() <= 1e-12,
                    "step {t}: {got:?} vs {w_ref:?}"
                );
            }
        }
    }

    /// AdamW with a row mask: unsampled rows keep weight (no decay) and both moments.
    #[test]
    fn adamw_row_mask_freezes_rows() {
        let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0])
            .view([2, 2])
            .set_requires_grad(true);
        let mut opt = Optimizer::new(
            vec![ParamGroup::new(vec![w.shallow_clone()], 0.1)],
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
            },
        );
        for _ in 0..2 {
            opt.zero_grad();
            (&w * &w).sum(Kind::Double).backward();
            opt.step(0.1);
        }
        let before: Vec<f64> = Vec::try_from(w.flatten(0, -1)).unwrap();
        let state_before: Vec<Vec<f64>> = opt
            .state_tensors()
            .iter()
            .skip(1)
            .map(|(_, t)| Vec::try_from(t.flatten(0, -1)).unwrap())
            .collect();
        opt.set_row_mask(0, Some(Tensor::from_slice(&[0.0f64, 1.0])));
        opt.zero_grad();
        (&w * &w).sum(Kind::Double).backward();
        opt.step(0.1);
        let after: Vec<f64> = Vec::try_from(w.flatten(0, -1)).unwrap();
        let state_after: Vec<Vec<f64>> = opt
            .state_tensors()
            .iter()
            .skip(1)
            .map(|(_, t)| Vec::try_from(t.flatten(0, -1)).unwrap())
            .collect();
        assert_eq!(&after[..2], &before[..2]);
        assert!(after[2] != before[2] && after[3] != before[3]);
        for (a, b) in state_after.iter().zip(&state_before) {
            assert_eq!(&a[..2], &b[..2], "masked row's moments changed");
            assert!(a[2] != b[2]);
        }
    }

    /// Saving the state and loading it into a fresh optimiser continues bit-identically.
    #[test]
    fn state_round_trip_continues_identically() {
        for rule in [
            Rule::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let run = |split: bool| -> Vec<f64> {
                let w = Tensor::from_slice(&[0.5f64, -1.5, 2.0]).set_requires_grad(true);
                let mut opt =
                    Optimizer::new(vec![ParamGroup::new(vec![w.shallow_clone()], 0.01)], rule);
                for step in 0..6 {
                    if split && step == 3 {
                        let saved: HashMap<String, Tensor> = opt
                            .state_tensors()
                            .into_iter()
                            .map(|(k, t)| (k, t.copy()))
                            .collect();
                        opt = Optimizer::new(
                            vec![ParamGroup::new(vec![w.shallow_clone()], 0.01)],
                            rule,
                        );
                        opt.load_state(saved).unwrap();
                    }
                    opt.zero_grad();
                    (&w * &w * &w).sum(Kind::Double).backward();
                    opt.step(0.05);
                }
                Vec::try_from(&w).unwrap()
            };
            assert_eq!(run(false), run(true), "{rule:?}");
        }
    }

    #[test]
    fn state_from_another_model_is_rejected() {
        let w = Tensor::zeros([3], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = Optimizer::sgd(
            vec![ParamGroup::new(vec![w.shallow_clone()], 0.0)],
            0.9,
            false,
        );
        let mut bad = HashMap::new();
        bad.insert("steps".to_string(), Tensor::from(2i64));
        bad.insert(
            "g0.p0.momentum_buffer".to_string(),
            Tensor::zeros([4], (Kind::Double, tch::Device::Cpu)),
        );
        let err = opt.load_state(bad).unwrap_err().to_string();
        assert!(
            err.contains("g0.p0.momentum_buffer") && err.contains("[4]"),
            "{err}"
        );
    }
}
