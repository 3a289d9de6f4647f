//! BatchNorm folding for inference (`src/fold.rs`): a folded backbone gives the embeddings of the
//! unfolded one to f32 rounding, for every backbone type, with BatchNorm statistics and affine
//! parameters drawn far from the identity (so a fold that drops the shift or the mean shows); and
//! the same check rejects deliberately wrong folds.

use facerec_backbone::fold::{fold_before_linear, fold_into_conv, fold_into_linear};
use facerec_backbone::{
    build, Backbone, BackboneConfig, FoldReport, IResNetConfig, MobileFaceNetConfig, ViTConfig,
};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

mod common;
use common::{images, max_diff, small};

/// Relative tolerance of a correct fold in f32 (observed: about 1e-7 to 1e-6).
const TOL: f64 = 1e-5;

/// Gives every BatchNorm running statistics and affine parameters far from the identity:
/// weight U(0.5, 1.5), bias N(0, 0.5), mean N(0, 0.5), var U(0.5, 2) (`num_batches_tracked` and a
/// frozen weight, which is not trainable, are set too: the fold must not care).
fn randomise_batch_norms(vs: &nn::VarStore) {
    tch::manual_seed(7);
    let _guard = tch::no_grad_guard();
    for (name, mut t) in vs.variables() {
        let n = t.size();
        let fresh = if name.ends_with("running_mean") || name.ends_with(".bias") {
            Tensor::randn(&n, (Kind::Float, Device::Cpu)) * 0.5
        } else if name.ends_with("running_var") {
            Tensor::rand(&n, (Kind::Float, Device::Cpu)) * 1.5 + 0.5
        } else if name.ends_with(".weight") && n.len() == 1 && !name.contains("prelu") {
            Tensor::rand(&n, (Kind::Float, Device::Cpu)) + 0.5
        } else {
            continue;
        };
        t.copy_(&fresh);
    }
}

/// `max |a - b| / max |b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = f64::try_from((a - b).abs().max()).unwrap();
    d / f64::try_from(b.abs().max()).unwrap()
}

/// A backbone of `cfg` with randomised BatchNorms, its eval-mode output on `x`, and a folded
/// copy (same variables) with its fold report.
fn folded_pair(cfg: &BackboneConfig, x: &Tensor) -> (Tensor, Backbone, FoldReport) {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = build(&vs.root(), cfg);
    randomise_batch_norms(&vs);
    let want = tch::no_grad(|| net.forward_t(x, false));
    // A second backbone with the same values, built under another prefix of the same store.
    let mut folded = build(&(vs.root() / "copy"), cfg);
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if let Some(src) = name.strip_prefix("copy.") {
                t.copy_(&vars[src]);
            }
        }
    });
    let report = folded.fold_batch_norms();
    (want, folded, report)
}

fn configs() -> Vec<(&'static str, BackboneConfig, i64)> {
    vec![
        (
            // [1, 2, 1, 1]: downsample blocks and one identity-shortcut block.
            "iresnet",
            BackboneConfig::Iresnet(IResNetConfig {
                layers: Some([1, 2, 1, 1]),
                ..small()
            }),
            56,
        ),
        (
            // blocks[0] = 2: a residual first stage (blocks[0] = 1 is a plain unit).
            "mobilefacenet",
            BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
                embedding_size: 32,
                blocks: [2, 1, 1, 1],
                scale: 1,
                input_size: 32,
                channels_last: false,
            }),
            32,
        ),
        (
            "vit",
            BackboneConfig::Vit(ViTConfig {
                embed_dim: 16,
                depth: 2,
                num_heads: 4,
                patch_size: 4,
                input_size: 22,
                embedding_size: 8,
                ..ViTConfig::vit_t()
            }),
            22,
        ),
    ]
}

#[test]
fn folded_equals_unfolded_for_every_backbone_type() {
    for (name, cfg, side) in configs() {
        let x = images(5, side);
        let (want, mut folded, report) = folded_pair(&cfg, &x);
        let got = tch::no_grad(|| folded.forward_t(&x, false));
        let rel = rel_diff(&got, &want);
        eprintln!("{name}: {report}; max relative difference {rel:.2e}");
        assert!(rel < TOL, "{name}: folded differs from unfolded by {rel:e}");
        assert!(report.folded > 0, "{name}: nothing folded");
        // The output is not trivially small (the check would then say nothing).
        assert!(f64::try_from(want.abs().max()).unwrap() > 0.1, "{name}");
        // Folding twice folds nothing more and changes nothing.
        let again = folded.fold_batch_norms();
        assert_eq!(again.folded, 0, "{name}");
        let got2 = tch::no_grad(|| folded.forward_t(&x, false));
        assert_eq!(max_diff(&got2, &got), 0.0, "{name}");
    }
}

#[test]
fn fold_reports_what_is_kept() {
    let count = |cfg: &BackboneConfig, side: i64| folded_pair(cfg, &images(2, side)).2;
    let [(_, ires, s1), (_, mbf, s2), (_, vit, s3)] = <[_; 3]>::try_from(configs()).unwrap();
    // iResNet [1, 2, 1, 1]: stem bn1; per block bn2, bn3 (+ downsample BN in the 4 stride-2
    // blocks); bn2 into fc; features. Kept: each block's bn1.
    assert_eq!(
        count(&ires, s1),
        FoldReport {
            folded: 1 + 5 * 2 + 4 + 2,
            kept: 5
        }
    );
    // MobileFaceNet [2, 1, 1, 1]: the BN of every ConvUnit (stem 1, stage 1's two DepthWise blocks
    // 2 x 3, three strided blocks 3 x 3, three one-block residual stages 3 x 3, conv_sep, GDC) and
    // the final BatchNorm1d; nothing kept.
    let r = count(&mbf, s2);
    assert_eq!(r.kept, 0);
    assert_eq!(r.folded, 1 + 6 + 9 + 9 + 2 + 1);
    assert_eq!(count(&vit, s3), FoldReport { folded: 2, kept: 0 });
}

/// A change that makes a correct fold wrong.
type Spoil = fn(&mut Backbone);

#[test]
fn the_check_rejects_wrong_folds() {
    // The same comparison as above must fail for folds that are wrong in a small way.
    let (_, cfg, side) = configs().remove(0);
    let x = images(5, side);
    let fold_variants: [(&str, Spoil); 3] = [
        ("bias dropped", |m| {
            let Backbone::IResNet(n) = m else { panic!() };
            n.stages[1][1].conv2.bs = None;
        }),
        ("running mean ignored", |m| {
            // t = bias instead of bias - mean * s in one conv.
            let Backbone::IResNet(n) = m else { panic!() };
            let block = &mut n.stages[0][0];
            block.conv1.bs = Some(block.bn2.bias.detach().copy());
        }),
        ("scale left out", |m| {
            // The weight of one conv not scaled (the bias right).
            let Backbone::IResNet(n) = m else { panic!() };
            let block = &mut n.stages[2][0];
            let (s, _) = block.bn3.eval_affine();
            let c = s.size()[0];
            let w = block.conv2.ws.to_kind(Kind::Double) / s.view([c, 1, 1, 1]);
            block.conv2.ws = w.to_kind(Kind::Float);
        }),
    ];
    for (what, spoil) in fold_variants {
        let (want, mut folded, _) = folded_pair(&cfg, &x);
        spoil(&mut folded);
        let got = tch::no_grad(|| folded.forward_t(&x, false));
        let rel = rel_diff(&got, &want);
        eprintln!("{what}: relative difference {rel:.2e}");
        assert!(rel > TOL, "{what}: a wrong fold passed the check ({rel:e})");
    }
}

#[test]
fn the_layer_folds_match_their_formulas() {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let mut conv = nn::conv2d(
        &root / "conv",
        4,
        6,
        3,
        nn::ConvConfig {
            padding: 1,
            groups: 2,
            bias: true,
            ..Default::default()
        },
    );
    let mut bn = facerec_backbone::BatchNorm::new(&(&root / "bn"), 6, true);
    let mut lin = nn::linear(&root / "lin", 6 * 9, 5, Default::default());
    let mut bn1d = facerec_backbone::BatchNorm::new(&(&root / "bn1d"), 5, true);
    let mut bn_in = facerec_backbone::BatchNorm::new(&(&root / "bn_in"), 6, true);
    randomise_batch_norms(&vs);
    let x = Tensor::randn([3, 4, 3, 3], (Kind::Float, Device::Cpu));
    let _g = tch::no_grad_guard();
    let flat = |t: Tensor| t.flatten(1, -1);
    let want_conv = bn.forward_t(&conv.forward(&x), false);
    let h = want_conv.shallow_clone();
    let want_lin = bn1d.forward_t(&lin.forward(&flat(bn_in.forward_t(&h, false))), false);

    assert!(fold_into_conv(&mut conv, &mut bn));
    assert!(
        !fold_into_conv(&mut conv, &mut bn),
        "a second fold is refused"
    );
    let got_conv = bn.forward_t(&conv.forward(&x), false);
    assert!(rel_diff(&got_conv, &want_conv) < TOL);
    assert!(fold_before_linear(&mut bn_in, &mut lin));
    assert!(fold_into_linear(&mut lin, &mut bn1d));
    let got_lin = bn1d.forward_t(&lin.forward(&flat(bn_in.forward_t(&h, false))), false);
    assert!(rel_diff(&got_lin, &want_lin) < TOL);
    assert!(bn.is_folded() && bn1d.is_folded() && bn_in.is_folded());
}

#[test]
#[should_panic(expected = "folded")]
fn a_folded_backbone_refuses_training_mode() {
    let (_, cfg, side) = configs().remove(0);
    let x = images(2, side);
    let (_, folded, _) = folded_pair(&cfg, &x);
    let _ = folded.forward_t(&x, true);
}
