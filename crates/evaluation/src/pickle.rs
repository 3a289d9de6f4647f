//! A minimal, safe Python pickle reader: enough of the pickle virtual machine to read insightface
//! verification packs (SPEC 6.1) without Python.
//!
//! The pickle format is a small stack machine (Python's `pickletools` documents every opcode). This reader
//! runs the opcodes that data-only pickles of lists, tuples, dicts, strings, byte strings, booleans,
//! integers, floats and numpy arrays use, from protocol 0 text integers to protocol 5 frames. It never
//! imports or calls anything: `GLOBAL`/`STACK_GLOBAL` produce a [`Value::Global`] naming the class,
//! `REDUCE`/`NEWOBJ` a [`Value::Call`] holding the callable and its arguments, `BUILD` a
//! [`Value::Build`]; interpreting those (numpy's `_reconstruct`, `_frombuffer`, `_codecs.encode`) is the
//! caller's business (see `bin_pack`). Persistent ids (`PERSID`/`BINPERSID`, how `torch.save` refers
//! to tensor storages) become a [`Value::Persistent`] holding the id. Unknown opcodes, truncated input
//! and stack misuse are errors naming the byte offset.
//!
//! Deliberate difference from Python: a memo reference (`BINGET`) to a list or dict yields a copy of the
//! container as it was when it was memoised, not a shared reference. Packs never refer to a container
//! twice. Byte strings are reference-counted, so memoising an image does not copy it. One class is
//! understood: `collections.OrderedDict()` with no arguments (how `torch.save` writes a state dict)
//! is an empty [`Value::Dict`], so the `SETITEMS` that follow fill it.
//!
//! Hostile input is bounded: every value put into a container, duplicated (`DUP`) or copied through
//! the memo is counted (its nodes, walked without recursion), and a pickle that makes more than
//! `16 x its size + 65,536` of them (a few `DUP`/`APPEND` pairs double a list each time) or nests
//! containers more than [`MAX_DEPTH`] deep (which would overflow the stack when dropped) is refused.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

/// A value built by the pickle machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in `i64`.
    Int(i64),
    /// A float.
    Float(f64),
    /// Raw bytes: Python 2 `str` (`SHORT_BINSTRING`, `BINSTRING`), Python 3 `bytes`, `bytearray`.
    Bytes(Arc<[u8]>),
    /// A unicode string.
    Str(String),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A class or function named by `GLOBAL`/`STACK_GLOBAL` (never imported).
    Global { module: String, name: String },
    /// `callable(*args)` from `REDUCE` or `cls.__new__(cls, *args)` from `NEWOBJ` (never called).
    Call {
        callable: Box<Value>,
        args: Vec<Value>,
    },
    /// A persistent id from `PERSID`/`BINPERSID` (never resolved): `torch.save` writes
    /// `("storage", storage class, key, location, numel)` for every tensor storage.
    Persistent(Box<Value>),
    /// `obj.__setstate__(state)` from `BUILD` (never applied).
    Build {
        object: Box<Value>,
        state: Box<Value>,
    },
}

impl Value {
    /// A short description for error messages (`list of 3`, `bytes (1200)`, ...).
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Bytes(b) => format!("bytes ({} bytes)", b.len()),
            Value::Str(_) => "str".into(),
            Value::List(v) => format!("list of {}", v.len()),
            Value::Tuple(v) => format!("tuple of {}", v.len()),
            Value::Dict(v) => format!("dict of {}", v.len()),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Call { callable, .. } => format!("call of {}", callable.kind()),
            Value::Build { object, .. } => format!("built {}", object.kind()),
            Value::Persistent(_) => "persistent id".into(),
        }
    }
}

/// A stack entry: a value or a `MARK`.
#[derive(Debug, Clone)]
enum Slot {
    Mark,
    Value(Value),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u64, Value>,
    /// Values the pickle may still nest or copy (see the module docs).
    work_left: usize,
}

/// The deepest nesting of containers a pickle may build.
pub const MAX_DEPTH: usize = 1000;

/// Nodes and nesting depth of `v`, walked without recursion; `None` past `budget` nodes.
fn measure(v: &Value, budget: usize) -> Option<(usize, usize)> {
    let mut todo = vec![(v, 1usize)];
    let (mut nodes, mut depth) = (0usize, 0usize);
    while let Some((v, d)) = todo.pop() {
        nodes += 1;
        if nodes > budget {
            return None;
        }
        depth = depth.max(d);
        match v {
            Value::List(xs) | Value::Tuple(xs) => todo.extend(xs.iter().map(|x| (x, d + 1))),
            Value::Dict(kv) => todo.extend(kv.iter().flat_map(|(k, v)| [(k, d + 1), (v, d + 1)])),
            Value::Call { callable, args } => {
                todo.push((callable, d + 1));
                todo.extend(args.iter().map(|x| (x, d + 1)));
            }
            Value::Build { object, state } => todo.extend([(&**object, d + 1), (&**state, d + 1)]),
            Value::Persistent(pid) => todo.push((pid, d + 1)),
            _ => {}
        }
    }
    Some((nodes, depth))
}

/// Parse one pickle from `data` and return the value `STOP` leaves on the stack. Bytes after `STOP` are
/// ignored (as `pickle.loads` does).
///
/// Errors on a truncated stream, an unknown opcode, a malformed argument or a stack underflow, naming the
/// opcode and its byte offset.
pub fn parse(data: &[u8]) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        work_left: data.len().saturating_mul(16).saturating_add(65_536),
    };
    loop {
        let at = m.pos;
        let op = *m.data.get(at).with_context(|| {
            format!(
                "pickle truncated: no STOP opcode before the end ({} bytes)",
                data.len()
            )
        })?;
        m.pos += 1;
        if let Some(v) = m.step(op).with_context(|| {
            format!(
                "pickle opcode {} (0x{op:02x}) at byte {at}",
                opcode_name(op)
            )
        })? {
            return Ok(v);
        }
    }
}

impl Machine<'_> {
    /// Count `v` against the work budget and the depth limit (it is being nested or copied).
    fn charge(&mut self, v: &Value) -> Result<()> {
        let Some((nodes, depth)) = measure(v, self.work_left) else {
            bail!(
                "the pickle nests or copies more than {} values ({} bytes): corrupt or hostile",
                self.data.len().saturating_mul(16).saturating_add(65_536),
                self.data.len()
            );
        };
        ensure!(
            depth < MAX_DEPTH,
            "containers nested more than {MAX_DEPTH} deep: corrupt or hostile"
        );
        self.work_left -= nodes;
        Ok(())
    }

    fn charge_all(&mut self, items: &[Value]) -> Result<()> {
        items.iter().try_for_each(|v| self.charge(v))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .with_context(|| {
                format!(
                    "truncated: needs {n} bytes at byte {}, the stream has {}",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A length prefix as `usize`, checked against the bytes left so a corrupt length fails cleanly.
    fn len(&mut self, n: u64) -> Result<usize> {
        let left = (self.data.len() - self.pos) as u64;
        ensure!(
            n <= left,
            "truncated: a length of {n} bytes at byte {}, but only {left} bytes remain",
            self.pos
        );
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("truncated: a text argument has no newline")?;
        let s = std::str::from_utf8(&rest[..end])
            .context("a text argument is not UTF-8")?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Value(v));
    }

    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => bail!("found a MARK where a value was expected"),
            None => bail!("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => bail!("found a MARK where a value was expected"),
            None => bail!("stack underflow"),
        }
    }

    /// Pop everything above the topmost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .context("no MARK on the stack")?;
        let items = self
            .stack
            .split_off(at + 1)
            .into_iter()
            .map(|s| match s {
                Slot::Value(v) => v,
                Slot::Mark => unreachable!("the topmost mark is at `at`"),
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.charge(&v)?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .with_context(|| format!("memo key {key} was never stored"))?
            .clone();
        self.charge(&v)?;
        self.push(v);
        Ok(())
    }

    fn extend_top(&mut self, items: Vec<Value>) -> Result<()> {
        self.charge_all(&items)?;
        match self.top()? {
            Value::List(list) => {
                list.extend(items);
                Ok(())
            }
            other => bail!("APPEND(S) onto a {}, not a list", other.kind()),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        ensure!(
            items.len().is_multiple_of(2),
            "SETITEMS with an odd number ({}) of keys and values",
            items.len()
        );
        self.charge_all(&items)?;
        match self.top()? {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => bail!("SETITEM(S) onto a {}, not a dict", other.kind()),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Bytes(Arc::from(self.take(n)?)))
    }

    fn unicode(&mut self, n: usize) -> Result<Value> {
        let s = std::str::from_utf8(self.take(n)?).context("a unicode string is not UTF-8")?;
        Ok(Value::Str(s.to_string()))
    }

    /// Execute one opcode; `Some(value)` on STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value>> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                ensure!(proto <= 5, "unsupported pickle protocol {proto}");
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint only
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.stack.push(Slot::Mark),
            b'0' => {
                self.stack.pop().context("POP on an empty stack")?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.charge(&v)?;
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = self.i32()?;
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v.into()));
            }
            b'I' => {
                let line = self.line()?;
                self.push(match line.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().with_context(|| format!("INT {s:?}"))?),
                });
            }
            b'L' => {
                let line = self.line()?;
                let s = line.trim_end_matches('L');
                self.push(Value::Int(
                    s.parse().with_context(|| format!("LONG {s:?}"))?,
                ));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    self.u32()? as u64
                };
                let n = self.len(n)?;
                ensure!(n <= 8, "LONG of {n} bytes does not fit in 64 bits");
                let raw = self.take(n)?;
                let mut buf = [if raw.last().is_some_and(|&b| b & 0x80 != 0) {
                    0xff
                } else {
                    0
                }; 8];
                buf[..n].copy_from_slice(raw);
                self.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                self.push(Value::Float(v));
            }
            b'F' => {
                let line = self.line()?;
                self.push(Value::Float(
                    line.parse().with_context(|| format!("FLOAT {line:?}"))?,
                ));
            }
            b'U' | b'C' => {
                let n = self.u8()? as u64;
                let n = self.len(n)?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'T' => {
                let n = self.i32()?;
                ensure!(n >= 0, "BINSTRING with negative length {n}");
                let n = self.len(n as u64)?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'B' => {
                let n = self.u32()? as u64;
                let n = self.len(n)?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            0x8e | 0x96 => {
                let n = self.u64()?;
                let n = self.len(n)?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'X' => {
                let n = self.u32()? as u64;
                let n = self.len(n)?;
                let v = self.unicode(n)?;
                self.push(v);
            }
            0x8c => {
                let n = self.u8()? as u64;
                let n = self.len(n)?;
                let v = self.unicode(n)?;
                self.push(v);
            }
            0x8d => {
                let n = self.u64()?;
                let n = self.len(n)?;
                let v = self.unicode(n)?;
                self.push(v);
            }
            b']' => self.push(Value::List(Vec::new())),
            b')' => self.push(Value::Tuple(Vec::new())),
            b'}' => self.push(Value::Dict(Vec::new())),
            b'l' => {
                let items = self.pop_mark()?;
                self.charge_all(&items)?;
                self.push(Value::List(items));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.charge_all(&items)?;
                self.push(Value::Tuple(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.push(Value::Dict(Vec::new()));
                self.set_items(items)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                ensure!(
                    self.stack.len() >= n,
                    "TUPLE{n} with {} stack entries",
                    self.stack.len()
                );
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.charge_all(&items)?;
                self.push(Value::Tuple(items));
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_top(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'q' => {
                let k = self.u8()?;
                self.memo_put(k.into())?;
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k.into())?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            b'p' => {
                let k = self.line()?;
                self.memo_put(k.trim().parse().with_context(|| format!("PUT {k:?}"))?)?;
            }
            b'h' => {
                let k = self.u8()?;
                self.memo_get(k.into())?;
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k.into())?;
            }
            b'g' => {
                let k = self.line()?;
                self.memo_get(k.trim().parse().with_context(|| format!("GET {k:?}"))?)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global { module, name });
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        self.push(Value::Global { module, name })
                    }
                    (m, n) => bail!("STACK_GLOBAL of {} and {}", m.kind(), n.kind()),
                }
            }
            b'R' | 0x81 => {
                let args = match self.pop()? {
                    Value::Tuple(t) => t,
                    other => bail!("arguments are a {}, not a tuple", other.kind()),
                };
                let callable = self.pop()?;
                self.charge_all(&args)?;
                self.charge(&callable)?;
                let ordered_dict = matches!(&callable, Value::Global { module, name }
                    if module == "collections" && name == "OrderedDict");
                if ordered_dict && args.is_empty() {
                    self.push(Value::Dict(Vec::new()));
                } else {
                    let callable = Box::new(callable);
                    self.push(Value::Call { callable, args });
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.charge(&pid)?;
                self.push(Value::Persistent(Box::new(pid)));
            }
            b'P' => {
                let pid = self.line()?;
                self.push(Value::Persistent(Box::new(Value::Str(pid))));
            }
            b'b' => {
                let state = Box::new(self.pop()?);
                let object = Box::new(self.pop()?);
                self.charge(&state)?;
                self.charge(&object)?;
                self.push(Value::Build { object, state });
            }
            _ => bail!("unsupported or invalid opcode"),
        }
        Ok(None)
    }
}

/// The `pickletools` name of an opcode, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'Q' => "BINPERSID",
        b'P' => "PERSID",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        b'I' => "INT",
        b'L' => "LONG",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'G' => "BINFLOAT",
        b'F' => "FLOAT",
        b'U' => "SHORT_BINSTRING",
        b'T' => "BINSTRING",
        b'C' => "SHORT_BINBYTES",
        b'B' => "BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        b'}' => "EMPTY_DICT",
        b'l' => "LIST",
        b't' => "TUPLE",
        b'd' => "DICT",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'p' => "PUT",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'g' => "GET",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (tests/fuzz_parsers.rs, 3 s for one input): `DUP` + `APPEND` doubles a
    /// list, so 64 pairs would build 2^64 values. Refused, quickly.
    #[test]
    fn doubling_by_dup_and_append_is_refused() {
        let mut data = vec![0x80, 2, b']'];
        for _ in 0..64 {
            data.extend_from_slice(b"2a");
        }
        data.push(b'.');
        let t = std::time::Instant::now();
        let err = format!("{:#}", parse(&data).unwrap_err());
        assert!(err.contains("nests or copies more than"), "{err}");
        assert!(t.elapsed().as_secs_f64() < 5.0);
    }

    /// 200,000 nested lists would overflow the stack when the value is dropped (an abort, not an
    /// error); nesting stops at MAX_DEPTH.
    #[test]
    fn deep_nesting_is_refused() {
        let n = 200_000;
        let mut data = vec![0x80, 2];
        data.extend(std::iter::repeat_n(b']', n));
        data.extend(std::iter::repeat_n(b'a', n - 1));
        data.push(b'.');
        let err = format!("{:#}", parse(&data).unwrap_err());
        assert!(err.contains("nested more than 1000 deep"), "{err}");
        // Shallow nesting still parses.
        let ok = [&[0x80, 2][..], &[b']'; 50], &[b'a'; 49], b"."].concat();
        assert!(matches!(parse(&ok).unwrap(), Value::List(_)));
    }

    #[test]
    fn python2_style_tuple_of_lists() {
        // pickle.dumps((['ab', 'c'], [True, False]), 2) as Python 2 writes it.
        let data = b"\x80\x02]q\x00(U\x02abq\x01U\x01cq\x02e]q\x03(\x88\x89e\x86q\x04.";
        let v = parse(data).unwrap();
        let b = |s: &[u8]| Value::Bytes(Arc::from(s));
        assert_eq!(
            v,
            Value::Tuple(vec![
                Value::List(vec![b(b"ab"), b(b"c")]),
                Value::List(vec![Value::Bool(true), Value::Bool(false)]),
            ])
        );
    }

    #[test]
    fn memo_and_globals() {
        // [x, x] through the memo; a REDUCE of a GLOBAL.
        let data = b"\x80\x02]q\x00(K\x07q\x01h\x01ecbuiltins\nlen\n]\x85R\x86.";
        let v = parse(data).unwrap();
        let Value::Tuple(t) = v else { panic!() };
        assert_eq!(t[0], Value::List(vec![Value::Int(7), Value::Int(7)]));
        assert!(matches!(&t[1], Value::Call { args, .. } if args.len() == 1));
    }

    #[test]
    fn errors_name_the_offset() {
        let err = format!("{:#}", parse(b"\x80\x02]q\x00(U\x05ab").unwrap_err());
        assert!(
            err.contains("SHORT_BINSTRING") && err.contains("byte 6"),
            "{err}"
        );
        let err = format!("{:#}", parse(b"\x80\x02]").unwrap_err());
        assert!(err.contains("no STOP"), "{err}");
        let err = format!("{:#}", parse(b"\x80\x02\xff.").unwrap_err());
        assert!(err.contains("0xff") && err.contains("byte 2"), "{err}");
        let err = format!("{:#}", parse(b"\x80\x02a.").unwrap_err());
        assert!(err.contains("APPEND"), "{err}");
        // A huge length prefix fails before allocating.
        let err = format!("{:#}", parse(b"\x80\x02B\xff\xff\xff\x7f.").unwrap_err());
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn long1_is_signed() {
        assert_eq!(parse(b"\x8a\x02\xff\x7f.").unwrap(), Value::Int(0x7fff));
        assert_eq!(parse(b"\x8a\x01\xff.").unwrap(), Value::Int(-1));
        assert_eq!(parse(b"\x8a\x00.").unwrap(), Value::Int(0));
    }
}
