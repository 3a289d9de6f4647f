//! `cargo xtask imports`: finds import circles between the source files of each crate.
//!
//! A file `a.rs` that names `crate::b::...` (or `super::b`) depends on `b.rs`; files that depend on
//! each other, directly or around a longer loop, are one circle. The rule of the workspace
//! (docs/architecture.md) is that there are none: a newcomer can then read every crate from the
//! bottom up. References to the crate root (`lib.rs`, `main.rs`: only module declarations and
//! re-exports), comment lines (doc links) and code after a file's `#[cfg(test)]` line are left
//! out. The scan is textual (no
//! macro expansion), which is enough for how this workspace writes its paths.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The circles of every crate under `root` (`crates/*/src`, `xtask/src`, `benches`): each a
/// list of files (relative to `root`), sorted.
pub fn circles(root: &Path) -> Result<Vec<Vec<PathBuf>>> {
    let mut src_dirs = vec![root.join("xtask/src"), root.join("benches")];
    let crates = root.join("crates");
    for entry in fs::read_dir(&crates).with_context(|| format!("reading {}", crates.display()))? {
        let dir = entry?.path().join("src");
        if dir.is_dir() {
            src_dirs.push(dir);
        }
    }
    let mut all = Vec::new();
    for dir in src_dirs.iter().filter(|d| d.is_dir()) {
        for circle in crate_circles(dir)? {
            let mut files: Vec<PathBuf> = circle
                .iter()
                .map(|f| f.strip_prefix(root).unwrap_or(f).to_path_buf())
                .collect();
            files.sort();
            all.push(files);
        }
    }
    all.sort();
    Ok(all)
}

/// The circles among the files of one crate whose sources are under `src`.
fn crate_circles(src: &Path) -> Result<Vec<Vec<PathBuf>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_path(src, f), f.clone()))
        .collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
    let index: BTreeMap<&PathBuf, usize> = files.iter().enumerate().map(|(i, f)| (f, i)).collect();
    for (i, file) in files.iter().enumerate() {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let here = module_path(src, file);
        for path in referenced_paths(&code_only(non_test_part(&text)), &here) {
            // The longest prefix of the path that is a file of the crate.
            let target = (1..=path.len()).rev().find_map(|n| modules.get(&path[..n]));
            if let Some(t) = target {
                let j = index[t];
                if j != i && !edges[i].contains(&j) {
                    edges[i].push(j);
                }
            }
        }
    }
    Ok(strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| c.into_iter().map(|k| files[k].clone()).collect())
        .collect())
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The module path of `file` under `src`: `lib.rs`/`main.rs` -> `[]`, `a/mod.rs` and `a.rs` ->
/// `[a]`, `a/b.rs` -> `[a, b]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The text before the first `#[cfg(test)]` line.
fn non_test_part(text: &str) -> &str {
    match text.find("\n#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// `text` without its comment lines (doc links name modules but import nothing).
fn code_only(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths (absolute, from the crate root) that `text`, the source of module `here`,
/// names through `crate::` or `super::`, including each item of a `{...}` group.
fn referenced_paths(text: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent(here))] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            expand(rest, &base, &mut out);
        }
    }
    out
}

/// The parent module of `here` (a file's `super`).
fn parent(here: &[String]) -> Vec<String> {
    here[..here.len().saturating_sub(1)].to_vec()
}

/// Reads one path (or `{a::b, c}` group) at the start of `s`, appending each full path to `out`.
fn expand(s: &str, base: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = base.to_vec();
    let mut s = s;
    loop {
        let ident: String = s
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() {
            if let Some(group) = s.strip_prefix('{') {
                for item in split_group(group) {
                    expand(item.trim(), &path, out);
                }
            } else {
                out.push(path);
            }
            return;
        }
        path.push(ident.clone());
        s = &s[ident.len()..];
        match s.strip_prefix("::") {
            Some(r) => s = r,
            None => {
                out.push(path);
                return;
            }
        }
    }
}

/// The top-level comma-separated items of a `{...}` group whose opening brace is already consumed.
fn split_group(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&s[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// Tarjan's strongly connected components of the graph `edges` (node -> successors).
fn strongly_connected(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct Walk<'a> {
        edges: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(w: &mut Walk, v: usize) {
        w.index[v] = Some(w.next);
        w.low[v] = w.next;
        w.next += 1;
        w.stack.push(v);
        w.on_stack[v] = true;
        for &u in &w.edges[v] {
            match w.index[u] {
                None => {
                    visit(w, u);
                    w.low[v] = w.low[v].min(w.low[u]);
                }
                Some(iu) if w.on_stack[u] => w.low[v] = w.low[v].min(iu),
                Some(_) => {}
            }
        }
        if Some(w.low[v]) == w.index[v] {
            let mut component = Vec::new();
            while let Some(u) = w.stack.pop() {
                w.on_stack[u] = false;
                component.push(u);
                if u == v {
                    break;
                }
            }
            w.out.push(component);
        }
    }
    let n = edges.len();
    let mut w = Walk {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if w.index[v].is_none() {
            visit(&mut w, v);
        }
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn finds_a_circle_and_ignores_tests_and_the_root() {
        let root = std::env::temp_dir().join(format!("facerec-imports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let src = root.join("crates/demo/src");
        write(
            &src,
            "lib.rs",
            "pub mod a; pub mod b; pub mod c; pub mod d;\n",
        );
        write(
            &src,
            "a.rs",
            "//! See [`crate::d`].\nuse crate::b::Thing;\n",
        );
        write(&src, "b.rs", "use crate::{c::{Other}, Root};\n");
        write(&src, "c.rs", "pub fn f() { super::a::g() }\n");
        write(
            &src,
            "d.rs",
            "use crate::Root;\n// crate::a::g\n#[cfg(test)]\nmod tests { use crate::a::g; }\n",
        );
        let found = circles(&root).unwrap();
        let _ = fs::remove_dir_all(&root);
        let names = |v: &[&str]| -> Vec<PathBuf> {
            v.iter()
                .map(|f| PathBuf::from("crates/demo/src").join(f))
                .collect()
        };
        assert_eq!(found, vec![names(&["a.rs", "b.rs", "c.rs"])]);
    }

    #[test]
    fn the_workspace_has_no_import_circles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let found = circles(&root).unwrap();
        assert!(found.is_empty(), "import circles between files: {found:?}");
    }
}
