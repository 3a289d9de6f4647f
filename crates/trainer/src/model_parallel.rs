//! Model-parallel classifier (`classifier.sharding = "model_parallel"`, docs/distributed.md):
//! rank r holds only its contiguous block of class rows ([`ClassShard`]) and their optimiser
//! state. A step gathers every rank's embeddings and labels, computes the cosines of the whole
//! gathered batch against the block (or its Partial FC sample), and the cross-entropy across
//! ranks (`facerec_loss_heads::sharded_cross_entropy`); the backward runs in two phases (to the
//! gathered embeddings, whose gradient is summed over ranks and sliced to this rank's rows, then
//! through the backbone), see `step.rs`.
//!
//! What stays world-size independent:
//! - the initial classifier: rows are drawn in fixed chunks of [`INIT_CHUNK`] rows, chunk `k`
//!   from a generator seeded by `(seed, k)`, so a block is the same rows of the same matrix
//!   whatever the number of ranks (also for one process with `sharding = "model_parallel"`);
//! - checkpoints and `classifier.safetensors`: the blocks (and the optimiser's classifier state)
//!   are gathered to rank 0 and written as one whole tensor each, exactly what one process writes;
//!   a resumed run takes its own block of them, for any number of ranks.

use crate::config::{Config, Sharding};
use crate::world::World;
use anyhow::{bail, Result};
use facerec_distributed::ReduceOp;
use facerec_loss_heads::{ClassShard, Classifier, ClassifierKind, Collectives};
use tch::{nn, Tensor};

/// Rows per chunk of the world-size-independent classifier initialisation.
pub const INIT_CHUNK: i64 = 4096;

/// This rank's block of the classifier when the run is model parallel, `None` when replicated.
/// Refuses fewer classes than ranks, naming `classifier.sharding`. Every objective runs model
/// parallel (margin softmax with every head, CoReFace, cluster-guided; docs/distributed.md).
pub fn shard_of(cfg: &Config, num_classes: usize, world: &World) -> Result<Option<ClassShard>> {
    if cfg.classifier.sharding_for(world.size()) == Sharding::Replicated {
        return Ok(None);
    }
    if num_classes < world.size() {
        bail!(
            "config key `classifier.sharding`: {num_classes} classes cannot be split over {} processes (every rank needs at least one class row); use classifier.sharding = \"replicated\" or fewer processes",
            world.size()
        );
    }
    Ok(Some(ClassShard::of(
        num_classes as i64,
        world.rank(),
        world.size(),
    )))
}

/// The block lengths of every rank, in rank order.
pub fn block_rows(shard: ClassShard, world: usize) -> Vec<i64> {
    (0..world)
        .map(|r| ClassShard::of(shard.num_classes, r, world).len)
        .collect()
}

/// The block of *weight rows* of a block of classes when the classifier holds `rows_per_class`
/// rows per class (sub-center ArcFace: class `c` in rows `c·K .. c·K + K`, so the owner of a
/// class holds all its `K` rows, contiguously). What the storage paths (initialisation, gather,
/// checkpoint rows) take; the loss takes the class block itself.
pub fn row_block(shard: ClassShard, rows_per_class: i64) -> ClassShard {
    ClassShard {
        start: shard.start * rows_per_class,
        len: shard.len * rows_per_class,
        num_classes: shard.num_classes * rows_per_class,
    }
}

/// `(start, len, num_classes)` of a shard, as `checkpoint::load_exact_rows` takes it.
pub fn rows(shard: ClassShard) -> (i64, i64, i64) {
    (shard.start, shard.len, shard.num_classes)
}

/// Seed of chunk `k` of the classifier initialisation.
fn chunk_seed(seed: u64, k: i64) -> i64 {
    (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        as i64
        & i64::MAX
}

/// Overwrite the classifier variables of `head_vs` (this rank's block, `[shard.len, ...]`) with
/// rows `[shard.start, shard.end())` of the world-size-independent initial classifier: chunk `k`
/// of [`INIT_CHUNK`] rows is what `Classifier::new` draws for that many rows after
/// `manual_seed(chunk_seed(seed, k))`. Leaves torch's global generator reseeded.
pub fn init_block(
    head_vs: &nn::VarStore,
    kind: ClassifierKind,
    shard: ClassShard,
    d: i64,
    seed: u64,
) {
    let _guard = tch::no_grad_guard();
    // Sub-centres: the block's K·len rows, drawn like a plain cosine classifier of K·C rows.
    let (kind, shard) = match kind {
        ClassifierKind::SubCenter(k) => (ClassifierKind::Cosine, row_block(shard, k)),
        other => (other, shard),
    };
    let first = shard.start / INIT_CHUNK;
    let last = (shard.end() - 1).max(shard.start) / INIT_CHUNK;
    let mut vars: Vec<(String, Tensor)> = head_vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for k in first..=last {
        let c0 = k * INIT_CHUNK;
        let n = INIT_CHUNK.min(shard.num_classes - c0);
        tch::manual_seed(chunk_seed(seed, k));
        let vs = nn::VarStore::new(head_vs.device());
        let _c = Classifier::new(&vs.root(), kind, n, d);
        let chunk = vs.variables();
        // The overlap of rows [c0, c0 + n) with the block.
        let lo = c0.max(shard.start);
        let hi = (c0 + n).min(shard.end());
        if hi <= lo {
            continue;
        }
        for (name, var) in &vars {
            let src = chunk[name].narrow(0, lo - c0, hi - lo);
            let mut dst = var.narrow(0, lo - shard.start, hi - lo);
            dst.copy_(&src);
        }
    }
}

/// The whole classifier on rank 0 (`None` elsewhere): every variable of `head_vs` gathered
/// block by block, named as one process names them.
pub fn gather_classifier(
    world: &World,
    head_vs: &nn::VarStore,
    shard: ClassShard,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let mut vars: Vec<(String, Tensor)> = head_vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    gather_named(world, vars, shard, "the classifier")
}

/// The optimiser state on rank 0 (`None` elsewhere) with the classifier group's buffers
/// (`g{group}.*`) gathered whole; the other entries are every rank's own (the same everywhere).
pub fn gather_optimizer_state(
    world: &World,
    state: Vec<(String, Tensor)>,
    group: usize,
    shard: ClassShard,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let prefix = format!("g{group}.");
    let (mut sharded, rest): (Vec<_>, Vec<_>) =
        state.into_iter().partition(|(k, _)| k.starts_with(&prefix));
    sharded.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(
        gather_named(world, sharded, shard, "the classifier's optimiser state")?.map(|mut full| {
            full.extend(rest);
            full
        }),
    )
}

fn gather_named(
    world: &World,
    named: Vec<(String, Tensor)>,
    shard: ClassShard,
    what: &str,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let lens = block_rows(shard, world.size());
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in named {
        if let Some(full) = world.gather_rows_to_main(&t, &lens, &format!("{what} `{name}`"))? {
            out.push((name, full));
        }
    }
    Ok(world.is_main().then_some(out))
}

/// The classifier group's entries (`g{group}.*`) of a whole optimiser state narrowed to this
/// rank's block; the other entries as they are.
pub fn narrow_optimizer_state(
    state: std::collections::HashMap<String, Tensor>,
    group: usize,
    shard: ClassShard,
    origin: &std::path::Path,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let prefix = format!("g{group}.");
    let (sharded, mut rest): (
        std::collections::HashMap<_, _>,
        std::collections::HashMap<_, _>,
    ) = state.into_iter().partition(|(k, _)| k.starts_with(&prefix));
    rest.extend(crate::checkpoint::narrow_rows(
        sharded,
        rows(shard),
        origin,
    )?);
    Ok(rest)
}

/// [`Collectives`] over the run's process group (identity in a world of one).
impl Collectives for World {
    fn rank(&self) -> usize {
        World::rank(self)
    }

    fn world_size(&self) -> usize {
        self.size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut out = t.detach().contiguous().copy();
        self.all_reduce(&mut out, ReduceOp::Sum, "a sharded softmax statistic (sum)")?;
        Ok(out)
    }

    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor> {
        let mut out = t.detach().contiguous().copy();
        self.all_reduce(&mut out, ReduceOp::Max, "a sharded softmax statistic (max)")?;
        Ok(out)
    }
}
