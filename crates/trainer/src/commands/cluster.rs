//! `facerec cluster`: cluster a folder of face images with a trained backbone.
//!
//! Embeds every image (eval mode, flip test as in `facerec eval`: `normalize(f(x) + f(flip(x)))`),
//! clusters the embeddings with `facerec-clustering` (cosine k-means, FINCH or the thresholded kNN
//! graph), writes `path,cluster` lines to `--out`, and prints pairwise / BCubed / NMI metrics when
//! the folder has one sub-folder per identity. A folder without sub-folders is clustered as one
//! unlabelled set (no metrics). The model is loaded as by `facerec eval` (a run directory, or a
//! `.safetensors` file with its `config.toml` beside it or given by `--config`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use facerec_clustering::finch::{refine_to_k, select};
use facerec_clustering::{
    cosine_kmeans, evaluate, finch, knn_graph_clusters, FinchConfig, FinchSelect, GraphConfig,
    KMeansConfig,
};
use facerec_data::{load_all, ImageFolder, Source};
use facerec_evaluation::embed_with_flip;
use tch::nn::ModuleT;

use super::loaded_model::LoadedModel;

/// Clustering algorithm of `facerec cluster`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Cosine k-means, k-means++ seeded (needs --k, or the number of identity folders).
    Kmeans,
    /// FINCH first-neighbour hierarchy (with --k: refined to exactly k clusters; with --threshold:
    /// links below it dropped; otherwise --level).
    Finch,
    /// Connected components of the kNN graph with edges of cosine >= --threshold.
    Graph,
}

/// `facerec cluster` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A run directory (config.toml + model.safetensors) or a model `.safetensors` file.
    #[arg(long, value_name = "RUN_DIR|MODEL.safetensors")]
    pub model: PathBuf,
    /// The config holding the `[model]` table (default: beside the model).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Image folder: `DIR/<identity>/<image>` (labels known) or `DIR/<image>` (unlabelled).
    #[arg(long)]
    pub images: PathBuf,
    /// Only these identity sub-folders (comma-separated), e.g. `s31,s32`.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Algorithm.
    #[arg(long, value_enum, default_value = "finch")]
    pub method: Method,
    /// Number of clusters (kmeans; finch: refine to exactly k). Default for kmeans: the number of
    /// identity folders.
    #[arg(long)]
    pub k: Option<usize>,
    /// Cosine threshold (graph: edge threshold, default 0.5; finch: optional link threshold).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Neighbours per node of the graph method.
    #[arg(long, default_value_t = 10)]
    pub knn: usize,
    /// FINCH partition to output when neither --k nor --threshold is given (0 = finest; the last
    /// level if there are fewer).
    #[arg(long, default_value_t = 1)]
    pub level: usize,
    /// k-means seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not add the flipped image's embedding.
    #[arg(long)]
    pub no_flip: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Decoding and libtorch threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Output CSV (`path,cluster`).
    #[arg(long)]
    pub out: PathBuf,
}

/// Opens `dir` as identity folders, or (no sub-folders) as one unlabelled set. Returns the set and
/// whether labels are known.
fn open_images(dir: &Path, size: usize, classes: Option<&[String]>) -> Result<(ImageFolder, bool)> {
    ensure!(
        dir.is_dir(),
        "image folder {} does not exist",
        dir.display()
    );
    let has_subdirs = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'));
    if has_subdirs || classes.is_some() {
        return Ok((ImageFolder::open(dir, size, classes)?, true));
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        bail!("image folder {} has no parent folder", dir.display());
    };
    let name = [name.to_string_lossy().into_owned()];
    Ok((ImageFolder::open(parent, size, Some(&name))?, false))
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let (device, threads) = super::init_device(&args.device, args.threads)?;
    let m = LoadedModel::load(&args.model, args.config.as_deref(), device)?;
    let (set, labelled) = open_images(
        &args.images,
        m.input_size() as usize,
        args.classes.as_deref(),
    )?;
    // The geometry the model was trained with (`[input] fit` of its config).
    let set = set.with_fit(m.fit);
    ensure!(
        set.len() >= 2,
        "{}: need at least 2 images to cluster",
        args.images.display()
    );

    let t0 = Instant::now();
    let (images, labels) = load_all(&set, threads)?;
    let images = images.to_device(device);
    let forward = |x: &tch::Tensor| m.backbone.forward_t(x, false).to_device(tch::Device::Cpu);
    let emb = if args.no_flip {
        let _guard = tch::no_grad_guard();
        let n = images.size()[0];
        let chunks: Vec<tch::Tensor> = (0..n)
            .step_by(args.batch_size)
            .map(|s| forward(&images.narrow(0, s, (args.batch_size as i64).min(n - s))))
            .collect();
        facerec_evaluation::l2_normalize(&tch::Tensor::cat(&chunks, 0))
    } else {
        embed_with_flip(&forward, &images, args.batch_size as i64).0
    };
    let emb = emb.to_device(device);
    let t_embed = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let num_ids = set.num_classes();
    let (assign, what) = assign_clusters(&args, &emb, set.len(), labelled, num_ids)?;
    let t_cluster = t1.elapsed().as_secs_f64();
    let clusters = assign.iter().max().map_or(0, |&x| x as usize + 1);

    write_csv(&args.out, &assign, |i| set.path(i).display().to_string())?;
    println!(
        "{} images -> {clusters} clusters ({what}); embedding {t_embed:.1} s, clustering {t_cluster:.2} s; wrote {}",
        set.len(),
        args.out.display()
    );
    if labelled {
        let truth: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        println!("{}", evaluate(&assign, &truth)?);
    }
    Ok(())
}

/// Cluster the embeddings `emb` as `--method` says: the assignments and a line describing them.
fn assign_clusters(
    args: &Args,
    emb: &tch::Tensor,
    n_images: usize,
    labelled: bool,
    num_ids: usize,
) -> Result<(Vec<i64>, String)> {
    Ok(match args.method {
        Method::Kmeans => {
            let k = match args.k {
                Some(k) => k,
                None if labelled => num_ids,
                None => bail!("--method kmeans needs --k on an unlabelled folder"),
            };
            ensure!(
                k >= 1 && k <= n_images,
                "--k {k}: must be in 1..={}",
                n_images
            );
            let r = cosine_kmeans(
                emb,
                &KMeansConfig {
                    k,
                    seed: args.seed,
                    ..Default::default()
                },
            );
            (
                r.assignments,
                format!("cosine k-means, k = {k}, {} iterations", r.iterations),
            )
        }
        Method::Finch => {
            let cfg = FinchConfig {
                threshold: args.threshold,
                ..Default::default()
            };
            let parts = finch(emb, &cfg);
            let sizes: Vec<usize> = parts
                .iter()
                .map(|p| p.iter().max().map_or(0, |&x| x as usize + 1))
                .collect();
            match (args.k, args.threshold) {
                (Some(k), _) => {
                    // The coarsest level with >= k clusters, refined to exactly k.
                    let start = parts
                        .iter()
                        .rev()
                        .find(|p| p.iter().max().map_or(0, |&x| x as usize + 1) >= k)
                        .map(|p| p.as_slice())
                        .unwrap_or_else(|| select(&parts, FinchSelect::Level(0)));
                    let out = refine_to_k(emb, start, k);
                    (out, format!("FINCH levels {sizes:?}, refined to k = {k}"))
                }
                (None, Some(t)) => (
                    parts.last().unwrap().clone(),
                    format!("FINCH with link threshold {t}, levels {sizes:?}, last level"),
                ),
                (None, None) => (
                    select(&parts, FinchSelect::Level(args.level)).to_vec(),
                    format!(
                        "FINCH levels {sizes:?}, level {}",
                        args.level.min(parts.len() - 1)
                    ),
                ),
            }
        }
        Method::Graph => {
            let threshold = args.threshold.unwrap_or(0.5);
            let cfg = GraphConfig {
                k: args.knn,
                threshold,
                ..Default::default()
            };
            cfg.validate().context("--knn / --threshold")?;
            (
                knn_graph_clusters(emb, &cfg),
                format!("kNN graph, k = {}, threshold {threshold}", args.knn),
            )
        }
    })
}

/// `path,cluster` rows to `out`, through a temporary file and a rename.
fn write_csv(out: &std::path::Path, assign: &[i64], path: impl Fn(usize) -> String) -> Result<()> {
    let tmp = out.with_extension("csv.tmp");
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        writeln!(f, "path,cluster")?;
        for (i, c) in assign.iter().enumerate() {
            writeln!(f, "{},{c}", path(i))?;
        }
        f.flush()?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use facerec_backbone::BackboneConfig;
    use image::{Rgb, RgbImage};
    use tch::{nn, Device};

    /// A tiny run directory (random weights) and a folder of 3 identities x 4 images, where every
    /// image of an identity is the same picture: any model embeds them identically, so every
    /// method must recover the identities.
    fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let toml = "[model]\ntype = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [4, 4, 8, 8]\nembedding_size = 16\ninput_size = 32\n";
        std::fs::write(run.join("config.toml"), toml).unwrap();
        let cfg: BackboneConfig = toml::from_str::<toml::Table>(toml).unwrap()["model"]
            .clone()
            .try_into()
            .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = facerec_backbone::build(&vs.root(), &cfg);
        vs.save(run.join("model.safetensors")).unwrap();
        let images = dir.join("faces");
        for id in 0..3u32 {
            let sub = images.join(format!("p{id}"));
            std::fs::create_dir_all(&sub).unwrap();
            let img = RgbImage::from_fn(40, 40, |x, y| {
                Rgb([
                    ((x * (id + 3) + y * 7 * id) % 251) as u8,
                    (y * 5 + id * 40) as u8,
                    (x * 11) as u8,
                ])
            });
            for k in 0..4 {
                img.save(sub.join(format!("{k}.png"))).unwrap();
            }
        }
        (run, images)
    }

    fn args(run: &Path, images: &Path, method: Method, out: &Path) -> Args {
        Args {
            model: run.to_path_buf(),
            config: None,
            images: images.to_path_buf(),
            classes: None,
            method,
            k: None,
            threshold: Some(0.999),
            knn: 3,
            level: 5,
            seed: 0,
            no_flip: false,
            batch_size: 5,
            device: "cpu".into(),
            threads: 1,
            out: out.to_path_buf(),
        }
    }

    fn read(out: &Path) -> Vec<(String, i64)> {
        let text = std::fs::read_to_string(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("path,cluster"));
        lines
            .map(|l| {
                let (p, c) = l.rsplit_once(',').unwrap();
                (p.to_string(), c.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn clusters_identical_images_together_with_every_method() {
        let dir = tempfile::tempdir().unwrap();
        let (run_dir, images) = fixture(dir.path());
        for method in [Method::Kmeans, Method::Finch, Method::Graph] {
            let out = dir.path().join(format!("{method:?}.csv"));
            let mut a = args(&run_dir, &images, method, &out);
            if method == Method::Finch {
                // A random model puts different pictures at cosines > 0.999: ask FINCH for k.
                (a.k, a.threshold) = (Some(3), None);
            }
            run(a).unwrap();
            let rows = read(&out);
            assert_eq!(rows.len(), 12);
            let truth: Vec<i64> = rows
                .iter()
                .map(|(p, _)| p.contains("/p1/") as i64 + 2 * p.contains("/p2/") as i64)
                .collect();
            let pred: Vec<i64> = rows.iter().map(|r| r.1).collect();
            let m = evaluate(&pred, &truth).unwrap();
            assert_eq!(m.pairwise_f, 1.0, "{method:?}: {m}");
        }
        // A folder without identity sub-folders is clustered unlabelled.
        let flat = images.join("p0");
        let out = dir.path().join("flat.csv");
        run(args(&run_dir, &flat, Method::Graph, &out)).unwrap();
        assert!(read(&out).iter().all(|r| r.1 == 0));
        // Bad input names the folder.
        let e = run(args(
            &run_dir,
            &dir.path().join("missing"),
            Method::Graph,
            &out,
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
