//! Integration tests of the batch loader: determinism across thread counts, resume, drop_last, coverage
//! of every index, per-(epoch, index) flips, bounded prefetch, errors, tensors and `load_all`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use facerec_data::{
    load_all, AugmentConfig, Batch, Loader, LoaderConfig, Source, SyntheticConfig, SyntheticFaces,
};
use tch::{Device, Kind};

fn synthetic(identities: usize, per: usize) -> Arc<dyn Source> {
    Arc::new(
        SyntheticFaces::new(SyntheticConfig {
            identities,
            images_per_identity: per,
            image_size: 16,
            seed: 4,
            first_identity: 0,
        })
        .unwrap(),
    )
}

fn cfg(batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: true,
        drop_last: false,
        flip: true,
        max_shift: 0,
        workers,
        prefetch: 2,
        seed: 11,
        sampler: Default::default(),
        augment: Default::default(),
    }
}

fn collect(loader: &Loader, epoch: usize, start: usize) -> Vec<Batch> {
    loader.epoch(epoch, start).collect::<Result<_>>().unwrap()
}

fn mirror(img: &[u8], s: usize) -> Vec<u8> {
    let mut out = img.to_vec();
    for y in 0..s {
        for x in 0..s {
            let (a, b) = ((y * s + x) * 3, (y * s + s - 1 - x) * 3);
            out[a..a + 3].copy_from_slice(&img[b..b + 3]);
        }
    }
    out
}

#[test]
fn augmented_batches_are_the_same_for_any_worker_count_and_on_resume() {
    let src = synthetic(6, 7);
    let augment = AugmentConfig {
        crop_p: 0.5,
        blur_p: 0.5,
        color_p: 0.5,
        erase_p: 0.5,
        ..Default::default()
    };
    let with = |workers| LoaderConfig {
        augment: augment.clone(),
        ..cfg(5, workers)
    };
    let reference = collect(&Loader::new(src.clone(), with(1)), 1, 0);
    assert_eq!(collect(&Loader::new(src.clone(), with(3)), 1, 0), reference);
    // Resuming at batch 4 sees the batches the whole epoch had from there on.
    assert_eq!(
        collect(&Loader::new(src.clone(), with(2)), 1, 4),
        reference[4..].to_vec()
    );
    // Same order, other pixels than without augmentation.
    let plain = collect(&Loader::new(src, cfg(5, 1)), 1, 0);
    assert_eq!(plain[0].indices, reference[0].indices);
    assert_ne!(plain[0].images, reference[0].images);
}

#[test]
fn same_batches_for_any_worker_count() {
    let src = synthetic(6, 7); // 42 images
    let reference = collect(&Loader::new(src.clone(), cfg(5, 1)), 1, 0);
    assert_eq!(reference.len(), 9);
    for workers in [0, 3] {
        let loader = Loader::new(
            src.clone(),
            LoaderConfig {
                prefetch: 1 + workers,
                ..cfg(5, workers)
            },
        );
        assert_eq!(collect(&loader, 1, 0), reference, "workers = {workers}");
    }
    // A different epoch is a different order.
    let other = collect(&Loader::new(src, cfg(5, 1)), 2, 0);
    assert_ne!(other[0].indices, reference[0].indices);
}

#[test]
fn resume_from_start_step_gives_the_same_tail() {
    let loader = Loader::new(synthetic(6, 7), cfg(5, 2));
    let full = collect(&loader, 3, 0);
    for start in [1, 4, 8] {
        assert_eq!(
            collect(&loader, 3, start),
            full[start..],
            "start_step = {start}"
        );
    }
    assert!(collect(&loader, 3, 9).is_empty());
    assert!(collect(&loader, 3, 100).is_empty());
}

#[test]
fn drop_last_and_every_index_once_per_epoch() {
    let src = synthetic(6, 7);
    for (drop_last, batches, last_len) in [(false, 9, 2), (true, 8, 5)] {
        let loader = Loader::new(
            src.clone(),
            LoaderConfig {
                drop_last,
                ..cfg(5, 2)
            },
        );
        assert_eq!(loader.batches_per_epoch(), batches);
        let epoch = collect(&loader, 0, 0);
        assert_eq!(epoch.len(), batches);
        assert_eq!(epoch.last().unwrap().len(), last_len);
        assert!(epoch[..batches - 1].iter().all(|b| b.len() == 5));
        let mut seen: Vec<usize> = epoch.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            if drop_last { 40 } else { 42 },
            "an index repeated or missing"
        );
        if !drop_last {
            assert_eq!(seen, (0..42).collect::<Vec<_>>());
        }
        for b in &epoch {
            let labels: Vec<i64> = b.indices.iter().map(|&i| src.label(i) as i64).collect();
            assert_eq!(b.labels, labels);
            assert_eq!(b.images.len(), b.len() * 16 * 16 * 3);
        }
    }
    // Without shuffling the order is the identity.
    let plain = Loader::new(
        src,
        LoaderConfig {
            shuffle: false,
            ..cfg(5, 1)
        },
    );
    let order: Vec<usize> = collect(&plain, 5, 0)
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(order, (0..42).collect::<Vec<_>>());
}

#[test]
fn flip_is_decided_per_epoch_and_index() {
    let src = synthetic(10, 10);
    let shuffled = Loader::new(src.clone(), cfg(7, 2));
    let ordered = Loader::new(
        src.clone(),
        LoaderConfig {
            shuffle: false,
            ..cfg(13, 1)
        },
    );
    let originals: Vec<Vec<u8>> = (0..src.len()).map(|i| src.load(i).unwrap()).collect();
    let image_of = |batches: &[Batch]| {
        let mut by_index = vec![Vec::new(); src.len()];
        for b in batches {
            for (k, &i) in b.indices.iter().enumerate() {
                by_index[i] = b.images[k * 768..(k + 1) * 768].to_vec();
            }
        }
        by_index
    };
    let mut flipped_per_epoch = Vec::new();
    for epoch in 0..2 {
        let a = image_of(&collect(&shuffled, epoch, 0));
        // Same (seed, epoch, index) -> same image, whatever the batch size, position or order.
        assert_eq!(a, image_of(&collect(&ordered, epoch, 0)));
        let flipped: Vec<bool> = (0..src.len())
            .map(|i| {
                let f = shuffled.is_flipped(epoch, i);
                let expect = if f {
                    mirror(&originals[i], 16)
                } else {
                    originals[i].clone()
                };
                assert_eq!(a[i], expect, "epoch {epoch} index {i} flipped = {f}");
                f
            })
            .collect();
        let n = flipped.iter().filter(|&&f| f).count();
        assert!((30..=70).contains(&n), "{n} of 100 flipped");
        flipped_per_epoch.push(flipped);
    }
    assert_ne!(
        flipped_per_epoch[0], flipped_per_epoch[1],
        "flips must change between epochs"
    );
    let no_flip = Loader::new(
        src.clone(),
        LoaderConfig {
            flip: false,
            max_shift: 0,
            ..cfg(7, 2)
        },
    );
    assert_eq!(image_of(&collect(&no_flip, 0, 0)), originals);
}

/// Counts loads; fails on one index.
struct Probe {
    inner: Arc<dyn Source>,
    loads: AtomicUsize,
    fail_at: Option<usize>,
}

impl Source for Probe {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn label(&self, index: usize) -> usize {
        self.inner.label(index)
    }
    fn image_size(&self) -> usize {
        self.inner.image_size()
    }
    fn load(&self, index: usize) -> Result<Vec<u8>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if Some(index) == self.fail_at {
            bail!("record {index} is broken");
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
        self.inner.load(index)
    }
    fn describe(&self, index: usize) -> String {
        format!("probe record {index}")
    }
}

#[test]
fn prefetch_is_bounded_and_dropping_stops_the_workers() {
    let probe = Arc::new(Probe {
        inner: synthetic(20, 10),
        loads: AtomicUsize::new(0),
        fail_at: None,
    });
    let loader = Loader::new(
        probe.clone(),
        LoaderConfig {
            prefetch: 2,
            ..cfg(4, 2)
        },
    );
    {
        let mut it = loader.epoch(0, 0);
        it.next().unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
    } // dropped: workers joined
    let after_drop = probe.loads.load(Ordering::SeqCst);
    // Delivered batch 0; the window lets batches 1..=2 be claimed, no more (4 images each).
    assert!(
        after_drop <= 3 * 4,
        "{after_drop} images loaded for 1 consumed batch with prefetch 2"
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        probe.loads.load(Ordering::SeqCst),
        after_drop,
        "workers kept loading after the drop"
    );
    assert!(loader.wait_time() > std::time::Duration::ZERO);
}

#[test]
fn a_failed_load_names_the_record_and_ends_the_epoch() {
    for workers in [0, 2] {
        let probe = Arc::new(Probe {
            inner: synthetic(4, 5),
            loads: AtomicUsize::new(0),
            fail_at: Some(7),
        });
        let loader = Loader::new(
            probe,
            LoaderConfig {
                shuffle: false,
                ..cfg(3, workers)
            },
        );
        let results: Vec<_> = loader.epoch(0, 0).collect();
        assert_eq!(results.len(), 3, "batches 0, 1 and the failing batch 2");
        assert!(results[..2].iter().all(|r| r.is_ok()));
        let err = format!("{:#}", results[2].as_ref().unwrap_err());
        assert!(
            err.contains("probe record 7") && err.contains("broken"),
            "{err}"
        );
    }
}

#[test]
fn tensors_are_normalised_nchw() {
    let src = synthetic(3, 4);
    let loader = Loader::new(
        src.clone(),
        LoaderConfig {
            flip: false,
            max_shift: 0,
            shuffle: false,
            ..cfg(5, 1)
        },
    );
    let batch = loader.epoch(0, 0).next().unwrap().unwrap();
    let (x, y) = batch.to_tensors(Device::Cpu);
    assert_eq!(x.size(), [5, 3, 16, 16]);
    assert_eq!((x.kind(), y.kind()), (Kind::Float, Kind::Int64));
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), batch.labels);
    for (b, c, h, w) in [(0, 0, 0, 0), (2, 1, 3, 7), (4, 2, 15, 9)] {
        let byte = batch.images[((b * 16 + h) * 16 + w) * 3 + c] as f64;
        let got = x.double_value(&[b as i64, c as i64, h as i64, w as i64]);
        assert!(
            (got - (byte / 255.0 - 0.5) / 0.5).abs() < 1e-6,
            "{got} vs byte {byte}"
        );
    }
    let (min, max) = (x.min().double_value(&[]), x.max().double_value(&[]));
    assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));

    // load_all: every image in order, no flip, the same values as a batch.
    let (all, labels) = load_all(&*src, 3).unwrap();
    assert_eq!(all.size(), [12, 3, 16, 16]);
    assert_eq!(labels, (0..12).map(|i| src.label(i)).collect::<Vec<_>>());
    assert!(all.narrow(0, 0, 5).equal(&x));
    let (one_thread, _) = load_all(&*src, 1).unwrap();
    assert!(all.equal(&one_thread));
}

/// The shards of a data-parallel job read, together, exactly the batches of one process: rank r
/// gets batches r, r + W, r + 2W, ... (from a start position too), each bitwise the same.
#[test]
fn shards_partition_the_single_process_batches() {
    use facerec_data::{Loader, LoaderConfig, Shard, SyntheticConfig, SyntheticFaces};
    use std::sync::Arc;
    let source = Arc::new(
        SyntheticFaces::new(SyntheticConfig {
            identities: 6,
            images_per_identity: 5,
            image_size: 16,
            seed: 3,
            first_identity: 0,
        })
        .unwrap(),
    );
    let loader = Loader::new(
        source,
        LoaderConfig {
            batch_size: 4,
            workers: 2,
            max_shift: 1,
            ..LoaderConfig::default()
        },
    );
    let whole: Vec<_> = loader.epoch(1, 0).map(|b| b.unwrap()).collect();
    assert_eq!(whole.len(), 7);
    for world in [2usize, 3] {
        for start in [0usize, world] {
            for rank in 0..world {
                let mine: Vec<_> = loader
                    .epoch_shard(1, start, Shard { rank, world })
                    .map(|b| b.unwrap())
                    .collect();
                let expected: Vec<usize> = (start + rank..whole.len()).step_by(world).collect();
                assert_eq!(
                    mine.len(),
                    expected.len(),
                    "world {world} rank {rank} start {start}"
                );
                for (b, &k) in mine.iter().zip(&expected) {
                    assert_eq!(
                        b.indices, whole[k].indices,
                        "world {world} rank {rank}: batch {k}"
                    );
                    assert_eq!(b.images, whole[k].images);
                }
            }
        }
    }
}
