//! LFW pair lists (`pairs.txt`, `pairsDevTrain.txt`, `pairsDevTest.txt`) over an image folder
//! `<root>/<Name>/<Name>_NNNN.<ext>` (Huang et al., "Labeled Faces in the Wild", UMass TR 07-49, 2007).
//!
//! Format: the first line is `S N` (View 2: `10 300`, ten sets) or just `N` (View 1: one set). Then, for
//! each set, `N` matched lines `name i j` followed by `N` mismatched lines `name1 i name2 j`; image numbers
//! are 1-based and written as 4 digits in file names.
//!
//! Folds (the rule of [`crate::PairSet`]): with several sets, the sets are the folds; a single set (View 1)
//! is split into 10. Both come from one ordering: for `F` folds, fold `f` takes the `f`-th contiguous share
//! (`kfold`) of the matched pairs and the `f`-th share of the mismatched pairs, in file order. With
//! `F = S` sets this is the file order itself (each set is `N` matched then `N` mismatched lines), so the
//! sets are the folds; with one set every fold holds both kinds, where contiguous tenths of the file would
//! hold only matched or only mismatched pairs. [`LfwPairs::resolve_with_folds`] orders a list for another
//! fold count (a `.bin` pack is always read with 10 folds, so `prep lfw` packs a 5-set list that way).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::images::Fit;
use crate::pairs::{Pair, PairSet};
use crate::verification::kfold;

/// Extensions tried, in order, when resolving an image name.
pub const LFW_EXTENSIONS: [&str; 5] = ["jpg", "png", "jpeg", "pgm", "ppm"];

/// One image of a pair list: person name and 1-based image number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LfwImage {
    pub name: String,
    pub number: u32,
}

impl LfwImage {
    /// The file stem, `<Name>_NNNN`.
    pub fn stem(&self) -> String {
        format!("{}_{:04}", self.name, self.number)
    }
}

/// One line of a pair list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfwPair {
    pub a: LfwImage,
    pub b: LfwImage,
    pub same: bool,
    /// 1-based line number in the file.
    pub line: usize,
}

/// A parsed pair list, pairs in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfwPairs {
    /// Number of sets (10 for View 2, 1 for View 1).
    pub sets: usize,
    /// Matched (and mismatched) pairs per set.
    pub per_set: usize,
    /// `sets * 2 * per_set` pairs in file order.
    pub pairs: Vec<LfwPair>,
}

/// A pair list resolved against an image folder: unique image files and pairs over them, ordered so that
/// the contiguous split into `pairs.folds` folds gives the protocol's folds.
#[derive(Debug, Clone, PartialEq)]
pub struct LfwSet {
    /// Unique image files, in order of first use.
    pub images: Vec<PathBuf>,
    /// Pairs of indices into `images`, with their folds.
    pub pairs: PairSet,
}

impl LfwSet {
    /// Decode every image to RGB `size x size`, fitted by `fit`, on `threads` threads (`tick` once per
    /// image), as [`crate::images::decode_all`]; errors name the file.
    ///
    /// # Shapes
    /// Returns `[N, 3, size, size]` Uint8 on the CPU, rows in the order of `images`.
    pub fn decode(
        &self,
        size: u32,
        fit: Fit,
        threads: usize,
        tick: &(dyn Fn() + Sync),
    ) -> Result<tch::Tensor> {
        crate::images::decode_all(
            self.images.len(),
            size as usize,
            threads,
            &|k| crate::images::read_rgb(&self.images[k], size, fit),
            tick,
        )
    }
}

impl LfwPairs {
    /// Read and parse a pair list.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("LFW pair list {}", path.display()))
    }

    /// Parse a pair list (either layout). Errors name the line.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let (_, header) = lines.next().context("the file is empty")?;
        let nums = header
            .split_whitespace()
            .map(str::parse::<usize>)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("line 1: header {header:?} is not `N` or `SETS N`"))?;
        let (sets, per_set) = match nums.as_slice() {
            [n] => (1, *n),
            [s, n] => (*s, *n),
            _ => bail!("line 1: header {header:?} is not `N` or `SETS N`"),
        };
        ensure!(
            sets > 0 && per_set > 0,
            "line 1: header {header:?} announces no pairs"
        );
        // The header's count is checked against the lines there are before anything is sized by it
        // (a corrupt header once asked for a 2 TB allocation, an abort).
        let announced = sets
            .checked_mul(per_set)
            .and_then(|n| n.checked_mul(2))
            .filter(|&n| n <= text.lines().count())
            .with_context(|| {
                format!(
                    "line 1: header {header:?} announces {sets} x 2 x {per_set} pairs, more than the file's {} lines",
                    text.lines().count()
                )
            })?;
        let mut pairs = Vec::with_capacity(announced);
        for set in 0..sets {
            for k in 0..2 * per_set {
                let same = k < per_set;
                let (line, text) = lines.next().with_context(|| {
                    format!(
                        "the file ends early: set {} of {sets} lacks its {} pair {} of {per_set}",
                        set + 1,
                        if same { "matched" } else { "mismatched" },
                        k % per_set + 1
                    )
                })?;
                pairs.push(parse_pair(text, same, line)?);
            }
        }
        if let Some((line, _)) = lines.next() {
            bail!("line {line}: more lines than the header's {sets} x 2 x {per_set} pairs");
        }
        Ok(Self {
            sets,
            per_set,
            pairs,
        })
    }

    /// Folds used for this list: the sets when there are several, else 10.
    pub fn folds(&self) -> usize {
        if self.sets > 1 {
            self.sets
        } else {
            crate::pairs::PROTOCOL_FOLDS.min(self.per_set)
        }
    }

    /// Number of matched pairs.
    pub fn matched(&self) -> usize {
        self.pairs.iter().filter(|p| p.same).count()
    }

    /// Resolve the images under `root` (`<root>/<Name>/<Name>_NNNN.<ext>`, extensions
    /// [`LFW_EXTENSIONS`]) and order the pairs into [`LfwPairs::folds`] folds (see the module doc).
    /// Errors name the line and the missing file.
    pub fn resolve(&self, root: &Path) -> Result<LfwSet> {
        self.resolve_with_folds(root, self.folds())
    }

    /// [`LfwPairs::resolve`] for `folds` folds instead of the list's own: fold `f` holds the `f`-th
    /// contiguous share of the matched and of the mismatched pairs. Fails when `folds` is 0 or larger
    /// than the number of matched pairs.
    pub fn resolve_with_folds(&self, root: &Path, folds: usize) -> Result<LfwSet> {
        let matched_count = self.matched();
        ensure!(
            folds >= 1 && folds <= matched_count.min(self.pairs.len() - matched_count),
            "{folds} folds for {matched_count} matched and {} mismatched pairs: need 1 to {} folds",
            self.pairs.len() - matched_count,
            matched_count.min(self.pairs.len() - matched_count)
        );
        ensure!(
            root.is_dir(),
            "LFW image folder {} does not exist",
            root.display()
        );
        let mut index: HashMap<LfwImage, usize> = HashMap::new();
        let mut images = Vec::new();
        let mut find = |img: &LfwImage, line: usize| -> Result<usize> {
            if let Some(&i) = index.get(img) {
                return Ok(i);
            }
            let dir = root.join(&img.name);
            let stem = img.stem();
            let path = LFW_EXTENSIONS
                .iter()
                .map(|e| dir.join(format!("{stem}.{e}")))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "line {line}: no image {}/{stem}.{{{}}}",
                        dir.display(),
                        LFW_EXTENSIONS.join(",")
                    )
                })?;
            images.push(path);
            index.insert(img.clone(), images.len() - 1);
            Ok(images.len() - 1)
        };
        let mut resolved = Vec::with_capacity(self.pairs.len());
        for p in &self.pairs {
            resolved.push(Pair {
                a: find(&p.a, p.line)?,
                b: find(&p.b, p.line)?,
                same: p.same,
            });
        }
        let (matched, mismatched): (Vec<Pair>, Vec<Pair>) = resolved.iter().partition(|p| p.same);
        let pairs = kfold(matched.len(), folds)
            .into_iter()
            .zip(kfold(mismatched.len(), folds))
            .flat_map(|(m, n)| {
                matched[m]
                    .iter()
                    .chain(&mismatched[n])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(LfwSet {
            images,
            pairs: PairSet { pairs, folds },
        })
    }
}

fn parse_pair(text: &str, same: bool, line: usize) -> Result<LfwPair> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let num = |s: &str| -> Result<u32> {
        let n: u32 = s.parse().with_context(|| {
            format!("line {line}: image number {s:?} is not a positive integer")
        })?;
        ensure!(n > 0, "line {line}: image numbers start at 1");
        Ok(n)
    };
    let img = |name: &str, n: &str| -> Result<LfwImage> {
        Ok(LfwImage {
            name: name.to_string(),
            number: num(n)?,
        })
    };
    match (same, f.as_slice()) {
        (true, [name, i, j]) => Ok(LfwPair {
            a: img(name, i)?,
            b: img(name, j)?,
            same,
            line,
        }),
        (false, [n1, i, n2, j]) => Ok(LfwPair {
            a: img(n1, i)?,
            b: img(n2, j)?,
            same,
            line,
        }),
        (true, _) => bail!("line {line}: expected a matched pair `name i j`, got {text:?}"),
        (false, _) => {
            bail!("line {line}: expected a mismatched pair `name1 i name2 j`, got {text:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view2_header_and_errors() {
        let text = "2 1\nA 1 2\nA 1 B 1\nC 1 3\nC 2 D 4\n";
        let p = LfwPairs::parse(text).unwrap();
        assert_eq!((p.sets, p.per_set, p.pairs.len(), p.folds()), (2, 1, 4, 2));
        assert_eq!(
            p.pairs[3].b,
            LfwImage {
                name: "D".into(),
                number: 4
            }
        );
        assert!(!p.pairs[3].same && p.pairs[2].same);
        assert_eq!(p.pairs[3].line, 5);
        let err = format!(
            "{:#}",
            LfwPairs::parse("2 1\nA 1 2\nA 1 B 1\nC 1 3\n").unwrap_err()
        );
        assert!(err.contains("ends early") && err.contains("set 2"), "{err}");
        let err = format!(
            "{:#}",
            LfwPairs::parse("1\nA 1 B 2\nA 1 B 1\n").unwrap_err()
        );
        assert!(err.contains("line 2") && err.contains("matched"), "{err}");
        let err = format!("{:#}", LfwPairs::parse("1\nA 1 2\nA 1 B x\n").unwrap_err());
        assert!(err.contains("line 3") && err.contains("\"x\""), "{err}");
        let err = format!(
            "{:#}",
            LfwPairs::parse("1\nA 1 2\nA 1 B 1\nextra\n").unwrap_err()
        );
        assert!(err.contains("line 4"), "{err}");
        assert!(LfwPairs::parse("ten\n").is_err());
    }
}
