//! Fixtures shared by the backbone test binaries.

use facerec_backbone::IResNetConfig;
use tch::{Device, Kind, Tensor};

/// `b` random images of side `s` in [-1, 1].
pub fn images(b: i64, s: i64) -> Tensor {
    Tensor::rand([b, 3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
}

/// A one-block-per-stage iResNet at 56 px.
pub fn small() -> IResNetConfig {
    IResNetConfig {
        depth: None,
        layers: Some([1, 1, 1, 1]),
        widths: [16, 32, 64, 128],
        embedding_size: 128,
        dropout: 0.0,
        input_size: 56,
        channels_last: false,
    }
}

/// Largest absolute elementwise difference.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}
