//! GCE's pairwise framework on P x K batches that repeat an image (an identity with fewer than K
//! images is padded with copies, `facerec-data`'s sampler): a copy of the replacing image is its
//! self pair, never a pair. Without the images' indices (the old draw), the same batch pairs a
//! copy with itself (similarity 1), which the first test shows before checking the fix.

use facerec_loss_heads::{Gce, GceConfig, MarginHead, PairwiseConfig, Replacement, SelfPair};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tch::Tensor;

const D: i64 = 6;
const C: i64 = 3;
/// Class 0: four distinct images; class 1: image 20 three times and image 21 once (padded);
/// class 2: one image four times.
const LABELS: [i64; 12] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
const IMAGES: [usize; 12] = [10, 11, 12, 13, 20, 20, 21, 20, 30, 30, 30, 30];

fn gce(self_pair: SelfPair) -> Gce {
    Gce::new(&GceConfig {
        s: 16.0,
        pairwise: PairwiseConfig {
            rate: 1.0,
            min_count: 2,
            self_pair,
            ..Default::default()
        },
        ..Default::default()
    })
}

/// Embeddings `[12, D]` (one random row per distinct image, so copies are equal rows: a copy
/// without a flip) and clamped cosines to `C` random prototypes, f64.
fn batch() -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut row_of = std::collections::HashMap::new();
    let mut emb = Vec::new();
    for &im in &IMAGES {
        let row: &Vec<f64> = row_of
            .entry(im)
            .or_insert_with(|| (0..D).map(|_| rng.sample(StandardNormal)).collect());
        emb.extend_from_slice(row);
    }
    let emb = Tensor::from_slice(&emb).view([12, D]);
    let w: Vec<f64> = (0..C * D).map(|_| rng.sample(StandardNormal)).collect();
    let w = Tensor::from_slice(&w).view([C, D]);
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [1], true);
    let cos = unit(&emb).matmul(&unit(&w).tr()).clamp(-1.0, 1.0);
    (emb, cos)
}

/// For every replaced class, the rows holding the replacing image (the sample and its copies).
fn self_rows(rep: &Replacement, r: usize) -> Vec<usize> {
    let j = rep.samples[r] as usize;
    (0..IMAGES.len())
        .filter(|&k| IMAGES[k] == IMAGES[j])
        .collect()
}

#[test]
fn a_padded_copy_is_never_paired_with_itself() {
    let (emb, cos) = batch();
    let labels = Tensor::from_slice(&LABELS);
    // Before: the draw without image indices picks any row and pairs the other copies with it.
    let mut old_self_pairs = 0;
    for step in 0..16 {
        let mut g = gce(SelfPair::KeepPrototype);
        g.set_step(step);
        let rep = g.draw_replacement(&labels);
        assert!(rep.copies.is_empty());
        let (new, _) = g.replace_prototypes(&cos, &emb, &rep);
        for (r, &c) in rep.classes.iter().enumerate() {
            for k in self_rows(&rep, r)
                .into_iter()
                .filter(|&k| k as i64 != rep.samples[r])
            {
                assert!((new.double_value(&[k as i64, c]) - 1.0).abs() < 1e-12);
                old_self_pairs += 1;
            }
        }
    }
    assert!(
        old_self_pairs > 0,
        "the old draw pairs copies with themselves on this batch"
    );

    // After: with the images' indices.
    let mut picks_in_class_1 = std::collections::BTreeSet::new();
    for step in 0..16 {
        for self_pair in [SelfPair::KeepPrototype, SelfPair::Drop] {
            let mut g = gce(self_pair);
            g.set_step(step);
            let rep = g.draw_replacement_for_images(&labels, Some(&IMAGES));
            // Class 2 holds one image: not eligible under min_count 2. Classes 0 and 1 are (rate 1).
            assert_eq!(rep.classes, vec![0, 1], "step {step}");
            picks_in_class_1.insert(rep.samples[1]);
            // The copies are exactly the other rows of each replacing image.
            for r in 0..rep.classes.len() {
                let mut want: Vec<(i64, usize)> = self_rows(&rep, r)
                    .into_iter()
                    .filter(|&k| k as i64 != rep.samples[r])
                    .map(|k| (k as i64, r))
                    .collect();
                let mut got: Vec<(i64, usize)> =
                    rep.copies.iter().copied().filter(|c| c.1 == r).collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "step {step} class {}", rep.classes[r]);
            }
            let (new, valid) = g.replace_prototypes(&cos, &emb, &rep);
            for (r, &c) in rep.classes.iter().enumerate() {
                for k in self_rows(&rep, r) {
                    let k = k as i64;
                    match self_pair {
                        SelfPair::KeepPrototype => {
                            assert_eq!(
                                new.double_value(&[k, c]),
                                cos.double_value(&[k, c]),
                                "row {k} class {c}"
                            )
                        }
                        SelfPair::Drop => assert_eq!(valid.double_value(&[k]), 0.0, "row {k}"),
                    }
                }
            }
            // Every other row of a replaced class meets the replacing feature (a real pair < 1).
            for (r, &c) in rep.classes.iter().enumerate() {
                for k in (0..12)
                    .filter(|&k| LABELS[k] == c && IMAGES[k] != IMAGES[rep.samples[r] as usize])
                {
                    assert!(new.double_value(&[k as i64, c]) < 1.0 - 1e-6);
                }
            }
        }
    }
    // The pick is uniform over distinct images (first rows 4 and 6), never a later copy.
    assert_eq!(picks_in_class_1.into_iter().collect::<Vec<_>>(), vec![4, 6]);
}

/// Through the head interface: `set_batch_images` then `training_loss` is the loss of the
/// image-aware draw, and differs from the old one on this batch; with distinct images the draw
/// is the old draw exactly.
#[test]
fn the_trainer_path_uses_the_images() {
    let (emb, cos) = batch();
    let labels = Tensor::from_slice(&LABELS);
    let norms = emb.norm_scalaropt_dim(2, [1], false);
    let mut head = gce(SelfPair::KeepPrototype);
    let mut direct = gce(SelfPair::KeepPrototype);
    let mut old = gce(SelfPair::KeepPrototype);
    let mut differs = false;
    for step in 0..8 {
        head.set_step(step);
        direct.set_step(step);
        old.set_step(step);
        head.set_batch_images(&IMAGES);
        let got = head
            .training_loss(&cos, &labels, &emb, &norms)
            .double_value(&[]);
        let rep = direct.draw_replacement_for_images(&labels, Some(&IMAGES));
        let want = direct
            .loss_with_replacement(&cos, &labels, &emb, &rep)
            .double_value(&[]);
        assert_eq!(got, want, "step {step}");
        differs |= (old.step_loss(&cos, &labels, &emb).double_value(&[]) - got).abs() > 1e-9;
    }
    assert!(differs);
    let distinct: Vec<usize> = (100..112).collect();
    for step in 0..8 {
        let (mut a, mut b) = (gce(SelfPair::KeepPrototype), gce(SelfPair::KeepPrototype));
        a.set_step(step);
        b.set_step(step);
        assert_eq!(
            a.draw_replacement_for_images(&labels, Some(&distinct)),
            b.draw_replacement(&labels)
        );
    }
}
