//! The tch side of evaluation: embed images with insightface's flip test and hand the normalised embeddings
//! to the verification protocol (SPEC 6.1, steps 1, 2 and 9).
//!
//! `e = normalize(f(x) + f(flip_w(x)))`: the sum is taken before normalising; a zero sum stays zero (as
//! sklearn's `normalize`). XNorm follows insightface's `test()`: the mean L2 norm of every un-normalised
//! model output, the original *and* the flipped pass (2N norms), never of the sum.

use tch::{Device, Kind, Tensor};

use crate::pairs::{Pair, PairSet};
use crate::verification::{verify_distances, VerificationReport};

/// Embed images with the flip test and normalise: `e = normalize(f(x) + f(flip_w(x)))`.
///
/// `model` maps a `[b, 3, H, W]` batch to `[b, D]` (put the model in eval mode, e.g.
/// `&|x| net.forward_t(x, false)`); it runs under `no_grad` here, on the device of `images`, in batches of
/// `batch_size`. Returns the `[N, D]` f32 embeddings on the CPU and XNorm, the mean L2 norm of the 2N
/// un-normalised outputs `f(x)` and `f(flip_w(x))`.
///
/// # Shapes
/// `images`: `[N, 3, H, W]` float; returns `[N, D]` Float on `Device::Cpu`.
///
/// # Panics
/// If `images` is not `[N, 3, H, W]` with `N > 0`, `batch_size < 1`, or the model returns anything but
/// `[b, D]` for a batch of `b`.
pub fn embed_with_flip(
    model: &dyn Fn(&Tensor) -> Tensor,
    images: &Tensor,
    batch_size: i64,
) -> (Tensor, f64) {
    let size = images.size();
    assert!(
        size.len() == 4 && size[1] == 3 && size[0] > 0,
        "embed_with_flip: images must be [N>0, 3, H, W], got {size:?}"
    );
    assert!(
        batch_size > 0,
        "embed_with_flip: batch_size {batch_size} < 1"
    );
    let n = size[0];
    let _guard = tch::no_grad_guard();
    let run = |x: &Tensor| {
        let out = model(x);
        let b = x.size()[0];
        assert!(
            out.dim() == 2 && out.size()[0] == b,
            "embed_with_flip: model returned {:?} for a batch of {b}",
            out.size()
        );
        out.to_kind(Kind::Float)
    };
    let (mut chunks, mut norm_sum) = (Vec::new(), 0.0);
    for start in (0..n).step_by(batch_size as usize) {
        let x = images.narrow(0, start, batch_size.min(n - start));
        let (out, out_flip) = (run(&x), run(&x.flip([3])));
        for o in [&out, &out_flip] {
            let norms = o.to_kind(Kind::Double).norm_scalaropt_dim(2.0, [1], false);
            norm_sum += f64::try_from(norms.sum(Kind::Double)).expect("scalar norm sum");
        }
        chunks.push(l2_normalize(&(out + out_flip)).to_device(Device::Cpu));
    }
    (Tensor::cat(&chunks, 0), norm_sum / (2 * n) as f64)
}

/// Row-wise L2 normalisation; rows of norm 0 are left as they are.
///
/// # Shapes
/// `x`: `[N, D]`; returns `[N, D]`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2.0, [1], true);
    x / norm.masked_fill(&norm.eq(0.0), 1.0)
}

/// Embed (flip test) and run the verification protocol on pairs of image rows, with the pair set's own
/// folds (the one fold rule, see [`PairSet`]). Returns the report and XNorm (see [`embed_with_flip`]).
///
/// # Shapes
/// `images`: `[N, 3, H, W]` float; pair indices are rows of `images`.
///
/// # Errors
/// When `batch_size < 1`, or the pair set has fewer pairs than folds ([`PairSet::check`]).
///
/// # Panics
/// As [`embed_with_flip`] for a malformed `images` tensor or model, and if a pair index is `>= N`.
pub fn verify_images(
    model: &dyn Fn(&Tensor) -> Tensor,
    images: &Tensor,
    pairs: &PairSet,
    batch_size: usize,
) -> anyhow::Result<(VerificationReport, f64)> {
    anyhow::ensure!(
        batch_size >= 1,
        "evaluation batch size must be at least 1, got 0"
    );
    pairs.check()?;
    let (emb, xnorm) = embed_with_flip(model, images, batch_size as i64);
    let dist = pair_distances(&emb, &pairs.pairs);
    Ok((verify_distances(&dist, &pairs.issame(), pairs.folds), xnorm))
}

/// Squared distances `||e_a - e_b||^2` of embedding rows for each pair, in f64 (as
/// [`crate::verification::squared_distances`]), for pair lists that index shared images (LFW `pairs.txt`).
///
/// The rows are read in place from one CPU copy of `emb`: memory is `N x D`, not `2P x D`. (Gathering
/// both rows of every pair first held 3.9 GB for the raw-pixel baseline of a 25,800-pair folder target
/// at 56 px, whose 1,470 images take 55 MB.)
///
/// # Shapes
/// `emb`: `[N, D]` Float on any device.
///
/// # Panics
/// If a pair index is `>= N`.
pub fn pair_distances(emb: &Tensor, pairs: &[Pair]) -> Vec<f64> {
    let (n, dim) = (emb.size()[0] as usize, emb.size()[1] as usize);
    assert!(
        pairs.iter().all(|p| p.a < n && p.b < n),
        "pair_distances: a pair index is out of range for {n} rows"
    );
    let flat = Vec::<f32>::try_from(
        emb.to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous()
            .flatten(0, -1),
    )
    .expect("f32 embeddings");
    let row = |i: usize| &flat[i * dim..(i + 1) * dim];
    pairs
        .iter()
        .map(|p| crate::verification::squared_distance(row(p.a), row(p.b)))
        .collect()
}
