//! PyTorch `.pt`/`.pth` state dicts (as `torch.save(model.state_dict(), path)` writes them, and as
//! arcface_torch releases its backbones) read without Python.
//!
//! The format since PyTorch 1.6 is a zip archive of stored (uncompressed) entries under one folder
//! (named after the file): `FOLDER/data.pkl`, a pickle of the object, and `FOLDER/data/KEY`, the raw
//! little-endian bytes of each storage (`FOLDER/byteorder` says `little`). In the pickle every
//! tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is
//! a persistent id `("storage", torch.FloatStorage, KEY, location, numel)`; `nn.Parameter`s are
//! wrapped in `torch._utils._rebuild_parameter`. The pickle is run by our own data-only reader
//! ([`facerec_evaluation::pickle`]), which never imports or calls anything; this module turns the
//! resulting values into tensors. The zip reader here handles what `torch.save` writes: stored
//! entries, zip64 sizes and offsets, alignment padding in the local headers.
//!
//! Accepted top-level objects: a state dict (`OrderedDict` or `dict` of name -> tensor), or an
//! arcface_torch training checkpoint (`checkpoint_gpu_N.pt`: a dict whose `state_dict_backbone`
//! is the backbone's state dict), or a dict with a `state_dict` entry. Not accepted, with an error
//! naming the file: the legacy (pre-1.6) non-zip format, compressed entries, big-endian archives,
//! pickled modules (`torch.save(model)`), and anything whose values are not tensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use facerec_evaluation::pickle::{self, Value};
use tch::{Kind, Tensor};

/// True when `path` is named like a PyTorch file (`.pt`, `.pth`) or starts like a zip archive.
pub fn is_torch_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("pt" | "pth")) {
        return true;
    }
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head == *b"PK\x03\x04"
}

/// The state dict in `path` as `(name, tensor)` pairs in file order (CPU tensors, the file's
/// dtypes). Names are as stored (prefixes such as `module.` are the caller's business).
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_state_dict(&data).with_context(|| format!("{}", path.display()))
}

/// [`read_state_dict`] of bytes already in memory.
pub fn parse_state_dict(data: &[u8]) -> Result<Vec<(String, Tensor)>> {
    if data.first() == Some(&0x80) {
        bail!("a legacy (pre-PyTorch 1.6) torch.save file, not a zip archive; re-save it with a current torch.save");
    }
    let zip = Zip::open(data)?;
    let pkl = zip
        .names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect::<Vec<_>>();
    let pkl_name = match pkl.as_slice() {
        [one] => one.to_string(),
        [] => bail!("a zip archive without FOLDER/data.pkl: not a torch.save file"),
        _ => bail!("a zip archive with {} data.pkl entries", pkl.len()),
    };
    let folder = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = zip.entry(&format!("{folder}byteorder"))? {
        ensure!(
            order == b"little",
            "byteorder is {:?}; only little-endian archives are read",
            String::from_utf8_lossy(order)
        );
    }
    let pkl = zip.entry(&pkl_name)?.expect("listed above");
    let value = pickle::parse(pkl).with_context(|| format!("the pickle {pkl_name}"))?;
    let dict = state_dict_of(value)?;
    let mut out = Vec::with_capacity(dict.len());
    for (k, v) in dict {
        let Value::Str(name) = k else {
            bail!("not a state dict: a key is a {}, not a string", k.kind());
        };
        let t = tensor_of(&v, &zip, &folder).with_context(|| format!("key `{name}`"))?;
        out.push((name, t));
    }
    Ok(out)
}

/// The name -> tensor dict inside the unpickled top-level object.
fn state_dict_of(value: Value) -> Result<Vec<(Value, Value)>> {
    let value = match value {
        // OrderedDict's `_metadata` attribute.
        Value::Build { object, .. } => *object,
        v => v,
    };
    let Value::Dict(items) = value else {
        bail!(
            "not a state dict: the file holds a {} (save model.state_dict(), not the model)",
            value.kind()
        );
    };
    for wrapper in ["state_dict_backbone", "state_dict"] {
        let inner = items
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == wrapper));
        if let Some((_, v)) = inner {
            return state_dict_of(v.clone()).with_context(|| format!("its `{wrapper}` entry"));
        }
    }
    Ok(items)
}

/// The element kind and size of a `torch.XStorage` class.
fn storage_kind(name: &str) -> Result<(Kind, usize)> {
    Ok(match name {
        "FloatStorage" => (Kind::Float, 4),
        "DoubleStorage" => (Kind::Double, 8),
        "HalfStorage" => (Kind::Half, 2),
        "BFloat16Storage" => (Kind::BFloat16, 2),
        "LongStorage" => (Kind::Int64, 8),
        "IntStorage" => (Kind::Int, 4),
        "ShortStorage" => (Kind::Int16, 2),
        "CharStorage" => (Kind::Int8, 1),
        "ByteStorage" => (Kind::Uint8, 1),
        "BoolStorage" => (Kind::Bool, 1),
        other => bail!("storage type torch.{other} is not supported"),
    })
}

fn int(v: &Value, what: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => bail!("{what} is a {}, not an int", other.kind()),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(t) | Value::List(t) => t.iter().map(|x| int(x, what)).collect(),
        other => bail!("{what} is a {}, not a tuple", other.kind()),
    }
}

/// One tensor value of the state dict, read from its storage entry.
fn tensor_of(v: &Value, zip: &Zip, folder: &str) -> Result<Tensor> {
    let Value::Call { callable, args } = v else {
        bail!(
            "not a state dict: the value is a {}, not a tensor",
            v.kind()
        );
    };
    let Value::Global { module, name } = callable.as_ref() else {
        bail!("not a tensor: a call of {}", callable.kind());
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_parameter") => {
            let data = args
                .first()
                .context("_rebuild_parameter without arguments")?;
            return tensor_of(data, zip, folder);
        }
        ("torch._utils", "_rebuild_tensor_v2") => {}
        _ => {
            bail!("not a plain tensor: {module}.{name} (quantized and sparse tensors are not read)")
        }
    }
    ensure!(
        args.len() >= 4,
        "_rebuild_tensor_v2 with {} arguments",
        args.len()
    );
    let Value::Persistent(pid) = &args[0] else {
        bail!("the storage is a {}, not a persistent id", args[0].kind());
    };
    let Value::Tuple(pid) = pid.as_ref() else {
        bail!("the storage id is a {}, not a tuple", pid.kind());
    };
    let (class, key, numel) = match pid.as_slice() {
        [Value::Str(tag), Value::Global { name, .. }, Value::Str(key), _, numel]
            if tag == "storage" =>
        {
            (name, key, int(numel, "the storage size")?)
        }
        _ => bail!("an unexpected storage id {pid:?}"),
    };
    let (kind, elem) = storage_kind(class)?;
    let offset = int(&args[1], "the storage offset")?;
    let size = ints(&args[2], "the size")?;
    let stride = ints(&args[3], "the stride")?;
    ensure!(
        size.len() == stride.len() && size.iter().chain(&stride).all(|&d| d >= 0) && offset >= 0,
        "size {size:?}, stride {stride:?} and offset {offset} do not describe a tensor"
    );
    let entry = format!("{folder}data/{key}");
    let bytes = zip
        .entry(&entry)?
        .with_context(|| format!("its storage {entry} is not in the archive (truncated file?)"))?;
    let numel = usize::try_from(numel).context("a negative storage size")?;
    ensure!(
        bytes.len() >= numel * elem,
        "its storage {entry} has {} bytes, {numel} x {elem} expected (truncated file?)",
        bytes.len()
    );
    // The last element the view touches must lie inside the storage.
    let count: i64 = size.iter().product();
    if count > 0 {
        let last = offset
            + size
                .iter()
                .zip(&stride)
                .map(|(n, s)| (n - 1) * s)
                .sum::<i64>();
        ensure!(
            (last as usize) < numel,
            "size {size:?} / stride {stride:?} at offset {offset} reach past its storage of {numel}"
        );
    }
    let storage = Tensor::f_from_data_size(&bytes[..numel * elem], &[numel as i64], kind)?;
    Ok(storage
        .f_as_strided(size.as_slice(), stride.as_slice(), offset)?
        .contiguous())
}

/// The central directory of a zip archive held in memory (stored entries only).
struct Zip<'a> {
    data: &'a [u8],
    /// name -> (local header offset, compressed size, method)
    entries: HashMap<String, (u64, u64, u16)>,
}

fn le16(d: &[u8], at: usize) -> Result<u16> {
    let b = d.get(at..at + 2).context("truncated zip structure")?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}
fn le32(d: &[u8], at: usize) -> Result<u32> {
    let b = d.get(at..at + 4).context("truncated zip structure")?;
    Ok(u32::from_le_bytes(b.try_into().unwrap()))
}
fn le64(d: &[u8], at: usize) -> Result<u64> {
    let b = d.get(at..at + 8).context("truncated zip structure")?;
    Ok(u64::from_le_bytes(b.try_into().unwrap()))
}

impl<'a> Zip<'a> {
    fn open(data: &'a [u8]) -> Result<Self> {
        const EOCD: u32 = 0x0605_4b50;
        let search_from = data.len().saturating_sub(22 + 65_535);
        let eocd = (search_from..data.len().saturating_sub(21))
            .rev()
            .find(|&i| le32(data, i).ok() == Some(EOCD))
            .context(
                "not a zip archive (no end-of-central-directory record): a truncated file, or not a torch.save file",
            )?;
        let mut count = u64::from(le16(data, eocd + 10)?);
        let mut cd = u64::from(le32(data, eocd + 16)?);
        if count == 0xFFFF || cd == 0xFFFF_FFFF {
            // Zip64: the locator sits just before the record.
            ensure!(
                eocd >= 20 && le32(data, eocd - 20)? == 0x0706_4b50,
                "zip64 archive without its locator"
            );
            let rec = le64(data, eocd - 12)? as usize;
            ensure!(
                le32(data, rec)? == 0x0606_4b50,
                "zip64 end record not found"
            );
            count = le64(data, rec + 32)?;
            cd = le64(data, rec + 48)?;
        }
        let mut entries = HashMap::new();
        let mut at = usize::try_from(cd)?;
        for _ in 0..count {
            ensure!(
                le32(data, at)? == 0x0201_4b50,
                "a broken central directory at byte {at} (truncated or corrupt file)"
            );
            let method = le16(data, at + 10)?;
            let mut size = u64::from(le32(data, at + 20)?);
            let usize32 = u64::from(le32(data, at + 24)?);
            let name_len = usize::from(le16(data, at + 28)?);
            let extra_len = usize::from(le16(data, at + 30)?);
            let comment_len = usize::from(le16(data, at + 32)?);
            let mut local = u64::from(le32(data, at + 42)?);
            let name_bytes = data
                .get(at + 46..at + 46 + name_len)
                .context("truncated zip structure")?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            // Zip64 extra field: the 64-bit values of the 32-bit fields set to 0xFFFFFFFF, in order
            // uncompressed size, compressed size, local header offset.
            let extra = data
                .get(at + 46 + name_len..at + 46 + name_len + extra_len)
                .context("truncated zip structure")?;
            let mut e = 0;
            while e + 4 <= extra.len() {
                let (id, len) = (le16(extra, e)?, usize::from(le16(extra, e + 2)?));
                if id == 1 {
                    let mut f = e + 4;
                    if usize32 == 0xFFFF_FFFF {
                        f += 8;
                    }
                    if size == 0xFFFF_FFFF {
                        size = le64(extra, f)?;
                        f += 8;
                    }
                    if local == 0xFFFF_FFFF {
                        local = le64(extra, f)?;
                    }
                }
                e += 4 + len;
            }
            entries.insert(name, (local, size, method));
            at += 46 + name_len + extra_len + comment_len;
        }
        Ok(Zip { data, entries })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The bytes of entry `name`, `None` when the archive has no such entry.
    fn entry(&self, name: &str) -> Result<Option<&'a [u8]>> {
        let Some(&(local, size, method)) = self.entries.get(name) else {
            return Ok(None);
        };
        ensure!(
            method == 0,
            "entry {name} is compressed (method {method}); torch.save writes stored entries"
        );
        let local = usize::try_from(local)?;
        ensure!(
            le32(self.data, local).ok() == Some(0x0403_4b50),
            "entry {name}: no local header at byte {local} (truncated or corrupt file)"
        );
        let start = local
            + 30
            + usize::from(le16(self.data, local + 26)?)
            + usize::from(le16(self.data, local + 28)?);
        let end = start + usize::try_from(size)?;
        let bytes = self.data.get(start..end).with_context(|| {
            format!(
                "entry {name}: bytes {start}..{end} lie past the end ({}): truncated file",
                self.data.len()
            )
        })?;
        Ok(Some(bytes))
    }
}
