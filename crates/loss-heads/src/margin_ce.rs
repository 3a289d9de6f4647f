//! Fused margin cross-entropy: the head's logits, the softmax and the cross-entropy gradient in
//! one `[B, C]` buffer.
//!
//! Not a method of its own: an implementation of `cross_entropy(head.logits(cos, y), y)` (the
//! margin-softmax loss of every head in this crate, SPEC 1) that allocates less. On CPU at
//! `C = 100,000` most of a head's forward + backward is spent touching freshly allocated
//! `[B, C]` tensors (page faults, see `docs/benchmarks.md`): the generic path creates the logits,
//! the `log_softmax` output, the NLL gradient, the `log_softmax` gradient and the scale gradient,
//! each `B·C` floats. Here the forward pass writes the logits into one buffer, turns them into the
//! softmax in place under `no_grad`, and turns that into the gradient w.r.t. the cosines in place;
//! the backward pass then only materialises that gradient once.
//!
//! # How the gradient reaches autograd
//!
//! A head that reports [`MarginHead::row_scaled_logits`] promises that its logits are
//! `z_ij = r_i·c_ij` for `j ≠ y_i` (with `r_i` the scale `s`, 1 for softmax, or the feature norm
//! `‖x_i‖` of SphereFace's A-Softmax) and that the target logit `t_i = z_{i,y_i}` depends on row
//! `i` only through `c_{i,y_i}` (and on parameters such as `r_i`). Every head of this crate does.
//! The head is then evaluated on a `[B, 2]` probe `[c_{i,y_i}, 1]` with every label 0, which gives
//! `t_i` (column 0, with the head's own autograd graph, margin function, clamps, thresholds and
//! detaches included) and `r_i` (column 1), both `O(B)`. With `G = (softmax(z) − onehot)/B`, the
//! gradient of the mean cross-entropy w.r.t. the logits, the returned loss is
//!
//! ```text
//! L = L₀ + (S − detach(S)),   S = Σ_ij Γ_ij·c_ij + Σ_i G_iy·t_i + Σ_i v_i·r_i
//! Γ_ij = r_i·G_ij (j ≠ y_i),  Γ_iy = G_iy·∂t_i/∂c_iy,  v_i = Σ_{j≠y_i} G_ij·c_ij
//! ```
//!
//! where `L₀` is the loss value and `Γ`, `G`, `v` are constants. `S − detach(S)` is exactly 0, so
//! the value is `L₀`; its gradient is `Γ` w.r.t. the cosines (the chain rule through the head:
//! `r_i·G_ij` off target, `G_iy·dt/dc` on target, with `dt/dc` taken by autograd on the `B`
//! probe entries, so the `exact`, `easy_margin` and `detached` treatments keep their gradients),
//! and the head's own gradient w.r.t. anything else its target or scale depends on (the feature
//! norms of [`MarginHead::logits_with_norms`]). The `v_i·r_i` term (one more pass) is only built
//! when `r` requires a gradient.
//!
//! Softmax detail: `exp` runs on `z − max` floored at [`EXP_FLOOR_F32`] (f32) or [`EXP_FLOOR_F64`]
//! (f64), where `exp` would otherwise produce subnormals; the effect on probabilities is below
//! `1.6e-38` absolute (f32), and on the loss below rounding.
//!
//! Heads that do not report the row-scaled form, and f16/bf16 cosines, fall back to
//! [`cross_entropy`]`(head.logits(..))`.

use std::sync::atomic::{AtomicI64, Ordering};
use tch::{Kind, Tensor};

use crate::head::{check_head_inputs, cross_entropy, MarginHead};

/// `z − max` is floored here before `exp` in f32: `exp(−87) ≈ 1.6e-38` is just above the smallest
/// normal float. Below it `exp` returns subnormals, which x86 CPUs compute about ten times slower
/// (measured in torch on `[512, 100000]` f32 logits with s = 64: `z − max` and an in-place `exp_`
/// took about 550 ms of CPU time, with the floor in between about 80 ms). The floor changes a
/// softmax probability by less than `1.6e-38/Σ` absolute, and `Σ` (so the loss) by less than
/// `C·1.6e-38` relative.
pub const EXP_FLOOR_F32: f64 = -87.0;
/// As [`EXP_FLOOR_F32`] for f64 (`exp(−708) ≈ 3.3e-308`).
pub const EXP_FLOOR_F64: f64 = -708.0;

/// Default of [`set_fused_min_elements`]: `[B, C]` sizes from 2^22 (4,194,304) entries on take the
/// fused path. Below it the unfused expression is as fast or faster on CPU (measured with
/// `cargo xtask bench-losses --unfused` at 128 x 10,000: 9.4–11.3 ms unfused vs 12.7–13.8 ms fused
/// for NormFace, CosFace and Softmax), because fresh small tensors cost no page faults.
pub const DEFAULT_FUSED_MIN_ELEMENTS: i64 = 1 << 22;

/// `buf ← exp(max(buf − max_b1, floor))` in place: the softmax numerators of logits `buf` whose
/// row maxima are `max_b1`, with `z − max` floored at [`EXP_FLOOR_F64`] (f64 `kind`) or
/// [`EXP_FLOOR_F32`] where `exp` would return a subnormal.
pub(crate) fn shifted_exp_(buf: &mut Tensor, max_b1: &Tensor, kind: Kind) {
    let _ = buf.g_sub_(max_b1);
    let _ = buf.clamp_min_(if kind == Kind::Double {
        EXP_FLOOR_F64
    } else {
        EXP_FLOOR_F32
    });
    let _ = buf.exp_();
}

static FUSED_MIN_ELEMENTS: AtomicI64 = AtomicI64::new(DEFAULT_FUSED_MIN_ELEMENTS);

/// Set the `[B, C]` size from which [`margin_cross_entropy`] fuses (0 = always, e.g. in tests of
/// the fused path itself). Process-wide.
pub fn set_fused_min_elements(n: i64) {
    FUSED_MIN_ELEMENTS.store(n, Ordering::Relaxed);
}

/// Mean margin cross-entropy `cross_entropy(head.logits(cos_bc, labels_b), labels_b)`, fused
/// when the matrix has at least [`DEFAULT_FUSED_MIN_ELEMENTS`] entries (see
/// [`set_fused_min_elements`]).
///
/// Same value and same gradients (w.r.t. `cos_bc` and anything the head's target logit depends
/// on) as the unfused expression, up to float rounding; fewer `[B, C]` temporaries (see the
/// module docs). Works for every head of this crate, including [`crate::Softmax`] over
/// [`crate::LinearClassifier`] scores and heads over a Partial FC subset (pass the sampled
/// cosines and `sampled.labels`). Computed in f64 for f64 input and f32 for f32 input; f16/bf16
/// input, and heads whose [`MarginHead::row_scaled_logits`] is false, take the unfused path.
/// Like [`MarginHead::logits`], call [`MarginHead::set_step`] before it once per iteration:
/// the head is evaluated once.
///
/// ```no_run
/// use facerec_loss_heads::{margin_cross_entropy, CosineClassifier, HeadConfig};
/// use tch::{nn, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let classifier = CosineClassifier::new(&(vs.root() / "fc"), 1000, 512);
/// let head = HeadConfig::default().build();
/// let emb = Tensor::randn([32, 512], (Kind::Float, Device::Cpu));
/// let labels = Tensor::randint(1000, [32], (Kind::Int64, Device::Cpu));
/// let loss = margin_cross_entropy(&*head, &classifier.cosines(&emb), &labels);
/// loss.backward();
/// ```
///
/// # Shapes
/// `cos_bc [B, C]` (f32 or f64; scores for softmax), `labels_b [B]` (Int64) -> scalar.
///
/// # Panics
/// As [`MarginHead::logits`].
pub fn margin_cross_entropy<H: MarginHead + ?Sized>(
    head: &H,
    cos_bc: &Tensor,
    labels_b: &Tensor,
) -> Tensor {
    fused(cos_bc, labels_b, head.row_scaled_logits(), |c, y| {
        head.logits(c, y)
    })
}

/// [`margin_cross_entropy`] for [`MarginHead::logits_with_norms`]: equals
/// `cross_entropy(head.logits_with_norms(cos_bc, labels_b, norms_b), labels_b)` in value and in
/// gradient, including the gradient w.r.t. `norms_b` for heads that scale by the feature norm
/// (SphereFace's A-Softmax). This is the call a trainer uses for every head.
///
/// # Shapes
/// `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` (same kind as `cos_bc`) -> scalar.
///
/// # Panics
/// As [`MarginHead::logits_with_norms`].
pub fn margin_cross_entropy_with_norms<H: MarginHead + ?Sized>(
    head: &H,
    cos_bc: &Tensor,
    labels_b: &Tensor,
    norms_b: &Tensor,
) -> Tensor {
    fused(cos_bc, labels_b, head.row_scaled_logits(), |c, y| {
        head.logits_with_norms(c, y, norms_b)
    })
}

fn fused(
    cos_bc: &Tensor,
    labels_b: &Tensor,
    row_scaled: bool,
    logits: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> Tensor {
    let b = check_head_inputs(cos_bc, labels_b);
    let kind = cos_bc.kind();
    let small = cos_bc.numel() < FUSED_MIN_ELEMENTS.load(Ordering::Relaxed).max(0) as usize;
    if !row_scaled || !matches!(kind, Kind::Float | Kind::Double) || b == 0 || small {
        return cross_entropy(&logits(cos_bc, labels_b), labels_b);
    }
    let c = cos_bc.size()[1];
    let idx_b1 = labels_b.view([b, 1]);

    // The head on the probe [c_y, 1] (label 0): t (target logits) and r (row scales), O(B).
    let track = cos_bc.requires_grad();
    let cy_b1 = cos_bc
        .detach()
        .gather(1, &idx_b1, false)
        .set_requires_grad(track);
    let probe_b2 = Tensor::cat(&[&cy_b1, &cy_b1.detach().ones_like()], 1);
    let out_b2 = logits(&probe_b2, &labels_b.zeros_like());
    assert_eq!(
        out_b2.size(),
        [b, 2],
        "a row-scaled head must map [B, 2] to [B, 2]"
    );
    let t_b1 = out_b2.narrow(1, 0, 1);
    let r_b1 = out_b2.narrow(1, 1, 1);
    // dt_i/dc_iy on the B probe entries (the head's own gradient treatment).
    let dt_b1 = if track && t_b1.requires_grad() {
        Tensor::run_backward(&[t_b1.sum(kind)], &[&cy_b1], true, false)
            .pop()
            .expect("one gradient")
    } else {
        cy_b1.detach().zeros_like()
    };
    let norms_tracked = r_b1.requires_grad();

    let (loss0, gamma_bc, g_y_b1, v_b1) = tch::no_grad(|| {
        let (t, r) = (t_b1.detach(), r_b1.detach());
        // z = r·c off target, t on target, in the one buffer.
        let mut buf = cos_bc.detach() * &r;
        let _ = buf.scatter_(1, &idx_b1, &t);
        let max_b1 = buf.amax([1], true);
        shifted_exp_(&mut buf, &max_b1, kind);
        let sum_b1 = buf.sum_dim_intlist(Some([1i64].as_slice()), true, kind);
        let e_y_b1 = buf.gather(1, &idx_b1, false);
        // L₀ = mean_i (log Σ_j exp(z_ij − max_i) + max_i − t_i).
        let loss0 = (sum_b1.log() + &max_b1 - &t).mean(kind);
        let per_b1 = &sum_b1 * b as f64;
        // v_i = Σ_{j≠y} G_ij c_ij, only when the row scale needs a gradient.
        let v_b1 = norms_tracked.then(|| {
            let ec_b1 = buf
                .view([b, 1, c])
                .bmm(&cos_bc.detach().reshape([b, c, 1]))
                .view([b, 1]);
            let cy = cos_bc.detach().gather(1, &idx_b1, false);
            (ec_b1 - &e_y_b1 * cy) / &per_b1
        });
        // Γ = r·p/B off target (p = e/Σe); G_y = (p_y − 1)/B; Γ_y = G_y·dt/dc.
        let _ = buf.g_mul_(&(&r / &per_b1));
        let g_y_b1 = (&e_y_b1 / &sum_b1 - 1.0) / b as f64;
        let _ = buf.scatter_(1, &idx_b1, &(&g_y_b1 * &dt_b1));
        (loss0, buf, g_y_b1, v_b1)
    });

    if !track && !t_b1.requires_grad() && !norms_tracked {
        return loss0;
    }
    let mut s = cos_bc.reshape([-1]).dot(&gamma_bc.view([-1]));
    if t_b1.requires_grad() {
        s += (&g_y_b1 * &t_b1).sum(kind);
    }
    if let Some(v) = v_b1 {
        s += (v * &r_b1).sum(kind);
    }
    loss0 + (&s - s.detach())
}
