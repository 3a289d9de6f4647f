//! [`ImageFolder`]: a labelled set stored as one sub-folder per identity (`root/<class>/<image>`), the
//! layout insightface's `docs/prepare_custom_dataset.md` starts from before packing RecordIO.
//!
//! Files with the extensions png, pgm, ppm, pnm, jpg and jpeg are images (case-insensitive); other files
//! and hidden entries are ignored. A symbolic link that leads nowhere (dangling, or a loop) among the class
//! folders or inside one is an error naming every such link. Images go through the one image path
//! ([`crate::input`]): gray replicated to 3 channels, fitted to `image_size x image_size` by the
//! [`Fit`] rule ([`ImageFolder::with_fit`]; default stretch). Classes and files are in natural order
//! (`s1, s2, ..., s10`), so labels do not depend on directory order.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::input::{self, Fit};
use crate::source::Source;

const EXTENSIONS: [&str; 6] = ["png", "pgm", "ppm", "pnm", "jpg", "jpeg"];

/// Images in `root/<class>/*`, labelled by class folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    image_size: usize,
    fit: Fit,
    class_names: Vec<String>,
    files: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Index `root` (files are decoded on `load`).
    ///
    /// `classes`: `None` = every sub-folder, labels in natural order of the folder names; `Some(list)` =
    /// only these folder names, labels in the given order. Fails naming the folder when `root` or a
    /// listed class is missing, a class folder has no images, or a class is listed twice, and naming
    /// every broken symbolic link (dangling or looping) among the class folders or inside one. Images are fitted with [`Fit::Stretch`] unless [`ImageFolder::with_fit`] says otherwise.
    pub fn open(root: &Path, image_size: usize, classes: Option<&[String]>) -> Result<Self> {
        ensure!(
            image_size > 0,
            "image folder {}: image_size must be > 0",
            root.display()
        );
        ensure!(
            root.is_dir(),
            "image folder {} does not exist or is not a directory",
            root.display()
        );
        let mut broken = Vec::new();
        let class_names: Vec<String> = match classes {
            Some(list) => {
                for (i, name) in list.iter().enumerate() {
                    ensure!(
                        !list[..i].contains(name),
                        "image folder {}: class {name:?} listed twice",
                        root.display()
                    );
                }
                list.to_vec()
            }
            None => {
                let mut names = Vec::new();
                for entry in read_dir_sorted(root)? {
                    if entry.is_dir() {
                        names.push(file_name(&entry));
                    } else if let Some(why) = broken_link(&entry) {
                        broken.push(format!("{} ({why})", entry.display()));
                    }
                }
                ensure!(
                    !names.is_empty(),
                    "image folder {} has no class sub-folders",
                    root.display()
                );
                names
            }
        };
        let mut files = Vec::new();
        for (label, name) in class_names.iter().enumerate() {
            let dir = root.join(name);
            ensure!(
                dir.is_dir(),
                "class folder {} does not exist",
                dir.display()
            );
            let before = files.len();
            for path in read_dir_sorted(&dir)? {
                let is_image = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
                if is_image && path.is_file() {
                    files.push((path, label));
                } else if let Some(why) = broken_link(&path) {
                    broken.push(format!("{} ({why})", path.display()));
                }
            }
            if !broken.is_empty() {
                continue; // reported below, with the links of the other classes
            }
            ensure!(
                files.len() > before,
                "class folder {} contains no images ({})",
                dir.display(),
                EXTENSIONS.join(", ")
            );
        }
        if !broken.is_empty() {
            const SHOWN: usize = 20;
            let more = broken.len().saturating_sub(SHOWN);
            bail!(
                "image folder {}: {} broken symbolic link(s) (target missing or a link loop); fix or remove them:\n  {}{}",
                root.display(),
                broken.len(),
                broken[..broken.len().min(SHOWN)].join("\n  "),
                if more > 0 { format!("\n  ... and {more} more") } else { String::new() }
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            image_size,
            fit: Fit::default(),
            class_names,
            files,
        })
    }

    /// The same set with images fitted to the model input by `fit` (see [`crate::input::Fit`]).
    pub fn with_fit(mut self, fit: Fit) -> Self {
        self.fit = fit;
        self
    }

    /// How images are fitted to `image_size x image_size`.
    pub fn fit(&self) -> Fit {
        self.fit
    }

    /// Folder name of each label.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The folder this set was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of image `index`.
    ///
    /// # Panics
    /// When `index >= len()`.
    pub fn path(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    fn label(&self, index: usize) -> usize {
        self.files[index].1
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
    fn load(&self, index: usize) -> Result<Vec<u8>> {
        input::read_to_input(self.path(index), self.image_size, self.fit)
    }
    fn describe(&self, index: usize) -> String {
        self.path(index).display().to_string()
    }
}

/// Why `path` is a broken symbolic link ("target missing", "link loop", ...), or `None` when it is
/// not a symbolic link or its target exists.
fn broken_link(path: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    match std::fs::metadata(path) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("target missing".into()),
        Err(e) => Some(format!("{e}")),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Non-hidden entries of `dir`, in natural order of their names.
fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("reading folder {}", dir.display()))?
            .path();
        if !file_name(&path).starts_with('.') {
            paths.push(path);
        }
    }
    paths.sort_by(|a, b| natural_cmp(&file_name(a), &file_name(b)));
    Ok(paths)
}

/// Natural order: digit runs compare as numbers (`s2 < s10`, `img007 == img7` broken by the plain
/// string order), everything else character by character.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some((digit, chunk))
        })
    }
    let mut ca = chunks(a);
    let mut cb = chunks(b);
    loop {
        let ord = match (ca.next(), cb.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some((true, x)), Some((true, y))) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (Some((_, x)), Some((_, y))) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = ["s10", "s2", "s1", "a", "s01", "s1b", "10", "9", "s"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["9", "10", "a", "s", "s01", "s1", "s1b", "s2", "s10"]);
    }
}
