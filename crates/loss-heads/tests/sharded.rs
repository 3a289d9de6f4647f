//! The sharded (model-parallel) cross-entropy equals the single-process one: W = 2 and 3 virtual
//! ranks in one process (threads over [`ThreadGroup`]), each holding its block (or its Partial FC
//! sample) of the class rows, give the same loss on every rank as the 1-process loss over the same
//! batch and class set, the exact gradient of every class row, and embedding gradients that sum
//! over ranks to the 1-process gradient; for every head and ArcFace gradient mode, in f64 (to
//! ~1e-10) and f32 (loosely), with sample rates 1 and 0.3; plus a finite-difference check of the
//! sharded gradient, the per-rank sampler, and the error for a row no rank owns.
//!
//! The single-process reference is the unfused `cross_entropy(head.logits_with_norms(..))`.

use facerec_loss_heads::{
    cross_entropy, sharded_cross_entropy, sharded_training_loss, AdaFace, AdaFaceConfig,
    ArcFaceGradient, ClassShard, ClusterGuidedArcFace, Collectives, CurricularFace,
    CurricularFaceConfig, Gce, GceConfig, HeadConfig, MarginHead, PartialFc, PartialFcConfig,
    Sampled, ThreadGroup,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::randn_vec;
use tch::{Kind, Tensor};

const D: i64 = 6;
const STEP: u64 = 7;

/// Every head of the crate but GCE (tested on its own), by a name the tests print.
const HEADS: &[&str] = &[
    "type = 'softmax'",
    "type = 'normface'\ns = 8.0",
    "type = 'sphereface'",
    "type = 'sphereface'\nscale = 'fixed'\ns = 8.0",
    "type = 'cosface'\ns = 8.0\nm = 0.3",
    "type = 'arcface'\ns = 8.0\ngradient = 'exact'",
    "type = 'arcface'\ns = 8.0\ngradient = 'easy_margin'",
    "type = 'arcface'\ns = 8.0\ngradient = 'detached'",
    "type = 'combined'\ns = 8.0\nm1 = 1.0\nm2 = 0.3\nm3 = 0.1",
    "type = 'elastic_arc'\ns = 8.0\nsigma = 0.1\nseed = 3",
    "type = 'elastic_cos'\ns = 8.0\nsigma = 0.1\nseed = 3",
    "type = 'elastic_arc_plus'\ns = 8.0\nsigma = 0.1\nseed = 3",
    "type = 'elastic_cos_plus'\ns = 8.0\nsigma = 0.1\nseed = 3\nassignment = 'code_faithful'",
    "curricularface t = 0.3",
    "adaface mean = 2.0, std = 0.5",
    "type = 'magface'\ns = 8.0\nl_a = 1.0\nu_a = 6.0\nlambda_g = 2.0",
    "cluster_guided exact",
    "cluster_guided detached",
];

/// The cluster-guided margin table `[C]` of the tests: a different margin per class.
fn cluster_margins(c: i64) -> Tensor {
    Tensor::arange(c, (Kind::Double, tch::Device::Cpu)) * 0.03 + 0.2
}

fn cluster_head(spec: &str, c: i64) -> ClusterGuidedArcFace {
    let mode = if spec.ends_with("exact") {
        ArcFaceGradient::Exact
    } else {
        ArcFaceGradient::Detached
    };
    ClusterGuidedArcFace::with_margins(cluster_margins(c), 8.0, mode)
}

/// A fresh head for `spec` at [`STEP`] (each rank builds its own) for a batch of global classes
/// `labels_b` over `c` classes.
fn make_head(spec: &str, labels_b: &Tensor, c: i64) -> Box<dyn MarginHead> {
    let mut head: Box<dyn MarginHead> = match spec {
        _ if spec.starts_with("cluster_guided") => {
            Box::new(cluster_head(spec, c).for_classes(labels_b))
        }
        "curricularface t = 0.3" => {
            let mut h = CurricularFace::new(&CurricularFaceConfig {
                s: 8.0,
                ..Default::default()
            });
            h.set_t(0.3);
            Box::new(h)
        }
        "adaface mean = 2.0, std = 0.5" => {
            let mut h = AdaFace::new(&AdaFaceConfig {
                s: 8.0,
                ..Default::default()
            });
            h.set_statistics(2.0, 0.5);
            Box::new(h)
        }
        toml_text => {
            let cfg: HeadConfig = toml::from_str(toml_text).expect("head config");
            cfg.build()
        }
    };
    head.set_step(STEP);
    head
}

fn is_linear(spec: &str) -> bool {
    spec.contains("softmax")
}

/// The classifier's output for the head: clamped cosines, or `E Wᵀ` for softmax.
fn scores(spec: &str, emb_bd: &Tensor, w_cd: &Tensor) -> Tensor {
    if is_linear(spec) {
        emb_bd.matmul(&w_cd.tr())
    } else {
        let unit = |x: &Tensor| x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        unit(emb_bd).matmul(&unit(w_cd).tr()).clamp(-1.0, 1.0)
    }
}

/// One test problem: `C` classes, the gathered batch's labels, the data as f64 vectors.
struct Problem {
    c: i64,
    labels: Vec<i64>,
    w: Vec<f64>,
    e: Vec<f64>,
    rate: f64,
    kind: Kind,
}

impl Problem {
    fn new(c: i64, labels: &[i64], rate: f64, kind: Kind, seed: u64) -> Self {
        let b = labels.len();
        // Embeddings with norms around 2-4 (SphereFace / AdaFace read them); class rows so that
        // a few targets sit close to their class.
        let mut e: Vec<f64> = randn_vec(seed, b * D as usize)
            .iter()
            .map(|x| x * 1.2)
            .collect();
        let mut w = randn_vec(seed + 1, (c * D) as usize);
        for (i, &y) in labels.iter().enumerate().step_by(2) {
            for k in 0..D as usize {
                e[i * D as usize + k] += 1.5 * w[y as usize * D as usize + k];
            }
        }
        w.iter_mut().for_each(|x| *x *= 0.5);
        Problem {
            c,
            labels: labels.to_vec(),
            w,
            e,
            rate,
            kind,
        }
    }

    fn b(&self) -> i64 {
        self.labels.len() as i64
    }

    fn labels_t(&self) -> Tensor {
        Tensor::from_slice(&self.labels)
    }

    fn w_t(&self) -> Tensor {
        Tensor::from_slice(&self.w)
            .view([self.c, D])
            .to_kind(self.kind)
    }

    fn e_t(&self) -> Tensor {
        Tensor::from_slice(&self.e)
            .view([self.b(), D])
            .to_kind(self.kind)
    }

    /// Rank `rank`'s Partial FC sample of its block (the identity at rate 1).
    fn sample(&self, shard: ClassShard) -> Sampled {
        let mut pfc = PartialFc::new(&PartialFcConfig {
            sample_rate: self.rate,
            seed: 11,
        });
        pfc.set_step(STEP);
        pfc.sample_shard(&self.labels_t(), shard)
    }
}

/// What one rank (or the reference) returns: the loss, the gradient w.r.t. every class row
/// `[C, D]` (zero outside its block) and w.r.t. the gathered embeddings `[B, D]`.
struct Out {
    /// The head's state after the step (CurricularFace's `t`, AdaFace's norm statistics).
    state: Vec<(String, Tensor)>,
    loss: f64,
    grad_w: Tensor,
    grad_e: Tensor,
}

fn rank_step(spec: &str, p: &Problem, comm: &ThreadGroup, world: usize) -> anyhow::Result<Out> {
    let shard = ClassShard::of(p.c, comm.rank(), world);
    let mut head = make_head(spec, &p.labels_t(), p.c);
    let w = p.w_t().set_requires_grad(true);
    let block = w.narrow(0, shard.start, shard.len);
    let sampled = p.sample(shard);
    let e = p.e_t().set_requires_grad(true);
    let cos = scores(spec, &e, &block.index_select(0, &sampled.index));
    let norms = e.norm_scalaropt_dim(2, [1], false);
    let loss = sharded_training_loss(&mut *head, &cos, &sampled.labels, &norms, comm)?;
    let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
    head.end_step();
    Ok(Out {
        state: head.state(),
        loss: loss.double_value(&[]),
        grad_w: g[0].to_kind(Kind::Double),
        grad_e: g[1].to_kind(Kind::Double),
    })
}

/// The W-rank step, one thread per rank.
fn sharded(spec: &str, p: &Problem, world: usize) -> Vec<anyhow::Result<Out>> {
    let groups = ThreadGroup::new(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|comm| scope.spawn(move || rank_step(spec, p, comm, world)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

/// The single-process loss over the same batch and the union of the ranks' samples.
fn replicated(spec: &str, p: &Problem, world: usize) -> Out {
    let index: Vec<Tensor> = (0..world)
        .map(|r| {
            let shard = ClassShard::of(p.c, r, world);
            p.sample(shard).index + shard.start
        })
        .collect();
    let index = Tensor::cat(&index, 0);
    let labels = p
        .labels_t()
        .searchsorted(&index, false, false, "left", None::<Tensor>);
    let w = p.w_t().set_requires_grad(true);
    let e = p.e_t().set_requires_grad(true);
    let cos = scores(spec, &e, &w.index_select(0, &index));
    let norms = e.norm_scalaropt_dim(2, [1], false);
    let (loss, state) = if spec.starts_with("cluster_guided") {
        let head = cluster_head(spec, p.c);
        let logits = head.logits_for_classes(&cos, &labels, &p.labels_t());
        (cross_entropy(&logits, &labels), Vec::new())
    } else {
        let mut head = make_head(spec, &p.labels_t(), p.c);
        let loss = head.training_loss(&cos, &labels, &e, &norms);
        head.end_step();
        (loss, head.state())
    };
    let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
    Out {
        state,
        loss: loss.double_value(&[]),
        grad_w: g[0].to_kind(Kind::Double),
        grad_e: g[1].to_kind(Kind::Double),
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Asserts that the W-rank step equals the 1-process step to `tol` (relative to the gradient
/// scale).
fn check(spec: &str, p: &Problem, world: usize, tol: f64) {
    let want = replicated(spec, p, world);
    let got: Vec<Out> = sharded(spec, p, world)
        .into_iter()
        .map(|r| r.expect("sharded step"))
        .collect();
    let what = format!("{spec:?} W={world} rate={} {:?}", p.rate, p.kind);
    for (r, o) in got.iter().enumerate() {
        assert!(
            (o.loss - want.loss).abs() <= tol * want.loss.abs().max(1.0),
            "{what}: rank {r} loss {} vs {}",
            o.loss,
            want.loss
        );
    }
    for (r, o) in got.iter().enumerate() {
        assert_eq!(o.state.len(), want.state.len(), "{what}: state");
        for ((k, a), (_, b)) in o.state.iter().zip(&want.state) {
            let (a, b) = (a.double_value(&[]), b.double_value(&[]));
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{what}: rank {r} state {k} {a} vs {b}"
            );
        }
    }
    let scale = max_abs(&want.grad_w).max(max_abs(&want.grad_e)).max(1e-3);
    let grad_w = got
        .iter()
        .map(|o| o.grad_w.shallow_clone())
        .reduce(|a, b| a + b)
        .unwrap();
    let grad_e = got
        .iter()
        .map(|o| o.grad_e.shallow_clone())
        .reduce(|a, b| a + b)
        .unwrap();
    // Each rank's class-row gradient is zero outside its block, so the sum is the concatenation.
    for (r, o) in got.iter().enumerate() {
        let shard = ClassShard::of(p.c, r, world);
        let outside = max_abs(&o.grad_w) - max_abs(&o.grad_w.narrow(0, shard.start, shard.len));
        assert!(
            outside <= 0.0,
            "{what}: rank {r} has a gradient outside its block"
        );
    }
    let dw = max_abs(&(&grad_w - &want.grad_w));
    let de = max_abs(&(&grad_e - &want.grad_e));
    assert!(
        dw <= tol * scale,
        "{what}: class-row gradients differ by {dw} (scale {scale})"
    );
    assert!(
        de <= tol * scale,
        "{what}: embedding gradients differ by {de} (scale {scale})"
    );
    assert!(max_abs(&want.grad_e) > 1e-6, "{what}: a trivial gradient");
}

/// Labels over C = 11 (not divisible by 2 or 3), every block with a positive.
const LABELS: &[i64] = &[0, 3, 3, 5, 10, 7, 1, 8, 6, 2];

#[test]
fn every_head_sharded_equals_replicated_f64() {
    for &spec in HEADS {
        for world in [2, 3] {
            for rate in [1.0, 0.3] {
                let p = Problem::new(11, LABELS, rate, Kind::Double, 5);
                check(spec, &p, world, 1e-10);
            }
        }
    }
}

#[test]
fn every_head_sharded_equals_replicated_f32() {
    for &spec in HEADS {
        let p = Problem::new(11, LABELS, 1.0, Kind::Float, 6);
        check(spec, &p, 3, 2e-4);
    }
}

/// With W = 3 and C = 12, every label in the first block: ranks 1 and 2 own no positive (and,
/// sampled, hold negatives only).
#[test]
fn a_rank_without_positives() {
    let labels = [0i64, 1, 2, 3, 0, 2];
    for &spec in HEADS {
        for rate in [1.0, 0.5] {
            let p = Problem::new(12, &labels, rate, Kind::Double, 8);
            check(spec, &p, 3, 1e-10);
        }
    }
}

/// ElasticFace draws its margins for the B gathered rows from the step's stream: the loss is the
/// same for W = 1, 2 and 3, and changes with the step.
#[test]
fn elastic_face_is_independent_of_the_world_size() {
    let spec = "type = 'elastic_arc'\ns = 8.0\nsigma = 0.1\nseed = 3";
    let p = Problem::new(11, LABELS, 1.0, Kind::Double, 9);
    let losses: Vec<f64> = [1, 2, 3]
        .iter()
        .map(|&w| sharded(spec, &p, w)[0].as_ref().expect("step").loss)
        .collect();
    assert!((losses[0] - losses[1]).abs() < 1e-12 && (losses[0] - losses[2]).abs() < 1e-12);
    let mut head = make_head(spec, &p.labels_t(), p.c);
    head.set_step(STEP + 1);
    let cos = scores(spec, &p.e_t(), &p.w_t());
    let other = cross_entropy(&head.logits(&cos, &p.labels_t()), &p.labels_t());
    assert!(
        (other.double_value(&[]) - losses[0]).abs() > 1e-6,
        "the margins did not change"
    );
}

/// A label no rank owns (>= C) is an error on every rank, not a wrong loss.
#[test]
fn a_row_owned_by_no_rank_is_an_error() {
    let mut bad = Problem::new(11, LABELS, 1.0, Kind::Double, 5);
    bad.labels[3] = 11;
    for r in sharded("type = 'arcface'", &bad, 2) {
        let err = format!("{:#}", r.err().expect("an error"));
        assert!(err.contains("no owning rank"), "{err}");
    }
}

/// Finite differences of the global loss vs the sum of the ranks' gradient shares, for W = 2 over
/// C = 5 with the ArcFace exact mode and SphereFace's A-Softmax (norm-dependent target).
#[test]
fn sharded_gradient_matches_finite_differences() {
    let labels = [0i64, 4, 2];
    for spec in [
        "type = 'arcface'\ns = 4.0\ngradient = 'exact'",
        "type = 'sphereface'",
    ] {
        let p = Problem::new(5, &labels, 1.0, Kind::Double, 12);
        let w = p.w_t().set_requires_grad(true);
        let e = p.e_t().set_requires_grad(true);
        let world = 2;
        let f = || {
            let groups = ThreadGroup::new(world);
            let inputs: Vec<(Tensor, Tensor, Tensor)> = (0..world)
                .map(|r| {
                    let shard = ClassShard::of(p.c, r, world);
                    let cos = scores(spec, &e, &w.narrow(0, shard.start, shard.len));
                    let norms = e.norm_scalaropt_dim(2, [1], false);
                    (cos, shard.local_labels(&p.labels_t()), norms)
                })
                .collect();
            let losses: Vec<Tensor> = std::thread::scope(|scope| {
                let handles: Vec<_> = inputs
                    .into_iter()
                    .zip(&groups)
                    .map(|((cos, labels, norms), comm)| {
                        scope.spawn(move || {
                            let head = make_head(spec, &Tensor::from_slice(&[0i64, 4, 2]), 5);
                            sharded_cross_entropy(&*head, &cos, &labels, &norms, comm)
                                .expect("sharded step")
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            // Value: the global loss (rank 0's); gradient: the sum of the ranks' shares.
            let mut total = losses[0].detach();
            for l in &losses {
                total += l - l.detach();
            }
            total
        };
        check_gradients(f, &[("W", &w), ("E", &e)], &GradCheck::default())
            .unwrap_or_else(|err| panic!("{spec}: {err:#}"));
    }
}

/// One shard covering every class samples what the single-process sampler samples; a rank's
/// sample holds its positives, has the documented size, is ascending and local, and is a pure
/// function of (seed, step, labels, shard).
#[test]
fn per_shard_sampling() {
    let labels = Tensor::from_slice(&[3i64, 17, 17, 40, 2, 33]);
    let c = 50;
    let cfg = PartialFcConfig {
        sample_rate: 0.3,
        seed: 4,
    };
    let mut pfc = PartialFc::new(&cfg);
    pfc.set_step(9);
    let one = pfc.sample_shard(&labels, ClassShard::of(c, 0, 1));
    let mut single = PartialFc::new(&cfg);
    single.set_step(9);
    let full = single.sample(&labels, c);
    assert!(one.index.equal(&full.index) && one.labels.equal(&full.labels));

    for world in [2usize, 3] {
        for r in 0..world {
            let shard = ClassShard::of(c, r, world);
            let s = pfc.sample_shard(&labels, shard);
            let again = pfc.sample_shard(&labels, shard);
            assert!(s.index.equal(&again.index), "not deterministic");
            let idx = Vec::<i64>::try_from(&s.index).unwrap();
            assert!(
                idx.windows(2).all(|w| w[0] < w[1]),
                "not ascending: {idx:?}"
            );
            assert!(
                idx.iter().all(|&k| (0..shard.len).contains(&k)),
                "not local"
            );
            let npos = Vec::<i64>::try_from(&labels)
                .unwrap()
                .into_iter()
                .filter(|l| (shard.start..shard.end()).contains(l))
                .collect::<std::collections::BTreeSet<_>>()
                .len() as i64;
            assert_eq!(s.len(), ((0.3 * shard.len as f64).floor() as i64).max(npos));
            let local = Vec::<i64>::try_from(shard.local_labels(&labels)).unwrap();
            let cols = Vec::<i64>::try_from(&s.labels).unwrap();
            for (l, col) in local.iter().zip(&cols) {
                if *l < 0 {
                    assert_eq!(*col, -1);
                } else {
                    assert_eq!(idx[*col as usize], *l, "label remapped wrongly");
                }
            }
        }
        // Another step draws another sample.
        let mut later = PartialFc::new(&cfg);
        later.set_step(10);
        let shard = ClassShard::of(c, 0, world);
        let a = pfc.sample_shard(&labels, shard).index;
        let b = later.sample_shard(&labels, shard).index;
        assert!(
            a.size() != b.size() || !a.equal(&b),
            "the step did not change the sample"
        );
    }
}

/// GCE configurations: defaults (angular margins, ω = 1/(B−1), replacement rate 0.2), additive
/// margins, every prototype of an eligible class replaced (kept and dropped self pairs, attached
/// features), a fixed ω and same-class out-samples.
const GCE: &[&str] = &[
    "s = 8.0",
    "s = 8.0\ntarget_form = 'additive'\nnontarget_form = 'additive'\nm_t = 0.2\nm_n = 0.1",
    "s = 8.0\n[pairwise]\nrate = 1.0\nseed = 2",
    "s = 8.0\n[pairwise]\nrate = 1.0\nself_pair = 'drop'\ndetach = false",
    "s = 8.0\nout_weight = 0.5\nsame_class_out = true\ngradient = 'easy_margin'\n[pairwise]\nrate = 0.6",
];

/// Labels with repeated classes (so the pairwise framework replaces prototypes) over C = 11.
const GCE_LABELS: &[i64] = &[0, 3, 3, 5, 10, 5, 1, 8, 8, 2, 3];

fn gce(spec: &str) -> Gce {
    let cfg: GceConfig = toml::from_str(spec).expect("GCE config");
    let mut g = Gce::new(&cfg);
    g.set_step(STEP);
    g
}

fn gce_rank(spec: &str, p: &Problem, comm: &ThreadGroup, world: usize) -> anyhow::Result<Out> {
    let shard = ClassShard::of(p.c, comm.rank(), world);
    let w = p.w_t().set_requires_grad(true);
    let sampled = p.sample(shard);
    let e = p.e_t().set_requires_grad(true);
    let block = w.narrow(0, shard.start, shard.len);
    let cos = scores("gce", &e, &block.index_select(0, &sampled.index));
    let loss = gce(spec).sharded_step_loss(&cos, &sampled.labels, &p.labels_t(), &e, comm)?;
    let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
    Ok(Out {
        state: Vec::new(),
        loss: loss.double_value(&[]),
        grad_w: g[0].to_kind(Kind::Double),
        grad_e: g[1].to_kind(Kind::Double),
    })
}

/// GCE across ranks equals `Gce::step_loss` over the gathered batch and the union of the samples.
#[test]
fn gce_sharded_equals_replicated() {
    for &spec in GCE {
        for (world, rate, kind, tol) in [
            (2, 1.0, Kind::Double, 1e-10),
            (3, 1.0, Kind::Double, 1e-10),
            (3, 0.5, Kind::Double, 1e-10),
            (2, 1.0, Kind::Float, 2e-4),
        ] {
            let p = Problem::new(11, GCE_LABELS, rate, kind, 21);
            let index: Vec<Tensor> = (0..world)
                .map(|r| {
                    let shard = ClassShard::of(p.c, r, world);
                    p.sample(shard).index + shard.start
                })
                .collect();
            let index = Tensor::cat(&index, 0);
            let labels = p
                .labels_t()
                .searchsorted(&index, false, false, "left", None::<Tensor>);
            let w = p.w_t().set_requires_grad(true);
            let e = p.e_t().set_requires_grad(true);
            let cos = scores("gce", &e, &w.index_select(0, &index));
            let loss = gce(spec).step_loss(&cos, &labels, &e);
            let g = Tensor::run_backward(&[&loss], &[&w, &e], false, false);
            let want = (
                loss.double_value(&[]),
                g[0].to_kind(Kind::Double),
                g[1].to_kind(Kind::Double),
            );
            let groups = ThreadGroup::new(world);
            let got: Vec<Out> = std::thread::scope(|scope| {
                let hs: Vec<_> = groups
                    .iter()
                    .map(|comm| {
                        let p = &p;
                        scope.spawn(move || gce_rank(spec, p, comm, world))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap().expect("GCE step"))
                    .collect()
            });
            let what = format!("GCE {spec:?} W={world} rate={rate} {kind:?}");
            for o in &got {
                assert!(
                    (o.loss - want.0).abs() <= tol * want.0.abs().max(1.0),
                    "{what}: loss {} vs {}",
                    o.loss,
                    want.0
                );
            }
            let gw = got
                .iter()
                .map(|o| o.grad_w.shallow_clone())
                .reduce(|a, b| a + b)
                .unwrap();
            let ge = got
                .iter()
                .map(|o| o.grad_e.shallow_clone())
                .reduce(|a, b| a + b)
                .unwrap();
            let scale = max_abs(&want.1).max(max_abs(&want.2));
            assert!(
                max_abs(&(gw - &want.1)) <= tol * scale,
                "{what}: class-row gradients"
            );
            assert!(
                max_abs(&(ge - &want.2)) <= tol * scale,
                "{what}: embedding gradients"
            );
        }
    }
}

/// `sharded_cross_entropy` refuses GCE (its loss is not a cross-entropy of logits).
#[test]
fn sharded_cross_entropy_refuses_gce() {
    let head = gce("s = 8.0");
    let cos = Tensor::zeros([2, 3], (Kind::Double, tch::Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1]);
    let norms = Tensor::ones([2], (Kind::Double, tch::Device::Cpu));
    let comm = &ThreadGroup::new(1)[0];
    let err = sharded_cross_entropy(&head, &cos, &labels, &norms, comm).unwrap_err();
    assert!(
        format!("{err:#}").contains("Gce::sharded_step_loss"),
        "{err:#}"
    );
}

/// Golden values from the independent torch oracle `data-scripts/oracle_sharded_ce.py` (the
/// ranks simulated block by block: per-block maxima, sums of exponentials, the target from its
/// owner), for softmax and CosFace on column-split matrices, C not divisible by W, and a case
/// where two of three blocks hold no target.
#[test]
fn sharded_softmax_matches_the_torch_oracle() {
    let cases: [(i64, &[i64], usize, f64, f64); 4] = [
        (7, &[0, 6, 3, 3, 5], 2, 1.0, 0.0),
        (7, &[0, 6, 3, 3, 5], 3, 8.0, 0.35),
        (8, &[0, 1, 2, 0], 3, 8.0, 0.35),
        (10, &[9, 4, 1, 7, 7, 0], 4, 16.0, 0.2),
    ];
    let b_max = 6;
    let raw = randn_vec(31, (b_max * 10) as usize);
    let mut req = serde_json::json!({"cases": []});
    let mut inputs = Vec::new();
    for (k, &(c, labels, world, s, m)) in cases.iter().enumerate() {
        let b = labels.len();
        let cos: Vec<Vec<f64>> = (0..b)
            .map(|i| {
                (0..c as usize)
                    .map(|j| (0.45 * raw[(i * 10 + j + k) % raw.len()]).clamp(-1.0, 1.0))
                    .collect()
            })
            .collect();
        req["cases"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
            "cos": cos, "labels": labels, "world": world, "s": s, "m": m}));
        inputs.push((c, labels, world, s, m, cos));
    }
    let ans = facerec_testkit::oracle("oracle_sharded_ce.py", &req);
    for (k, (c, labels, world, s, m, cos)) in inputs.into_iter().enumerate() {
        let o = &ans["cases"][k];
        let spec = if m == 0.0 && s == 1.0 {
            "type = 'softmax'".to_string()
        } else {
            format!("type = 'cosface'\ns = {s:?}\nm = {m:?}")
        };
        let b = labels.len() as i64;
        let flat: Vec<f64> = cos.concat();
        let groups = ThreadGroup::new(world);
        let outs: Vec<(f64, Tensor)> = std::thread::scope(|scope| {
            let hs: Vec<_> = groups
                .iter()
                .map(|comm| {
                    let (spec, flat) = (&spec, &flat);
                    scope.spawn(move || {
                        let shard = ClassShard::of(c, comm.rank(), world);
                        let full = Tensor::from_slice(flat).view([b, c]);
                        let x = full
                            .narrow(1, shard.start, shard.len)
                            .copy()
                            .set_requires_grad(true);
                        let y = Tensor::from_slice(labels);
                        let head = make_head(spec, &y, c);
                        let norms = Tensor::ones([b], (Kind::Double, tch::Device::Cpu));
                        let loss = sharded_cross_entropy(
                            &*head,
                            &x,
                            &shard.local_labels(&y),
                            &norms,
                            comm,
                        )
                        .expect("sharded step");
                        let g = Tensor::run_backward(&[&loss], &[&x], false, false);
                        (loss.double_value(&[]), g[0].shallow_clone())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let what = format!("oracle case {k} ({spec:?}, W = {world})");
        let blocks: Vec<(i64, i64)> = (0..world)
            .map(|r| {
                let sh = ClassShard::of(c, r, world);
                (sh.start, sh.end())
            })
            .collect();
        let oracle_blocks: Vec<(i64, i64)> = o["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
            .collect();
        assert_eq!(blocks, oracle_blocks, "{what}: blocks");
        let loss = o["loss"].as_f64().unwrap();
        for (r, (l, _)) in outs.iter().enumerate() {
            assert!(
                (l - loss).abs() < 1e-10,
                "{what}: rank {r} loss {l} vs {loss}"
            );
        }
        let grads: Vec<Tensor> = outs.iter().map(|(_, g)| g.shallow_clone()).collect();
        let grad = Vec::<f64>::try_from(Tensor::cat(&grads, 1).reshape([-1])).unwrap();
        facerec_testkit::assert_close(
            &format!("{what}: gradient"),
            &grad,
            &facerec_testkit::floats(&o["grad_cos"]),
            1e-9,
            1e-12,
        );
    }
}
