//! insightface verification packs (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, `calfw.bin`, `cplfw.bin`, ...):
//! a Python pickle of `(bins, issame_list)` read without Python (SPEC 6.1, "Container").
//!
//! `bins` holds `2P` encoded images, pair `k` is `(bins[2k], bins[2k+1])` with label `issame_list[k]`.
//! Both variants that exist are read:
//! - byte strings: the official packs were pickled by Python 2 with protocol 2, so each image is a `str`
//!   (`SHORT_BINSTRING` / `BINSTRING`); Python 3 writes `bytes` (`SHORT_BINBYTES` / `BINBYTES`, or with
//!   protocol 2 the call `_codecs.encode(text, 'latin1')`), all accepted;
//! - numpy `uint8` arrays from `cv2.imencode` (the newer `build_eval_pack.py`): `numpy ... _reconstruct`
//!   plus `BUILD` with the state `(version, shape, dtype, fortran, data)` (protocols 2 to 4), or
//!   `numpy ... _frombuffer(buffer, dtype, shape, order)` (protocol 5).
//!
//! Labels may be Python bools, the integers 0/1, or numpy bool scalars. A corrupt or truncated pickle, an
//! item of another type, or an image count that is not twice the pair count is an error naming the file
//! and the item.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;

use crate::images::{decode_all, decode_rgb, Fit};
use crate::pairs::{Pair, PairSet};
use crate::pickle::{self, Value};

/// A verification pack: encoded images and one label per pair.
#[derive(Debug, Clone, PartialEq)]
pub struct BinPack {
    /// `2P` encoded images (JPEG or PNG bytes), pair `k` is `(images[2k], images[2k+1])`.
    pub images: Vec<Arc<[u8]>>,
    /// `P` labels: whether pair `k` shows the same person.
    pub issame: Vec<bool>,
}

impl BinPack {
    /// Read and parse a pack file.
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&data).with_context(|| format!("verification pack {}", path.display()))
    }

    /// Parse a pack from the pickle bytes.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let value = pickle::parse(data)?;
        let (bins, issame) = match value {
            Value::Tuple(mut t) if t.len() == 2 => {
                let issame = t.pop().unwrap();
                (t.pop().unwrap(), issame)
            }
            other => bail!(
                "the pickle holds a {}, expected a tuple (bins, issame_list)",
                other.kind()
            ),
        };
        let bins = sequence(bins).context("bins (the first tuple item)")?;
        let issame = sequence(issame).context("issame_list (the second tuple item)")?;
        let images = bins
            .into_iter()
            .enumerate()
            .map(|(i, v)| image_bytes(v).with_context(|| format!("image {i} of bins")))
            .collect::<Result<Vec<_>>>()?;
        let issame = issame
            .into_iter()
            .enumerate()
            .map(|(k, v)| label(v).with_context(|| format!("label {k} of issame_list")))
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            images.len() == 2 * issame.len(),
            "{} images for {} pairs: a pack holds exactly two images per pair",
            images.len(),
            issame.len()
        );
        Ok(Self { images, issame })
    }

    /// The pairs `(2k, 2k + 1, issame[k])`, in pack order (the protocol's folds are contiguous).
    pub fn pairs(&self) -> Vec<Pair> {
        self.issame
            .iter()
            .enumerate()
            .map(|(k, &same)| Pair {
                a: 2 * k,
                b: 2 * k + 1,
                same,
            })
            .collect()
    }

    /// The pairs with the pack's folds: 10 contiguous folds, as insightface scores a pack (see
    /// [`PairSet`]).
    pub fn pair_set(&self) -> PairSet {
        PairSet::contiguous(self.pairs())
    }

    /// Decode every image to RGB `size x size`, fitted by `fit`, on `threads` threads (`tick` once per
    /// image). Errors name the image index.
    ///
    /// # Shapes
    /// Returns `[2P, 3, size, size]` Uint8 on the CPU.
    pub fn decode(
        &self,
        size: u32,
        fit: Fit,
        threads: usize,
        tick: &(dyn Fn() + Sync),
    ) -> Result<Tensor> {
        decode_all(
            self.images.len(),
            size as usize,
            threads,
            &|i| {
                decode_rgb(&self.images[i], size, fit)
                    .with_context(|| format!("image {i} of the pack"))
            },
            tick,
        )
    }
}

fn sequence(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::List(v) | Value::Tuple(v) => Ok(v),
        other => bail!("a {}, expected a list", other.kind()),
    }
}

fn is_global(v: &Value, modules: &[&str], want: &str) -> bool {
    matches!(v, Value::Global { module, name } if name == want && modules.contains(&module.as_str()))
}

const MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
const NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];

/// Bytes from `bytes`, a Python 2 `str`, `_codecs.encode(text, 'latin1')`, or a pickled numpy uint8 array.
fn image_bytes(v: Value) -> Result<Arc<[u8]>> {
    match v {
        Value::Bytes(b) => Ok(b),
        Value::Call { callable, args } if is_global(&callable, &["_codecs"], "encode") => {
            latin1(args).map(Arc::from)
        }
        Value::Call { callable, mut args } if is_global(&callable, &NUMERIC, "_frombuffer") => {
            // _frombuffer(buffer, dtype, shape, order)
            ensure!(
                args.len() == 4,
                "numpy _frombuffer with {} arguments",
                args.len()
            );
            let shape = shape(args.remove(2))?;
            check_u8(&args[1])?;
            let data = image_bytes(args.swap_remove(0)).context("the array buffer")?;
            check_len(&shape, data.len())?;
            Ok(data)
        }
        Value::Build { object, state } => {
            let Value::Call { callable, args } = *object else {
                bail!("a built {}, expected a numpy array", object.kind());
            };
            ensure!(
                is_global(&callable, &MULTIARRAY, "_reconstruct")
                    && args.first().is_some_and(|a| is_global(
                        a,
                        &["numpy", MULTIARRAY[0], MULTIARRAY[1]],
                        "ndarray"
                    )),
                "a built object of {}, expected numpy's _reconstruct of ndarray",
                callable.kind()
            );
            // state = (version, shape, dtype, is_fortran, data)
            let Value::Tuple(mut st) = *state else {
                bail!("numpy array state is a {}, expected a tuple", state.kind());
            };
            ensure!(
                st.len() == 5,
                "numpy array state has {} items, expected 5",
                st.len()
            );
            let data = image_bytes(st.pop().unwrap()).context("the array data")?;
            check_u8(&st[2])?;
            let shape = shape(st.swap_remove(1))?;
            check_len(&shape, data.len())?;
            Ok(data)
        }
        other => bail!(
            "a {}, expected encoded image bytes (str, bytes or a numpy uint8 array)",
            other.kind()
        ),
    }
}

/// `_codecs.encode(text, 'latin1')`: Python 3's protocol-2 spelling of `bytes`.
fn latin1(args: Vec<Value>) -> Result<Vec<u8>> {
    match args.as_slice() {
        [Value::Str(text), Value::Str(enc)] if matches!(enc.as_str(), "latin1" | "latin-1") => text
            .chars()
            .map(|c| {
                u8::try_from(u32::from(c)).context("a latin1 string holds a character above 255")
            })
            .collect(),
        _ => bail!("_codecs.encode with arguments other than (str, 'latin1')"),
    }
}

fn shape(v: Value) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(t) => t
            .into_iter()
            .map(|d| match d {
                Value::Int(n) if n >= 0 => Ok(n),
                other => bail!("array shape holds a {}", other.kind()),
            })
            .collect(),
        other => bail!("array shape is a {}", other.kind()),
    }
}

fn check_len(shape: &[i64], len: usize) -> Result<()> {
    let n: i64 = shape.iter().product();
    ensure!(
        n as usize == len,
        "numpy array of shape {shape:?} carries {len} bytes"
    );
    Ok(())
}

/// The dtype must be `uint8` (`dtype('u1', ...)`, possibly wrapped in a BUILD of its state).
fn check_u8(dtype: &Value) -> Result<()> {
    let inner = match dtype {
        Value::Build { object, .. } => object.as_ref(),
        other => other,
    };
    match inner {
        Value::Call { callable, args } if is_global(callable, &["numpy"], "dtype") => {
            match args.first() {
                Some(Value::Str(s)) if s == "u1" => Ok(()),
                Some(Value::Str(s)) => bail!("numpy array of dtype {s:?}, expected uint8 ('u1')"),
                _ => bail!("a numpy dtype without a type string"),
            }
        }
        other => bail!("array dtype is a {}", other.kind()),
    }
}

fn label(v: Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(b),
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        // numpy.bool_: scalar(dtype('b1'), b'\x00' | b'\x01')
        Value::Call { callable, args } if is_global(&callable, &MULTIARRAY, "scalar") => {
            match args.get(1) {
                Some(Value::Bytes(b)) if b.len() == 1 && b[0] <= 1 => Ok(b[0] == 1),
                _ => bail!("a numpy scalar that is not a bool"),
            }
        }
        other => bail!("a {}, expected a bool", other.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_mismatch_is_an_error() {
        // ([b'a', b'b', b'c'], [True])
        let data = b"\x80\x02](U\x01aU\x01bU\x01ce]\x88a\x86.";
        let err = format!("{:#}", BinPack::from_bytes(data).unwrap_err());
        assert!(err.contains("3 images for 1 pairs"), "{err}");
        let data = b"\x80\x02](U\x01aU\x01be]\x88a\x86.";
        let pack = BinPack::from_bytes(data).unwrap();
        assert_eq!(
            pack.pairs(),
            [Pair {
                a: 0,
                b: 1,
                same: true
            }]
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let data = b"\x80\x02](U\x01aK\x05e]\x88a\x86.";
        let err = format!("{:#}", BinPack::from_bytes(data).unwrap_err());
        assert!(err.contains("image 1 of bins"), "{err}");
        let data = b"\x80\x02](U\x01aU\x01be]K\x05a\x86.";
        let err = format!("{:#}", BinPack::from_bytes(data).unwrap_err());
        assert!(err.contains("label 0 of issame_list"), "{err}");
    }
}
