//! `facerec embed`: images through a trained model to embeddings, for search, clustering or another
//! tool. Input: an image folder (one sub-folder per identity, labelled by folder; or a flat folder of
//! images), an insightface `.rec` (labelled by record), or a list file (one image path per line,
//! optionally a tab or space and a label; paths relative to the list's folder). Output: `FILE.npy`
//! (float32 `[N, D]`, C order) or `FILE.safetensors` (one tensor `embeddings`), and `FILE.csv` beside
//! it (`index,path,label`, one row per embedding row). Every file is written under a temporary name and
//! renamed.
//!
//! Preprocessing is the training path: folders and `.rec` files are read through their training
//! [`Source`] (`facerec_data::ImageFolder`, `facerec_data::RecordIo`), list entries through
//! `facerec_data::input::read_to_input`, all fitted by the run's `[input] fit` to its `input_size` and
//! normalised as in training. Embeddings are `f(x)`, or `f(x) + f(flip(x))` with `--flip-sum`
//! (what `facerec eval` and the trainer's evaluation use), then L2-normalised unless
//! `--no-normalise`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use facerec_data::{Fit, ImageFolder, RecOptions, RecordIo, Source};
use tch::{Kind, Tensor};

use super::loaded_model::LoadedModel;
use super::progress_bar as bar;

/// `facerec embed` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A run directory (config.toml + model.safetensors) or a model `.safetensors` file.
    #[arg(long, value_name = "RUN_DIR|MODEL.safetensors")]
    pub model: PathBuf,
    /// The config holding the `[model]` table (default: beside the model).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// An image folder, a `.rec` file (with `.idx` and `property` beside it) or a list file.
    #[arg(long, value_name = "DIR|FILE.rec|LIST")]
    pub input: PathBuf,
    /// `FILE.npy` or `FILE.safetensors`; `FILE.csv` is written beside it.
    #[arg(long, value_name = "FILE.npy|FILE.safetensors")]
    pub out: PathBuf,
    /// Add the embedding of the horizontally flipped image before normalising.
    #[arg(long)]
    pub flip_sum: bool,
    /// Keep the raw model output (no L2 normalisation).
    #[arg(long)]
    pub no_normalise: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// `stretch` or `center_crop` (default: the run's `[input] fit`).
    #[arg(long, value_name = "stretch|center_crop")]
    pub fit: Option<Fit>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Decoding and libtorch threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// A list of images with names and labels, decoded to the model input on demand.
pub struct Items {
    /// What each row is (a path, or `file.rec#key`).
    pub names: Vec<String>,
    /// Identity label of each row (the folder name, the record label, the list's label; empty when
    /// unknown).
    pub labels: Vec<String>,
    load: Box<dyn Fn(usize) -> Result<Vec<u8>> + Sync>,
}

impl Items {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// No images.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Open `input` (see the module docs) for a model of side `size` fitted by `fit`.
    pub fn open(input: &Path, size: usize, fit: Fit) -> Result<Self> {
        if input.is_dir() {
            return Self::open_dir(input, size, fit);
        }
        ensure!(input.is_file(), "input {} does not exist", input.display());
        if input.extension().is_some_and(|x| x == "rec") {
            let rec = RecordIo::open(
                input,
                size,
                RecOptions {
                    fit,
                    ..RecOptions::default()
                },
            )?;
            let names = (0..rec.len())
                .map(|i| format!("{}#{}", input.display(), rec.key(i)))
                .collect();
            let labels = (0..rec.len()).map(|i| rec.label(i).to_string()).collect();
            return Ok(Self {
                names,
                labels,
                load: Box::new(move |i| rec.load(i)),
            });
        }
        Self::open_list(input, size, fit)
    }

    fn open_dir(dir: &Path, size: usize, fit: Fit) -> Result<Self> {
        let has_subdirs = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .any(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'));
        if has_subdirs {
            let f = ImageFolder::open(dir, size, None)?.with_fit(fit);
            let names = (0..f.len())
                .map(|i| f.path(i).display().to_string())
                .collect();
            let labels = (0..f.len())
                .map(|i| f.class_names()[f.label(i)].clone())
                .collect();
            return Ok(Self {
                names,
                labels,
                load: Box::new(move |i| f.load(i)),
            });
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|x| {
                        let x = x.to_string_lossy().to_ascii_lowercase();
                        ["jpg", "jpeg", "png", "pgm", "ppm", "pnm", "bmp"].contains(&x.as_str())
                    })
            })
            .collect();
        files.sort_by(|a, b| facerec_data::natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
        ensure!(!files.is_empty(), "{}: no images", dir.display());
        Ok(Self::from_paths(files, Vec::new(), size, fit))
    }

    fn open_list(list: &Path, size: usize, fit: Fit) -> Result<Self> {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("reading list file {}", list.display()))?;
        let base = list.parent().unwrap_or(Path::new("."));
        let (mut paths, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            // `path<TAB>label`; without a tab, a line naming an existing file is a bare path (spaces
            // allowed), otherwise the last space separates the label.
            let (path, label) = match line.split_once('\t') {
                Some((p, l)) => (p.trim(), l.trim()),
                None if base.join(line.trim()).is_file() => (line.trim(), ""),
                None => match line.rsplit_once(' ') {
                    Some((p, l)) => (p.trim(), l.trim()),
                    None => (line.trim(), ""),
                },
            };
            let p = base.join(path);
            ensure!(
                p.is_file(),
                "{}:{}: image {} does not exist",
                list.display(),
                i + 1,
                p.display()
            );
            paths.push(p);
            labels.push(label.to_string());
        }
        ensure!(!paths.is_empty(), "{}: no image paths", list.display());
        Ok(Self::from_paths(paths, labels, size, fit))
    }

    fn from_paths(paths: Vec<PathBuf>, labels: Vec<String>, size: usize, fit: Fit) -> Self {
        let labels = if labels.is_empty() {
            vec![String::new(); paths.len()]
        } else {
            labels
        };
        Self {
            names: paths.iter().map(|p| p.display().to_string()).collect(),
            labels,
            load: Box::new(move |i| facerec_data::input::read_to_input(&paths[i], size, fit)),
        }
    }

    /// Embed every image with `m` (see the module docs), in chunks so memory stays bounded; `tick`
    /// gets the number of images done.
    ///
    /// # Shapes
    /// Returns `[N, D]` Float on the CPU.
    pub fn embed(
        &self,
        m: &LoadedModel,
        flip_sum: bool,
        normalise: bool,
        batch_size: usize,
        threads: usize,
        tick: &dyn Fn(u64),
    ) -> Result<Tensor> {
        ensure!(batch_size > 0, "--batch-size must be at least 1");
        ensure!(!self.is_empty(), "no images to embed");
        let size = m.input_size() as usize;
        let _guard = tch::no_grad_guard();
        let chunk = (batch_size * 8).max(256);
        let mut out = Vec::new();
        for lo in (0..self.len()).step_by(chunk) {
            let n = chunk.min(self.len() - lo);
            let images = facerec_evaluation::images::decode_all(
                n,
                size,
                threads,
                &|i| (self.load)(lo + i).with_context(|| self.names[lo + i].clone()),
                &|| {},
            )?;
            for b in (0..n).step_by(batch_size) {
                let x = images.narrow(0, b as i64, batch_size.min(n - b) as i64);
                let mut e = m.embed(&x).to_kind(Kind::Float);
                if flip_sum {
                    e += m.embed(&x.flip([3])).to_kind(Kind::Float);
                }
                if normalise {
                    e = facerec_evaluation::l2_normalize(&e);
                }
                tick(x.size()[0] as u64);
                out.push(e);
            }
        }
        Ok(Tensor::cat(&out, 0))
    }
}

/// Write `emb` `[N, D]` as a float32 `.npy` (format 1.0, C order).
fn write_npy(emb: &Tensor, path: &Path) -> Result<()> {
    let (n, d) = (emb.size()[0], emb.size()[1]);
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let values = Vec::<f32>::try_from(emb.to_kind(Kind::Float).contiguous().flatten(0, -1))?;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for v in values {
        f.write_all(&v.to_le_bytes())?;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// `dir/.name.partial`: where `path` is written before the rename.
fn partial(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Quote a CSV field when it holds a comma, a quote or a line break.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Write the embeddings and the CSV beside them (temporary names, then renamed).
pub fn write_outputs(emb: &Tensor, items: &Items, out: &Path) -> Result<PathBuf> {
    let csv = out.with_extension("csv");
    let (tmp_emb, tmp_csv) = (partial(out), partial(&csv));
    match out.extension().and_then(|x| x.to_str()) {
        Some("npy") => write_npy(emb, &tmp_emb)?,
        Some("safetensors") => Tensor::write_safetensors(&[("embeddings", emb)], &tmp_emb)
            .with_context(|| format!("writing {}", tmp_emb.display()))?,
        _ => bail!(
            "--out {}: expected a .npy or .safetensors file name",
            out.display()
        ),
    }
    let mut text = String::from("index,path,label\n");
    for (i, (n, l)) in items.names.iter().zip(&items.labels).enumerate() {
        text.push_str(&format!("{i},{},{}\n", csv_field(n), csv_field(l)));
    }
    std::fs::write(&tmp_csv, text).with_context(|| format!("writing {}", tmp_csv.display()))?;
    std::fs::rename(&tmp_emb, out).with_context(|| format!("renaming to {}", out.display()))?;
    std::fs::rename(&tmp_csv, &csv).with_context(|| format!("renaming to {}", csv.display()))?;
    Ok(csv)
}

/// Run `facerec embed`.
pub fn run(args: Args) -> Result<()> {
    ensure!(
        matches!(
            args.out.extension().and_then(|x| x.to_str()),
            Some("npy" | "safetensors")
        ),
        "--out {}: expected a .npy or .safetensors file name",
        args.out.display()
    );
    let (device, threads) = super::init_device(&args.device, args.threads)?;
    let mut m = LoadedModel::load(&args.model, args.config.as_deref(), device)?;
    if let Some(fit) = args.fit {
        m.fit = fit;
    }
    let items = Items::open(&args.input, m.input_size() as usize, m.fit)?;
    let pb = bar(items.len() as u64, "embedding".into());
    let emb = items.embed(
        &m,
        args.flip_sum,
        !args.no_normalise,
        args.batch_size,
        threads,
        &|n| pb.inc(n),
    )?;
    pb.finish_and_clear();
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let csv = write_outputs(&emb, &items, &args.out)?;
    println!(
        "embedded {} images ({} dims, {}{}) with {} into {} and {}",
        items.len(),
        emb.size()[1],
        if args.flip_sum { "flip-sum, " } else { "" },
        if args.no_normalise {
            "not normalised"
        } else {
            "L2-normalised"
        },
        m.checkpoint.display(),
        args.out.display(),
        csv.display()
    );
    Ok(())
}
