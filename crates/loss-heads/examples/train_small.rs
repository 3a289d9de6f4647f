//! Train a small embedding model with a margin head, using only `tch` and this crate.
//!
//! ```text
//! cargo run --release --example train_small -- [head type] [steps]
//! # e.g. arcface (default) | cosface | sphereface | combined | elastic_arc_plus | softmax ...
//! ```
//!
//! Data: 40 synthetic identities in 32-d, an identity code hidden under strong nuisance
//! dimensions (see `synthetic`). Model: two linear layers with a ReLU, producing 16-d embeddings. The
//! last 10 identities are held out: after training, their samples are matched to the closest of
//! their *own* means by cosine (a gallery/probe split), which only works if the embedding
//! generalises beyond the training classes. Partial FC samples half of the classes each step.

use anyhow::Result;
use facerec_loss_heads::{
    classifier::normalize_rows, margin_cross_entropy, Classifier, HeadConfig, PartialFc,
    PartialFcConfig,
};
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};

const IDS: i64 = 40;
const TRAIN_IDS: i64 = 30;
const PER_ID: i64 = 20;
const DIM: i64 = 32;
const EMB: i64 = 16;

/// `[IDS·PER_ID, DIM]` samples and their labels: an 8-d identity code (plus a little
/// within-identity noise) and 24 dimensions of strong nuisance, mixed by a fixed random matrix.
/// Raw cosines are dominated by the nuisance; a model that learns to project it out generalises
/// to identities it never saw.
fn synthetic() -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let code = Tensor::randn([IDS, 1, 8], opts) + Tensor::randn([IDS, PER_ID, 8], opts) * 0.3;
    let nuisance = Tensor::randn([IDS, PER_ID, DIM - 8], opts) * 2.0;
    let mix = Tensor::randn([DIM, DIM], opts) / (DIM as f64).sqrt();
    let x = Tensor::cat(&[code, nuisance], 2).matmul(&mix);
    let labels = Tensor::arange(IDS, (Kind::Int64, Device::Cpu))
        .view([IDS, 1])
        .expand([IDS, PER_ID], false)
        .reshape([-1]);
    (x.reshape([-1, DIM]), labels)
}

/// Probe/gallery accuracy on held-out identities: half of each identity's samples form its
/// gallery mean, the other half are probes matched by cosine.
fn held_out_accuracy(model: &impl Module, x: &Tensor) -> f64 {
    let _guard = tch::no_grad_guard();
    let held = x
        .view([IDS, PER_ID, DIM])
        .narrow(0, TRAIN_IDS, IDS - TRAIN_IDS);
    let emb = normalize_rows(&model.forward(&held.reshape([-1, DIM]))).view([
        IDS - TRAIN_IDS,
        PER_ID,
        EMB,
    ]);
    let gallery = normalize_rows(&emb.narrow(1, 0, PER_ID / 2).mean_dim(1, false, Kind::Float));
    let probes = emb.narrow(1, PER_ID / 2, PER_ID / 2).reshape([-1, EMB]);
    let predicted = probes.matmul(&gallery.tr()).argmax(1, false);
    let truth = Tensor::arange(IDS - TRAIN_IDS, (Kind::Int64, Device::Cpu))
        .view([-1, 1])
        .expand([IDS - TRAIN_IDS, PER_ID / 2], false)
        .reshape([-1]);
    predicted
        .eq_tensor(&truth)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let head_type = args.get(1).map(String::as_str).unwrap_or("arcface");
    let steps: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(300);
    tch::manual_seed(0);
    tch::set_num_threads(1);

    // Any head, from the same TOML a training config would hold; a small scale suits 16-d toys.
    let scale = if head_type == "softmax" {
        String::new()
    } else {
        "s = 16.0".into()
    };
    let mut cfg: HeadConfig = toml::from_str(&format!("type = \"{head_type}\"\n{scale}"))?;
    if let HeadConfig::Sphereface(c) = &mut cfg {
        c.lambda_gamma = 1.0; // anneal within this short run
    }
    cfg.validate()?;
    let mut head = cfg.build();

    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "fc1", DIM, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", 64, EMB, Default::default()));
    let classifier = Classifier::new(
        &(&root / "classifier"),
        cfg.classifier_kind(),
        TRAIN_IDS,
        EMB,
    );
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 0.5,
        seed: 1,
    });
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.05)?;

    let (x, labels) = synthetic();
    let train_x = x.narrow(0, 0, TRAIN_IDS * PER_ID);
    let train_y = labels.narrow(0, 0, TRAIN_IDS * PER_ID);
    println!(
        "head {head_type}: held-out accuracy before training {:.3}",
        held_out_accuracy(&model, &x)
    );
    for step in 0..steps {
        let batch = Tensor::randint(TRAIN_IDS * PER_ID, [64], (Kind::Int64, Device::Cpu));
        let (xb, yb) = (
            train_x.index_select(0, &batch),
            train_y.index_select(0, &batch),
        );
        head.set_step(step);
        pfc.set_step(step);
        let sampled = pfc.sample(&yb, TRAIN_IDS);
        let scores = classifier.scores_sampled(&model.forward(&xb), &sampled);
        let loss = margin_cross_entropy(&*head, &scores, &sampled.labels);
        opt.backward_step(&loss);
        if step % 100 == 0 || step + 1 == steps {
            println!("step {step:4}  loss {:.4}", loss.double_value(&[]));
        }
    }
    println!(
        "head {head_type}: held-out accuracy after training {:.3}",
        held_out_accuracy(&model, &x)
    );
    Ok(())
}
