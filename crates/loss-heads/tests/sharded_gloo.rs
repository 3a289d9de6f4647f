//! The sharded cross-entropy over real Gloo collectives: 2 and 3 processes on 127.0.0.1 (a port
//! free at run time), each holding its block (or its Partial FC sample) of the class rows. Every
//! rank computes its shard's loss and gradients with `sharded_training_loss` (GCE:
//! `Gce::sharded_step_loss`) and checks them against the single-process values it computes
//! itself: the loss, its own class rows' gradient, and the all-reduced sum of the ranks'
//! embedding gradients. A rank that finds a difference exits non-zero with the message.
//!
//! The spawn harness is facerec-distributed's (`crates/distributed/tests/common`, included by
//! path): children bounded in time and killed when a case ends or fails.
//! Run: `cargo test --release -p facerec-loss-heads --test sharded_gloo`.

#[path = "../../distributed/tests/common/mod.rs"]
mod common;

use anyhow::{ensure, Context, Result};
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use facerec_loss_heads::{
    cross_entropy, sharded_training_loss, ClassShard, Collectives, Gce, GceConfig, HeadConfig,
    MarginHead, PartialFc, PartialFcConfig,
};
use facerec_testkit::randn_vec;
use std::time::Duration;
use tch::{Kind, Tensor};

/// [`Collectives`] over a Gloo process group.
struct Gloo<'a>(&'a ProcessGroup);

impl Gloo<'_> {
    fn reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut out = t.detach().copy();
        self.0.all_reduce(&mut out, op)?;
        Ok(out)
    }
}

impl Collectives for Gloo<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, ReduceOp::Sum)
    }
    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, ReduceOp::Max)
    }
}

const C: i64 = 13;
const D: i64 = 6;
const STEP: u64 = 3;
const LABELS: &[i64] = &[0, 4, 4, 12, 7, 9, 1, 9, 5, 2, 11];
const HEADS: &[&str] = &[
    "type = 'arcface'\ns = 8.0",
    "type = 'sphereface'",
    "type = 'curricularface'\ns = 8.0",
    "type = 'elastic_arc_plus'\ns = 8.0\nsigma = 0.1\nseed = 5",
    "gce",
];
const GCE: &str = "s = 8.0\n[pairwise]\nrate = 1.0";

fn data() -> (Tensor, Tensor, Tensor) {
    let b = LABELS.len() as i64;
    let w = Tensor::from_slice(&randn_vec(40, (C * D) as usize)).view([C, D]);
    let e = Tensor::from_slice(&randn_vec(41, (b * D) as usize)).view([b, D]) * 1.5;
    let labels = Tensor::from_slice(LABELS);
    let e = e + w.index_select(0, &labels) * 1.2;
    (w, e, labels)
}

fn cosines(e: &Tensor, w: &Tensor) -> Tensor {
    let unit = |x: &Tensor| x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    unit(e).matmul(&unit(w).tr()).clamp(-1.0, 1.0)
}

fn head(spec: &str) -> Box<dyn MarginHead> {
    let cfg: HeadConfig = toml::from_str(spec).expect("head config");
    let mut h = cfg.build();
    h.set_step(STEP);
    h
}

fn gce() -> Gce {
    let mut g = Gce::new(&toml::from_str::<GceConfig>(GCE).expect("GCE config"));
    g.set_step(STEP);
    g
}

fn sampler(rate: f64) -> PartialFc {
    let mut p = PartialFc::new(&PartialFcConfig {
        sample_rate: rate,
        seed: 9,
    });
    p.set_step(STEP);
    p
}

/// Loss and gradients (class rows `[C, D]`, embeddings `[B, D]`) of one process over the union of
/// every rank's sample.
fn reference(spec: &str, rate: f64, world: usize) -> (f64, Tensor, Tensor) {
    let (w, e, labels) = data();
    let mut pfc = sampler(rate);
    let index: Vec<Tensor> = (0..world)
        .map(|r| {
            let shard = ClassShard::of(C, r, world);
            pfc.sample_shard(&labels, shard).index + shard.start
        })
        .collect();
    let index = Tensor::cat(&index, 0);
    let pos = labels.searchsorted(&index, false, false, "left", None::<Tensor>);
    let w = w.set_requires_grad(true);
    let e = e.set_requires_grad(true);
    let cos = cosines(&e, &w.index_select(0, &index));
    let norms = e.norm_scalaropt_dim(2, [1], false);
    let loss = if spec == "gce" {
        gce().step_loss(&cos, &pos, &e)
    } else {
        let h = head(spec);
        cross_entropy(&h.logits_with_norms(&cos, &pos, &norms), &pos)
    };
    let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
    (
        loss.double_value(&[]),
        g[0].shallow_clone(),
        g[1].shallow_clone(),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn worker() -> Result<()> {
    let rv = Rendezvous::from_env()?;
    let pg = ProcessGroup::new(&rv, Backend::Gloo)?;
    let comm = Gloo(&pg);
    let (rank, world) = (pg.rank(), pg.world_size());
    let shard = ClassShard::of(C, rank, world);
    for &spec in HEADS {
        for rate in [1.0, 0.3] {
            let what = format!("rank {rank}/{world} {spec:?} rate {rate}");
            let (w, e, labels) = data();
            let sampled = sampler(rate).sample_shard(&labels, shard);
            let w = w.set_requires_grad(true);
            let e = e.set_requires_grad(true);
            let block = w.narrow(0, shard.start, shard.len);
            let cos = cosines(&e, &block.index_select(0, &sampled.index));
            let norms = e.norm_scalaropt_dim(2, [1], false);
            let loss = if spec == "gce" {
                gce().sharded_step_loss(&cos, &sampled.labels, &labels, &e, &comm)
            } else {
                sharded_training_loss(&mut *head(spec), &cos, &sampled.labels, &norms, &comm)
            }
            .with_context(|| what.clone())?;
            let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
            let grad_e = comm.all_reduce_sum(&g[1])?;
            let (want, want_w, want_e) = reference(spec, rate, world);
            let got = loss.double_value(&[]);
            ensure!((got - want).abs() < 1e-10, "{what}: loss {got} vs {want}");
            // This rank's gradient is the reference's on its block and zero elsewhere.
            let in_block = Tensor::zeros([C, 1], (Kind::Double, tch::Device::Cpu)).index_fill(
                0,
                &(Tensor::arange(shard.len, (Kind::Int64, tch::Device::Cpu)) + shard.start),
                1.0,
            );
            let dw = max_diff(&g[0], &(want_w * in_block));
            ensure!(dw < 1e-10, "{what}: class-row gradients differ by {dw}");
            let de = max_diff(&grad_e, &want_e);
            ensure!(
                de < 1e-10,
                "{what}: summed embedding gradients differ by {de}"
            );
        }
    }
    Ok(())
}

fn spawn(world: usize) {
    let ranks = common::Ranks::spawn("sharded", world, common::free_port(), |_| {
        vec![("FACEREC_DIST_TIMEOUT".into(), "30".into())]
    });
    ranks.expect_success(Duration::from_secs(120));
}

fn sharded_2_processes() {
    spawn(2);
}

fn sharded_3_processes() {
    spawn(3);
}

fn main() {
    common::main(
        &[
            ("sharded_2_processes", sharded_2_processes),
            ("sharded_3_processes", sharded_3_processes),
        ],
        &[("sharded", worker)],
    );
}
