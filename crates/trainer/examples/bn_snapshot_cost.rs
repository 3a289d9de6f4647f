//! What the NaN guard's per-step copy of the BatchNorm buffers costs: builds an IResNet-50
//! state (112x112 input, 512-d embedding, 1000 classes) on the CPU and times
//! [`State::snapshot_buffers`] + [`State::restore_buffers`], next to one forward + backward of a
//! batch of 8. Run: `cargo run --release -p facerec-trainer --example bn_snapshot_cost`.

use facerec_trainer::config::Config;
use facerec_trainer::state::State;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let cfg = Config::load(
        None,
        &[
            "model.layers=[3, 4, 14, 3]".into(),
            "model.widths=[64, 128, 256, 512]".into(),
            "model.embedding_size=512".into(),
            "model.input_size=112".into(),
        ],
    )?;
    let st = State::new(&cfg, 1000, Device::Cpu);
    let snap = st.snapshot_buffers();
    let elems: i64 = snap.iter().map(|(t, _)| t.numel() as i64).sum();
    let reps = 200;
    let t0 = Instant::now();
    for _ in 0..reps {
        let mut s = st.snapshot_buffers();
        State::restore_buffers(&mut s);
    }
    let copy_ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let x = Tensor::randn([8, 3, 112, 112], (Kind::Float, Device::Cpu));
    let t1 = Instant::now();
    let y = st.backbone.forward_t(&x, true);
    y.sum(Kind::Float).backward();
    let step_ms = t1.elapsed().as_secs_f64() * 1e3;
    println!("{} buffers, {elems} elements; snapshot + restore {copy_ms:.3} ms; forward + backward of 8 images {step_ms:.0} ms", snap.len());
    Ok(())
}
