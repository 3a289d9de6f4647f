//! The processes of a data-parallel run, as the trainer sees them (docs/distributed.md).
//!
//! A run joins the c10d process group that the environment describes (`RANK`, `WORLD_SIZE`, ...,
//! set by `cargo xtask train --nproc N`, torchrun or Slurm; none of them set: a world of one).
//! Every rank holds the whole model (data parallel): rank 0's weights are broadcast at start, each
//! rank reads every `world`-th batch of the single-process order, and after backward the
//! gradients are averaged, so clipping and the optimiser see the global gradient and every rank
//! takes the same step. BatchNorm statistics stay local, as in arcface_torch. Logging,
//! evaluation, checkpoints and the run directory belong to rank 0.
//!
//! In a world of one no collective is issued at all: a single-process run is bitwise what it was
//! before data parallelism existed.

use anyhow::{Context, Result};
use facerec_data::Shard;
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use tch::{nn::VarStore, Device, Tensor};

/// Gradient bucket size for the all-reduce (PyTorch DDP's default, 25 MiB).
const BUCKET_BYTES: usize = 25 << 20;

/// This process's place in the run.
pub struct World {
    group: Option<ProcessGroup>,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
}

impl World {
    /// A world of one process, without a process group.
    pub fn single() -> Self {
        World {
            group: None,
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
        }
    }

    /// Join the group the environment describes; a world of one when it describes none.
    /// `device` selects the backend (NCCL for CUDA when compiled in, else Gloo).
    pub fn from_env(device: Device) -> Result<Self> {
        let rv = Rendezvous::from_env()
            .context("reading the data-parallel environment (RANK, WORLD_SIZE, ...)")?;
        if rv.world_size == 1 {
            return Ok(World::single());
        }
        let local_size = std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(rv.world_size);
        let group = ProcessGroup::new(&rv, Backend::for_device(device)).with_context(|| {
            format!(
                "rank {} of {}: joining the process group at {}:{}",
                rv.rank, rv.world_size, rv.master_addr, rv.master_port
            )
        })?;
        Ok(World {
            rank: rv.rank,
            size: rv.world_size,
            local_rank: rv.local_rank,
            local_size,
            group: Some(group),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank on this machine (`cuda:LOCAL_RANK`).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Processes on this machine (they share its cores).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Whether this is rank 0, which logs, evaluates and writes the run directory.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The batches this rank reads.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.rank,
            world: self.size,
        }
    }

    /// Copy rank 0's variables (parameters and buffers) of every store to all ranks.
    pub fn broadcast_from_main(&self, stores: &[&VarStore]) -> Result<()> {
        let Some(pg) = &self.group else { return Ok(()) };
        for vs in stores {
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, mut t) in vars {
                pg.broadcast(&mut t, 0)
                    .with_context(|| format!("broadcasting `{name}` from rank 0"))?;
            }
        }
        Ok(())
    }

    /// Average the gradients of `params` over all ranks, in place (bucketed). Parameters without
    /// a gradient are left out (the same on every rank: the model is the same).
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        self.reduce_gradients(params, ReduceOp::Avg)
            .context("averaging the gradients")
    }

    /// The step's loss averaged over the ranks (a NaN anywhere makes it NaN everywhere) and the
    /// union of the classifier rows the ranks' micro-batches may change (element-wise max of the
    /// masks; `None` = every row, when any rank has no mask). One all-reduce carries the loss and
    /// whether a mask is absent, a second the masks when every rank has one.
    pub fn reduce_loss_and_rows(
        &self,
        loss: f64,
        mask: Option<Tensor>,
    ) -> Result<(f64, Option<Tensor>)> {
        let Some(pg) = &self.group else {
            return Ok((loss, mask));
        };
        let mut t = Tensor::from_slice(&[loss, f64::from(u8::from(mask.is_none()))]);
        pg.all_reduce(&mut t, ReduceOp::Sum)
            .context("summing the step's loss")?;
        let sums: Vec<f64> = Vec::try_from(&t)?;
        let mean = sums[0] / self.size as f64;
        // Every rank takes the same branch: the count of absent masks is global.
        if sums[1] > 0.0 {
            return Ok((mean, None));
        }
        let mut m = mask.expect("no rank has an absent mask").contiguous();
        pg.all_reduce(&mut m, ReduceOp::Max)
            .context("uniting the Partial FC row masks")?;
        Ok((mean, Some(m)))
    }

    /// Rank 0's `value` on every rank (through the rendezvous store; `value` is read on rank 0
    /// only). Used for the run directory, whose name only rank 0 knows.
    pub fn share_from_main(&self, key: &str, value: &str) -> Result<String> {
        let Some(pg) = &self.group else {
            return Ok(value.to_string());
        };
        if self.is_main() {
            pg.store_set(key, value.as_bytes())
                .with_context(|| format!("publishing `{key}`"))?;
            return Ok(value.to_string());
        }
        let bytes = pg
            .store_get(key)
            .with_context(|| format!("waiting for rank 0's `{key}`"))?;
        String::from_utf8(bytes).with_context(|| format!("rank 0's `{key}` is not UTF-8"))
    }

    /// Sum the gradients of `params` over all ranks, in place (bucketed): model parallel, where
    /// each rank's loss is already the global mean and its backbone gradient one share of it.
    pub fn sum_gradients(&self, params: &[Tensor]) -> Result<()> {
        self.reduce_gradients(params, ReduceOp::Sum)
            .context("summing the backbone gradients over the ranks")
    }

    /// All-reduce the defined gradients of `params` with `op`, in place, in buckets of
    /// `BUCKET_BYTES`.
    fn reduce_gradients(&self, params: &[Tensor], op: ReduceOp) -> Result<()> {
        let Some(pg) = &self.group else { return Ok(()) };
        let mut grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        pg.all_reduce_bucketed(&mut grads, op, BUCKET_BYTES)
    }

    /// Every rank's `t` concatenated along the first dimension, in rank order (`t` itself in a
    /// world of one).
    ///
    /// # Shapes
    /// `t [n, ...]`, the same shape on every rank -> `[world * n, ...]`.
    pub fn all_gather_cat(&self, t: &Tensor, what: &str) -> Result<Tensor> {
        match &self.group {
            Some(pg) => pg
                .all_gather_cat(t)
                .with_context(|| format!("gathering {what} from every rank")),
            None => Ok(t.shallow_clone()),
        }
    }

    /// Block `rank` of the element-wise sum over ranks of `t` (reduce-scatter); `t` itself in a
    /// world of one.
    ///
    /// # Shapes
    /// `t [world * n, ...]` -> `[n, ...]`.
    pub fn reduce_scatter_sum(&self, t: &Tensor, what: &str) -> Result<Tensor> {
        match &self.group {
            Some(pg) => pg
                .reduce_scatter(t, ReduceOp::Sum)
                .with_context(|| format!("summing and scattering {what}")),
            None => Ok(t.shallow_clone()),
        }
    }

    /// Element-wise `op` over ranks of `t`, in place (nothing in a world of one).
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp, what: &str) -> Result<()> {
        match &self.group {
            Some(pg) => pg
                .all_reduce(t, op)
                .with_context(|| format!("reducing {what} over the ranks")),
            None => Ok(()),
        }
    }

    /// Whether `flag` holds on every rank (one all-reduce).
    pub fn all_true(&self, flag: bool, what: &str) -> Result<bool> {
        let mut t = Tensor::from_slice(&[f64::from(u8::from(!flag))]);
        self.all_reduce(&mut t, ReduceOp::Sum, what)?;
        Ok(f64::try_from(&t)? == 0.0)
    }

    /// Rank 0 receives every rank's block of rows, concatenated in rank order (`None` on the
    /// other ranks): one broadcast per rank, so no rank holds more than its block and one other
    /// at a time, except rank 0, which holds the whole. `rows[r]` is rank r's block length; the
    /// trailing shape and kind are those of `block`, the same on every rank.
    ///
    /// # Shapes
    /// `block [rows[rank], ...]` -> `[sum(rows), ...]` on rank 0.
    pub fn gather_rows_to_main(
        &self,
        block: &Tensor,
        rows: &[i64],
        what: &str,
    ) -> Result<Option<Tensor>> {
        let Some(pg) = &self.group else {
            return Ok(Some(block.shallow_clone()));
        };
        let _guard = tch::no_grad_guard();
        let mut parts = Vec::with_capacity(rows.len());
        for (root, &n) in rows.iter().enumerate() {
            let mut buf = if root == self.rank {
                block.detach().contiguous().copy()
            } else {
                let mut shape = block.size();
                shape[0] = n;
                Tensor::empty(shape.as_slice(), (block.kind(), block.device()))
            };
            if n > 0 {
                pg.broadcast(&mut buf, root)
                    .with_context(|| format!("sending rank {root}'s block of {what} to rank 0"))?;
            }
            if self.is_main() {
                parts.push(buf);
            }
        }
        Ok(self.is_main().then(|| Tensor::cat(&parts, 0)))
    }

    /// Wait for every rank.
    pub fn barrier(&self) -> Result<()> {
        match &self.group {
            Some(pg) => pg.barrier().context("waiting for every rank"),
            None => Ok(()),
        }
    }
}
