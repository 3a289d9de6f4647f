//! Evaluation during and after training: the configured targets loaded once into memory (with
//! their raw-pixel baseline), and the model verified on them.

use crate::config::{Config, EvalTarget, SourceConfig};
use crate::log::Logger;
use crate::sources::open_source;
use crate::summary::TargetResult;
use anyhow::{bail, Context, Result};
use facerec_backbone::Backbone;
use facerec_data::Fit;
use facerec_evaluation::images::{decode_all, normalize};
use facerec_evaluation::{
    balanced_pairs, verify_images, BinPack, LfwPairs, PairSet, VerificationReport,
};
use std::path::Path;
use tch::{nn::ModuleT, Device, Tensor};

/// An evaluation set held in memory: Uint8 images `[N, 3, S, S]` (normalised batch by batch) and
/// the pairs over them.
pub struct EvalSet {
    name: String,
    images: Tensor,
    identities: usize,
    pairs: PairSet,
    raw_pixels: VerificationReport,
}

/// The evaluation sets of `cfg` for images of side `size`, and the names of the targets skipped
/// because their (optional) data is missing. Each loaded target is logged with its raw-pixel
/// accuracy.
pub fn load(
    cfg: &Config,
    size: usize,
    workspace: &Path,
    logger: &mut Logger,
) -> Result<(Vec<EvalSet>, Vec<String>)> {
    let mut sets = Vec::new();
    let mut skipped = Vec::new();
    for (i, t) in cfg.eval.targets.iter().enumerate() {
        let key = format!("eval.targets[{i}].source");
        let loaded = load_target(
            t,
            &key,
            size,
            cfg.input.fit,
            cfg.seed ^ 0x5eed,
            cfg.eval.pair_seed,
            workspace,
        )
        .with_context(|| format!("loading eval target `{}`", t.name))?;
        let Some((images, pairs, identities)) = loaded else {
            logger.line(&format!(
                "eval target `{}` skipped: its data was not found",
                t.name
            ));
            skipped.push(t.name.clone());
            continue;
        };
        if pairs.len() < 20 {
            bail!(
                "eval target `{}` yields only {} pairs; it needs identities with 2+ images",
                t.name,
                pairs.len()
            );
        }
        let (raw_pixels, _) = verify_images(&raw_pixel_model, &images, &pairs, cfg.eval.batch_size)
            .with_context(|| format!("eval target `{}`", t.name))?;
        logger.line(&format!(
            "eval target `{}`: {} identities, {} images, {} pairs; raw-pixel accuracy {:.4} ± {:.4}",
            t.name,
            identities,
            images.size()[0],
            pairs.len(),
            raw_pixels.accuracy_mean,
            raw_pixels.accuracy_std
        ));
        sets.push(EvalSet {
            name: t.name.clone(),
            images,
            identities,
            pairs,
            raw_pixels,
        });
    }
    Ok((sets, skipped))
}

/// Verify `backbone` (eval mode, on `device`) on every set.
pub fn evaluate(
    backbone: &Backbone,
    device: Device,
    sets: &[EvalSet],
    batch: usize,
) -> Vec<TargetResult> {
    let model = |x_u8: &Tensor| {
        backbone
            .forward_t(&normalize(&x_u8.to_device(device)), false)
            .to_device(Device::Cpu)
    };
    sets.iter()
        .map(|s| {
            // Checked when the set was loaded (the raw-pixel verification ran on the same pairs).
            let (report, xnorm) = verify_images(&model, &s.images, &s.pairs, batch)
                .expect("pairs and batch size checked when the set was loaded");
            TargetResult {
                name: s.name.clone(),
                identities: s.identities,
                images: s.images.size()[0] as usize,
                model: report,
                xnorm,
                raw_pixels: s.raw_pixels.clone(),
            }
        })
        .collect()
}

fn raw_pixel_model(x_u8: &Tensor) -> Tensor {
    normalize(x_u8).flatten(1, -1)
}

/// Images `[N, 3, S, S]` Uint8 (fitted by `fit`, as the training data), the pairs to verify with
/// their folds, and the identity count, for one target. `Ok(None)` when its shared data is missing
/// and it is not required.
fn load_target(
    t: &EvalTarget,
    key: &str,
    size: usize,
    fit: Fit,
    seed: u64,
    pair_seed: u64,
    workspace: &Path,
) -> Result<Option<(Tensor, PairSet, usize)>> {
    let threads = facerec_data::cores();
    let none = &|| {};
    Ok(Some(match &t.source {
        SourceConfig::Bin { path } => {
            let pack = BinPack::read(path).with_context(|| format!("config key `{key}.path`"))?;
            let images = pack
                .decode(size as u32, fit, threads, none)
                .with_context(|| format!("decoding {}", path.display()))?;
            (images, pack.pair_set(), 0)
        }
        SourceConfig::LfwPairs { pairs, images } => {
            let set = LfwPairs::read(pairs)
                .and_then(|p| p.resolve(images))
                .with_context(|| format!("config key `{key}`"))?;
            (set.decode(size as u32, fit, threads, none)?, set.pairs, 0)
        }
        other => {
            let Some(source) = open_source(other, size, fit, workspace, seed, key, t.required)?
            else {
                return Ok(None);
            };
            let images = decode_all(source.len(), size, threads, &|i| source.load(i), none)?;
            let labels: Vec<usize> = (0..source.len()).map(|i| source.label(i)).collect();
            (
                images,
                PairSet::contiguous(balanced_pairs(&labels, pair_seed)),
                source.num_classes(),
            )
        }
    }))
}
