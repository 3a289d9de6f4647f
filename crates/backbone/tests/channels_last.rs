//! `model.channels_last` changes the memory layout the convolutions run on, not the network: with
//! the same weights, the NHWC and the NCHW runs give the same embedding, the same gradients and
//! the same BatchNorm running statistics up to f32 rounding.

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

mod common;
use common::{images, max_diff, small};

/// Largest `|a - b|` relative to the largest `|b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = f64::try_from(b.abs().max()).unwrap().max(1e-12);
    max_diff(a, b) / scale
}

fn with_layout(cfg: &BackboneConfig, channels_last: bool) -> BackboneConfig {
    let mut cfg = cfg.clone();
    assert!(
        cfg.set_channels_last(channels_last),
        "the ViT has no channels_last key"
    );
    cfg
}

/// One training-mode forward and backward, then an eval forward: the train output, every
/// trainable gradient (sorted by name), the eval output and the running statistics, in f64.
struct Run {
    train: Tensor,
    grads: Vec<(String, Tensor)>,
    eval: Tensor,
    running: Vec<(String, Tensor)>,
}

fn run(
    cfg: &BackboneConfig,
    weights: &nn::VarStore,
    kind: Kind,
    x: &Tensor,
    probe: &Tensor,
) -> Run {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    vs.copy(weights).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    let y = model.forward_t(&x.to_kind(kind), true);
    (&y * probe.to_kind(kind)).sum(kind).backward();
    let sorted = |keep: &dyn Fn(&str, &Tensor) -> bool, grad: bool| {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(n, t)| keep(n, t))
            .map(|(n, t)| {
                let t = if grad { t.grad() } else { t };
                (n, t.detach().to_kind(Kind::Double))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    Run {
        train: y.detach().to_kind(Kind::Double),
        grads: sorted(&|_, t| t.requires_grad(), true),
        eval: tch::no_grad(|| model.forward_t(&x.to_kind(kind), false)).to_kind(Kind::Double),
        running: sorted(
            &|n, _| n.ends_with("running_mean") || n.ends_with("running_var"),
            false,
        ),
    }
}

/// Every value of `r` against the exact run, as a fraction of the largest exact value of its group
/// (all gradients together, all running means together, all running variances together): some
/// are pure rounding, e.g. `bn2.bias` feeds `fc` and then a training-mode BatchNorm, so its exact
/// gradient is 0, and a BatchNorm right after a residual sum of BatchNorm outputs sees mean 0).
fn errors(r: &Run, exact: &Run) -> Vec<(String, f64)> {
    let group = |name: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]| {
        let scale = want
            .iter()
            .map(|(_, t)| f64::try_from(t.abs().max()).unwrap())
            .fold(1e-12, f64::max);
        got.iter()
            .zip(want)
            .map(|((n, a), (m, b))| {
                assert_eq!(n, m);
                (format!("{name} {n}"), max_diff(a, b) / scale)
            })
            .collect::<Vec<_>>()
    };
    let mut e = vec![
        ("train output".to_string(), rel_diff(&r.train, &exact.train)),
        ("eval output".to_string(), rel_diff(&r.eval, &exact.eval)),
    ];
    e.extend(group("gradient", &r.grads, &exact.grads));
    for stat in ["running_mean", "running_var"] {
        let pick = |v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
            v.iter()
                .filter(|(n, _)| n.ends_with(stat))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        e.extend(group("buffer", &pick(&r.running), &pick(&exact.running)));
    }
    e
}

/// With the same weights, the channels-last f32 run is about as close to the exact (f64, NCHW)
/// result as the NCHW f32 run is: the train and eval outputs, every gradient and the running
/// statistics, each within 4x the NCHW error plus 1e-4 of its group's scale. (Measured: at most
/// 7e-6 of the scale; the channels-last BatchNorm statistics are up to ~30x further from exact
/// than NCHW's on values that are themselves rounding, ~3e-7.) A layout mistake (a wrong flatten
/// order, a permuted weight) would be O(1) off.
#[test]
fn channels_last_is_the_same_network_as_nchw() {
    let cfgs = [
        BackboneConfig::Iresnet(IResNetConfig {
            layers: Some([2, 1, 1, 1]),
            ..small()
        }),
        BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
            embedding_size: 64,
            blocks: [1, 2, 1, 1],
            scale: 1,
            input_size: 56,
            channels_last: true,
        }),
    ];
    for cfg in cfgs {
        tch::manual_seed(7);
        let weights = nn::VarStore::new(Device::Cpu);
        build(&weights.root(), &cfg);
        let x = images(6, 56);
        let probe = Tensor::randn([6, cfg.embedding_size()], (Kind::Float, Device::Cpu));
        let exact = run(
            &with_layout(&cfg, false),
            &weights,
            Kind::Double,
            &x,
            &probe,
        );
        let nhwc = errors(
            &run(&with_layout(&cfg, true), &weights, Kind::Float, &x, &probe),
            &exact,
        );
        let nchw = errors(
            &run(&with_layout(&cfg, false), &weights, Kind::Float, &x, &probe),
            &exact,
        );
        for ((what, e_cl), (_, e_cf)) in nhwc.iter().zip(&nchw) {
            assert!(
                *e_cl <= 4.0 * e_cf + 1e-4,
                "{what}: channels-last error {e_cl:.2e}, NCHW error {e_cf:.2e}, {cfg:?}"
            );
        }
    }
}

/// The layout the option relies on: a convolution of an NHWC-strided input returns NHWC-strided
/// output, so the one re-layout at the stem carries through the network.
#[test]
fn a_convolution_keeps_the_channels_last_layout() {
    let vs = nn::VarStore::new(Device::Cpu);
    let conv = nn::conv2d(vs.root(), 3, 8, 3, Default::default());
    let x = images(2, 16);
    let x_cl = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    assert_eq!(x_cl.stride(), [768, 1, 48, 3]);
    let y = nn::Module::forward(&conv, &x_cl);
    assert_eq!(y.stride()[1], 1, "output strides {:?}", y.stride());
    assert!(rel_diff(&y, &nn::Module::forward(&conv, &x)) < 1e-5);
}
