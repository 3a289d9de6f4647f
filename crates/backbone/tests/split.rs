//! The trunk/neck split against the whole forward. A file of its own, so its test binary runs
//! nothing else in parallel: the training-mode check re-seeds torch's global generator and needs
//! the same dropout mask twice, which a concurrent test drawing random numbers would break.

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig, ViTConfig};
use tch::nn::{self, ModuleT};
use tch::Device;

mod common;
use common::{images, max_diff, small};

/// `forward_trunk_t` + `forward_neck_t` is the same network as `forward_t`: in evaluation mode
/// (dropout off), in training mode without dropout, and in training mode with the configured
/// dropout applied by the caller between the halves (same seed, same mask).
#[test]
fn trunk_then_neck_equals_forward() {
    let cfgs = [
        BackboneConfig::Iresnet(IResNetConfig {
            dropout: 0.4,
            ..small()
        }),
        BackboneConfig::Iresnet(small()),
        BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
            embedding_size: 64,
            blocks: [1, 1, 1, 1],
            scale: 1,
            input_size: 56,
            channels_last: false,
        }),
        // Masking and drop path draw from the same re-seeded generator in both passes.
        BackboneConfig::Vit(ViTConfig {
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            patch_size: 8,
            input_size: 56,
            embedding_size: 32,
            drop_path_rate: 0.5,
            mask_ratio: 0.25,
            ..ViTConfig::vit_t()
        }),
    ];
    for cfg in cfgs {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = build(&vs.root(), &cfg);
        let x = images(4, 56);
        let f = model.trunk_width();
        let expected_f = match &cfg {
            BackboneConfig::Iresnet(c) => c.widths[3] * c.final_side() * c.final_side(),
            BackboneConfig::Mobilefacenet(_) => 512,
            BackboneConfig::Vit(c) => c.num_patches() * c.embed_dim,
        };
        assert_eq!(f, expected_f, "{cfg:?}");
        tch::no_grad(|| {
            // Evaluation: dropout off.
            let whole = model.forward_t(&x, false);
            let trunk = model.forward_trunk_t(&x, false);
            assert_eq!(trunk.size(), [4, f]);
            let split = model.forward_neck_t(&trunk, false);
            assert_eq!(max_diff(&whole, &split), 0.0, "eval {cfg:?}");
            // Training: batch statistics; the caller applies the backbone's dropout.
            tch::manual_seed(11);
            let whole = model.forward_t(&x, true);
            tch::manual_seed(11);
            let trunk = model
                .forward_trunk_t(&x, true)
                .dropout(model.dropout(), true);
            let split = model.forward_neck_t(&trunk, true);
            assert_eq!(max_diff(&whole, &split), 0.0, "train {cfg:?}");
        });
    }
}
