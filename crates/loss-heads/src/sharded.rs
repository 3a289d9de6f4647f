//! The margin cross-entropy over a class matrix split by rows across ranks (model-parallel
//! Partial FC; An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of
//! Face Recognition CNNs by Partial FC", CVPR 2022, arXiv 2203.15565).
//!
//! Rank `r` of `W` owns the contiguous block [`ClassShard::of`] of the `C` class rows and holds
//! the cosines `cos_local [B, C']` of the *gathered* batch (every rank's samples, `B` rows)
//! against its own rows (its whole block, or its Partial FC sample of it,
//! [`crate::PartialFc::sample_shard`]). [`sharded_cross_entropy`] returns the mean margin
//! cross-entropy over the `B` rows and the full (or sampled) class set, using three collectives
//! per call (see [`Collectives`]):
//!
//! 1. the target cosine `t_i`: the owner's gathered entry, 0 elsewhere, summed over ranks, with the
//!    count of owners (each row must have exactly one, else an error);
//! 2. the row maximum of the logits, max over ranks;
//! 3. the row sum of `exp(z − max)`, summed over ranks, the target entry counted on its owner only.
//!
//! # How the head is applied
//!
//! Each rank evaluates the head once on `[cos_local | t]` (`[B, C' + 1]`) with every label
//! pointing at the extra column `C'`: the head changes only that column (its target), exactly as
//! in one process, and sees the same `B` target cosines on every rank (the owner's entry keeps its
//! autograd path, the others are the detached `t`), so heads whose output depends on the whole
//! batch's targets (ElasticFace "+", CurricularFace's hard negatives) or that draw one random margin
//! per row (ElasticFace, from the step's stream: the same `B` draws on every rank and in one
//! process) behave as in one process. The owner's original target column is masked out of the
//! negatives. Heads with row-scaled logits ([`MarginHead::row_scaled_logits`]: every
//! head but CurricularFace, AdaFace and GCE) take the equivalent fused path of
//! [`crate::margin_cross_entropy`] instead: the head runs on the `[B, 2]` probe `[t, 1]`, which
//! gives the target logits and the row scales, and one `[B, C']` buffer holds the logits, the
//! exponentials and the gradient. This needs a head whose non-target logits depend on the cosines of their own column
//! (and detached per-row constants) and whose target logit depends on the target cosine, the
//! labels only through their position, and the feature norms: every [`MarginHead`] of this crate
//! except [`crate::Gce`] (see `docs/heads.md`, "Model-parallel heads").
//!
//! # How the gradient is built
//!
//! With `p = exp(z − M)/S` the global softmax and `G = (p − onehot)/B` (a constant), the loss is
//! `L₀ + (Σ G⊙z − detach(Σ G⊙z))`: its value is `L₀`, the global mean loss (the same on every
//! rank), and its gradient is `G` pushed back through this rank's head evaluation. `G` of the
//! extra column is `(p_y − 1)/B` on the owner and 0 elsewhere, so the target's gradient (to its
//! class row, to the gathered embedding, and to the feature norm for SphereFace's A-Softmax) is
//! counted once; `G` of the masked column is 0. The gradient w.r.t. this rank's class rows is
//! therefore exact, and the gradients w.r.t. the gathered embeddings summed over ranks equal the
//! single-process gradient.

use anyhow::{bail, ensure, Context, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tch::{Kind, Tensor};

use crate::head::MarginHead;
use crate::margin_ce::shifted_exp_;

/// The collectives the sharded loss needs. The trainer implements it over facerec-distributed's
/// process group; tests use [`ThreadGroup`] (threads in one process).
pub trait Collectives {
    /// This rank, in `[0, world_size)`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks; every rank gets the result (same shape and kind everywhere).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Element-wise max over ranks; every rank gets the result.
    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor>;
}

/// The contiguous block of class rows one rank owns: `[start, start + len)` of `num_classes`.
///
/// The first `C % W` ranks hold one row more, so `C` need not be divisible by `W`; a block is
/// empty only if `C < W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassShard {
    /// First class id of the block.
    pub start: i64,
    /// Number of classes in the block.
    pub len: i64,
    /// Number of classes `C` of the whole classifier.
    pub num_classes: i64,
}

impl ClassShard {
    /// The block of `rank` among `world` ranks.
    ///
    /// # Panics
    /// If `world == 0`, `rank >= world` or `num_classes < 0`.
    pub fn of(num_classes: i64, rank: usize, world: usize) -> ClassShard {
        assert!(world > 0 && rank < world, "rank {rank} of world {world}");
        assert!(num_classes >= 0, "num_classes must be >= 0");
        let (w, r) = (world as i64, rank as i64);
        let (base, rem) = (num_classes / w, num_classes % w);
        ClassShard {
            start: r * base + r.min(rem),
            len: base + i64::from(r < rem),
            num_classes,
        }
    }

    /// One past the last class id of the block.
    pub fn end(&self) -> i64 {
        self.start + self.len
    }

    /// Column in this shard of each global label, `-1` where another rank owns it.
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64) -> `[B]` (Int64).
    ///
    /// # Panics
    /// If `labels_b` is not Int64.
    pub fn local_labels(&self, labels_b: &Tensor) -> Tensor {
        assert_eq!(labels_b.kind(), Kind::Int64, "labels must be Int64");
        let inside = labels_b
            .ge(self.start)
            .logical_and(&labels_b.lt(self.end()));
        (labels_b - self.start).where_self(&inside, &labels_b.full_like(-1))
    }
}

/// Mean margin cross-entropy over the gathered batch when each rank holds the cosines of the batch
/// against its own class columns (see the module docs for the method).
///
/// `cos_local [B, C']` (f32 or f64): cosines (with autograd to this rank's class rows and to the
/// gathered embeddings) of the gathered batch against this rank's columns (its block, or its
/// Partial FC sample of it; linear scores for [`crate::Softmax`]); `local_labels [B]` (Int64):
/// column of row `i`'s target in `cos_local`, or `-1` where another rank owns it; `norms_b [B]`:
/// feature norms of the gathered embeddings (SphereFace's A-Softmax and AdaFace use them).
///
/// Returns a scalar whose value is the global mean loss (identical on every rank) and whose
/// gradient on this rank is this rank's share: exact for this rank's class rows; w.r.t. the
/// gathered embeddings (and norms), the sum over ranks equals the gradient of the
/// single-process loss over the same batch and class set. Every rank must call it with the same
/// `B`, the same head (same config, same [`MarginHead::set_step`]) and in the same order as its
/// other collectives. The head is evaluated once (ElasticFace draws its `B` margins once).
///
/// # Shapes
/// `cos_local [B, C']`, `local_labels [B]`, `norms_b [B]` -> scalar (kind of the head's logits).
///
/// # Errors
/// On malformed inputs (shapes, kinds, a label outside `[-1, C')`, `B = 0`), a row whose target is
/// owned by no rank or by several, and a failing collective.
pub fn sharded_cross_entropy(
    head: &dyn MarginHead,
    cos_local: &Tensor,
    local_labels: &Tensor,
    norms_b: &Tensor,
    comm: &dyn Collectives,
) -> Result<Tensor> {
    Ok(sharded_loss_and_targets(head, cos_local, local_labels, norms_b, comm)?.0)
}

/// [`sharded_cross_entropy`], and the head records the gathered batch's rows for its moving
/// statistics ([`MarginHead::record_rows`] with the global target cosines and the norms, the
/// same on every rank, so CurricularFace's `t` and AdaFace's norm statistics move on every rank
/// as in one process over the whole batch). The call a trainer makes for every head but GCE
/// (which has [`crate::Gce::sharded_step_loss`]).
///
/// A head's [`MarginHead::norm_penalty`] (MagFace's regulariser over the gathered batch's
/// norms) is added with its full value on every rank and its gradient on rank 0 only, so the
/// value stays the global loss and the gradients w.r.t. the gathered embeddings, summed over
/// ranks, still equal the single-process ones.
///
/// # Shapes
/// As [`sharded_cross_entropy`].
///
/// # Errors
/// As [`sharded_cross_entropy`].
pub fn sharded_training_loss(
    head: &mut dyn MarginHead,
    cos_local: &Tensor,
    local_labels: &Tensor,
    norms_b: &Tensor,
    comm: &dyn Collectives,
) -> Result<Tensor> {
    let (loss, t_b1) = sharded_loss_and_targets(&*head, cos_local, local_labels, norms_b, comm)?;
    head.record_rows(&t_b1.view([-1]), norms_b);
    Ok(match head.norm_penalty(norms_b) {
        Some(p) if comm.rank() == 0 => loss + p,
        Some(p) => loss + p.detach(),
        None => loss,
    })
}

/// The loss and the global target cosines `[B, 1]` (detached).
fn sharded_loss_and_targets(
    head: &dyn MarginHead,
    cos_local: &Tensor,
    local_labels: &Tensor,
    norms_b: &Tensor,
    comm: &dyn Collectives,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        head.loss_is_cross_entropy(),
        "sharded cross-entropy: this head's loss is not a cross-entropy of its logits \
         (GCE: use Gce::sharded_step_loss)"
    );
    let (b, c_local) = cos_local
        .size2()
        .context("sharded cross-entropy: cos_local must be [B, C']")?;
    let kind = cos_local.kind();
    ensure!(
        matches!(kind, Kind::Float | Kind::Double),
        "sharded cross-entropy: cos_local must be f32 or f64, got {kind:?}"
    );
    ensure!(
        local_labels.kind() == Kind::Int64 && local_labels.size() == [b],
        "sharded cross-entropy: local labels must be Int64 [{b}], got {:?} {:?}",
        local_labels.kind(),
        local_labels.size()
    );
    ensure!(
        norms_b.size() == [b],
        "sharded cross-entropy: norms must be [{b}], got {:?}",
        norms_b.size()
    );
    ensure!(b > 0, "sharded cross-entropy: empty batch");
    let bad = tch::no_grad(|| {
        local_labels
            .lt(-1)
            .logical_or(&local_labels.ge(c_local))
            .any()
            .int64_value(&[])
    });
    ensure!(
        bad == 0,
        "sharded cross-entropy: a local label is outside [-1, {c_local}) on rank {}",
        comm.rank()
    );
    let dev = cos_local.device();
    let owned_b1 = local_labels.ge(0).view([b, 1]);
    let owned_f = owned_b1.to_kind(kind);
    let idx_b1 = local_labels.clamp_min(0).view([b, 1]);

    // 1. The target cosine of each row, from its owner; the number of owners.
    let own_b1 = if c_local > 0 {
        cos_local.gather(1, &idx_b1, false) * &owned_f
    } else {
        Tensor::zeros([b, 1], (kind, dev))
    };
    let both = comm
        .all_reduce_sum(&Tensor::cat(&[own_b1.detach(), owned_f.shallow_clone()], 1))
        .context("sharded cross-entropy: all-reduce of the target cosines")?;
    let (t_b1, owners_b1) = (both.narrow(1, 0, 1), both.narrow(1, 1, 1));
    let misowned = tch::no_grad(|| owners_b1.ne(1.0).sum(Kind::Int64).int64_value(&[]));
    if misowned > 0 {
        bail!(
            "sharded cross-entropy: {misowned} of {b} rows have no owning rank or several \
             (a label outside [0, C), or shards that overlap)"
        );
    }
    let tcol_b1 = &own_b1 + t_b1.detach() * (1.0 - &owned_f);

    if head.row_scaled_logits() {
        let rows = Rows {
            idx_b1: &idx_b1,
            owned_b1: &owned_b1,
            owned_f: &owned_f,
        };
        let loss = fused_row_scaled(head, cos_local, &rows, &tcol_b1, norms_b, comm)?;
        return Ok((loss, t_b1.detach()));
    }
    // The head, once, on [cos_local | t] with every label on the extra column.
    let ext = Tensor::cat(&[cos_local, &tcol_b1], 1);
    let labels_ext = Tensor::full([b], c_local, (Kind::Int64, dev));
    let z = head.logits_with_norms(&ext, &labels_ext, norms_b);
    ensure!(
        z.size() == [b, c_local + 1],
        "sharded cross-entropy: the head returned {:?} for [{b}, {}]",
        z.size(),
        c_local + 1
    );
    let zkind = z.kind();

    // 2-3. Max and sum of exponentials across ranks; the constant G = (p - onehot)/B.
    let (loss0, g_bc) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let zd = z.detach();
        let mask = Tensor::zeros([b, c_local + 1], (Kind::Bool, dev));
        let mask = if c_local > 0 {
            mask.scatter(1, &idx_b1, &owned_b1)
        } else {
            mask
        };
        let neg = zd.masked_fill(&mask, f64::NEG_INFINITY);
        let max_b1 = comm
            .all_reduce_max(&neg.amax([1], true))
            .context("sharded cross-entropy: all-reduce of the row maxima")?;
        let e = (&neg - &max_b1).exp();
        let e_t = e.narrow(1, c_local, 1);
        let local_sum = e.narrow(1, 0, c_local).sum_dim_intlist(1, true, zkind) + &e_t * &owned_f;
        let sum_b1 = comm
            .all_reduce_sum(&local_sum)
            .context("sharded cross-entropy: all-reduce of the exponential sums")?;
        let z_t = zd.narrow(1, c_local, 1);
        let loss0 = (sum_b1.log() + &max_b1 - z_t).mean(zkind);
        let g = e / (&sum_b1 * b as f64);
        let g_t = (e_t / &sum_b1 - 1.0) / b as f64 * &owned_f;
        g.narrow(1, c_local, 1).copy_(&g_t);
        Ok((loss0, g))
    })?;
    let t_b1 = t_b1.detach();
    if !z.requires_grad() {
        return Ok((loss0, t_b1));
    }
    let s = (&z * g_bc).sum(zkind);
    Ok((loss0 + (&s - s.detach()), t_b1))
}

/// Which rows this rank owns: the target column `[B, 1]` (0 where not owned), the ownership as
/// bool and as 0/1 of the cosines' kind.
struct Rows<'a> {
    idx_b1: &'a Tensor,
    owned_b1: &'a Tensor,
    owned_f: &'a Tensor,
}

/// The sharded loss for a head with row-scaled logits ([`MarginHead::row_scaled_logits`]:
/// `z_ij = r_i·c_ij` off target, the target logit a function of the target cosine), with one
/// `[B, C']` buffer as in [`crate::margin_cross_entropy`]: the head runs on the `[B, 2]` probe
/// `[t, 1]` (label 0), which gives the target logits `t_i` (with the owner's autograd path) and
/// the row scales `r_i`; the buffer holds in turn `r·c`, the exponentials and
/// `Γ = r·p/B`; the gradient is `Σ Γ⊙c + Σ G_y·t + Σ v·r` (`G_y` nonzero on the owner only,
/// `v_i = Σ_j G_ij c_ij` over this block, only when `r` needs a gradient).
fn fused_row_scaled(
    head: &dyn MarginHead,
    cos_local: &Tensor,
    rows: &Rows<'_>,
    tcol_b1: &Tensor,
    norms_b: &Tensor,
    comm: &dyn Collectives,
) -> Result<Tensor> {
    let (b, c_local) = cos_local.size2()?;
    let kind = cos_local.kind();
    let dev = cos_local.device();
    let probe_b2 = Tensor::cat(&[tcol_b1, &tcol_b1.detach().ones_like()], 1);
    let out_b2 =
        head.logits_with_norms(&probe_b2, &Tensor::zeros([b], (Kind::Int64, dev)), norms_b);
    ensure!(
        out_b2.size() == [b, 2],
        "sharded cross-entropy: a row-scaled head must map [B, 2] to [B, 2], got {:?}",
        out_b2.size()
    );
    let t_b1 = out_b2.narrow(1, 0, 1);
    let r_b1 = out_b2.narrow(1, 1, 1);
    let r_tracked = r_b1.requires_grad();
    let (loss0, gamma_bc, g_t_b1, v_b1) = tch::no_grad(|| -> Result<_> {
        let (t, r) = (t_b1.detach(), r_b1.detach());
        let mut buf = cos_local.detach() * &r;
        // The owned target entries (row, column), written out of the negatives in place.
        let owned_rows =
            Tensor::arange(b, (Kind::Int64, dev)).masked_select(&rows.owned_b1.view([b]));
        let owned_cols = rows
            .idx_b1
            .view([b])
            .masked_select(&rows.owned_b1.view([b]));
        let at_targets = [Some(owned_rows), Some(owned_cols)];
        let neg_inf = Tensor::from(f64::NEG_INFINITY).to_kind(kind).to_device(dev);
        let local_max = if c_local > 0 {
            let _ = buf.index_put_(&at_targets, &neg_inf, false);
            buf.amax([1], true).maximum(&t)
        } else {
            t.shallow_clone()
        };
        let max_b1 = comm
            .all_reduce_max(&local_max)
            .context("sharded cross-entropy: all-reduce of the row maxima")?;
        // Floored as the fused single-process loss, then the masked target entries back to
        // exactly 0.
        shifted_exp_(&mut buf, &max_b1, kind);
        if c_local > 0 {
            let _ = buf.index_put_(&at_targets, &neg_inf.zeros_like(), false);
        }
        let e_t = (&t - &max_b1).exp();
        let local_sum =
            buf.sum_dim_intlist(Some([1i64].as_slice()), true, kind) + &e_t * rows.owned_f;
        let sum_b1 = comm
            .all_reduce_sum(&local_sum)
            .context("sharded cross-entropy: all-reduce of the exponential sums")?;
        let loss0 = (sum_b1.log() + &max_b1 - &t).mean(kind);
        let per_b1 = &sum_b1 * b as f64;
        let v_b1 = r_tracked.then(|| {
            buf.view([b, 1, c_local])
                .bmm(&cos_local.detach().reshape([b, c_local, 1]))
                .view([b, 1])
                / &per_b1
        });
        let _ = buf.g_mul_(&(&r / &per_b1));
        let g_t_b1 = (e_t / &sum_b1 - 1.0) / b as f64 * rows.owned_f;
        Ok((loss0, buf, g_t_b1, v_b1))
    })?;
    let mut s = cos_local.reshape([-1]).dot(&gamma_bc.view([-1]));
    if t_b1.requires_grad() {
        s += (&g_t_b1 * &t_b1).sum(kind);
    }
    if let Some(v) = v_b1 {
        s += (v * &r_b1).sum(kind);
    }
    if !s.requires_grad() {
        return Ok(loss0);
    }
    Ok(loss0 + (&s - s.detach()))
}

/// [`Collectives`] between threads of one process: `world` handles from [`ThreadGroup::new`], one
/// per thread. For tests and tools (W virtual ranks in one process).
///
/// Every collective is two rendezvous (publish, read): each rank writes its tensor, waits for
/// all, reduces all of them in rank order (so every rank gets bit-identical results, in f64 and
/// converted back to the input's kind), and waits again before the slots are reused. A rank that
/// does not arrive within the timeout makes the others' call fail instead of hanging.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Rendezvous>,
    cv: Condvar,
}

#[derive(Debug)]
struct Rendezvous {
    arrived: usize,
    generation: u64,
    slots: Vec<Vec<f64>>,
}

impl ThreadGroup {
    /// `world` handles (rank 0 first) sharing one group; a rendezvous waits at most 60 s.
    ///
    /// # Panics
    /// If `world == 0`.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        assert!(world > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            timeout: Duration::from_secs(60),
            state: Mutex::new(Rendezvous {
                arrived: 0,
                generation: 0,
                slots: vec![Vec::new(); world],
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Waits until every rank has arrived (a generation-counting barrier with a timeout).
    fn barrier(&self) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == sh.world {
            st.arrived = 0;
            st.generation += 1;
            sh.cv.notify_all();
            return Ok(());
        }
        let (st, res) = sh
            .cv
            .wait_timeout_while(st, sh.timeout, |s| s.generation == gen)
            .unwrap_or_else(|e| e.into_inner());
        drop(st);
        ensure!(
            !res.timed_out(),
            "rank {} waited {:?} for the other ranks of the thread group",
            self.rank,
            sh.timeout
        );
        Ok(())
    }

    fn reduce(&self, t: &Tensor, op: fn(f64, f64) -> f64) -> Result<Tensor> {
        let flat = t.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
        let mine = Vec::<f64>::try_from(flat.reshape([-1])).context("tensor to a vector")?;
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .slots[self.rank] = mine;
        self.barrier()?;
        let out = {
            let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let n = st.slots[0].len();
            ensure!(
                st.slots.iter().all(|s| s.len() == n),
                "ranks reduced tensors of different sizes"
            );
            (0..n)
                .map(|k| {
                    st.slots[1..]
                        .iter()
                        .fold(st.slots[0][k], |acc, s| op(acc, s[k]))
                })
                .collect::<Vec<f64>>()
        };
        self.barrier()?;
        Ok(Tensor::from_slice(&out)
            .view(t.size().as_slice())
            .to_kind(t.kind())
            .to_device(t.device()))
    }
}

impl Collectives for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, |a, b| a + b)
    }

    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, f64::max)
    }
}

/// One process: the identity collectives (`world_size` 1).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }

    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_classes_with_the_remainder_first() {
        for (c, w) in [(10, 3), (9, 3), (2, 3), (7, 1), (100, 8)] {
            let shards: Vec<_> = (0..w).map(|r| ClassShard::of(c, r, w)).collect();
            assert_eq!(shards[0].start, 0);
            for pair in shards.windows(2) {
                assert_eq!(pair[0].end(), pair[1].start);
                assert!(pair[0].len >= pair[1].len && pair[0].len - pair[1].len <= 1);
            }
            assert_eq!(shards[w - 1].end(), c);
        }
        let s = ClassShard::of(10, 1, 3);
        assert_eq!((s.start, s.len), (4, 3));
        let labels = Tensor::from_slice(&[0i64, 4, 6, 7, 9]);
        let local = Vec::<i64>::try_from(s.local_labels(&labels)).unwrap();
        assert_eq!(local, [-1, 0, 2, -1, -1]);
    }
}
