//! Checks that the code keeps the shape `lib.rs` draws, by reading the
//! sources (a test only):
//!
//! - no import cycle between the top-level modules of `src/` (`chain`,
//!   `store`, `poller`, `write`, `config`, `app`, …): an edge is any
//!   `crate::X` path, or a `super::` path that climbs to the crate root,
//!   outside comments;
//! - the same between the files of one module (`chain::client` and
//!   `chain::range`, `poller::parts` and `poller::tick`), its `mod.rs` aside
//!   (a parent and its children naturally name each other);
//! - every import between top-level modules points down the rows drawn in
//!   `lib.rs` (so the leaves import no module, and `chain` and `store` not
//!   each other);
//! - no Rust file of the crate (`src/`, `tests/`, `examples/`) is over
//!   [`MAX_LINES`] lines unless one of its first lines says "Why this file
//!   is long".

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files longer than this state why at their top.
const MAX_LINES: usize = 500;

/// Every `.rs` file under `dir`, with its module path (`["chain", "client"]`;
/// `mod.rs` is its directory's module; `lib.rs` and `main.rs` are the root).
fn sources(dir: &Path) -> Vec<(Vec<String>, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                let mut module: Vec<String> = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module.last().is_some_and(|l| l == "mod" || l == "lib" || l == "main") {
                    module.pop();
                }
                out.push((module, path));
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (line comments and doc comments;
/// string contents stay, which can only add edges, never hide one).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("//") {
                ""
            } else {
                l.split(" // ").next().unwrap_or(l)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths (from the crate root) that `text`, in module `at`, names.
fn references(at: &[String], text: &str) -> Vec<Vec<String>> {
    let code = code(text);
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|seg| !seg.is_empty())
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        // `$crate::` (in macros) is the crate too; `other_crate::` is not.
        let before = if i == 0 { b' ' } else { bytes[i - 1] };
        if before.is_ascii_alphanumeric() || before == b'_' {
            continue;
        }
        out.push(ident(&code[i + "crate::".len()..]));
    }
    for (i, _) in code.match_indices("super::") {
        let before = if i == 0 { b' ' } else { bytes[i - 1] };
        if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
            continue;
        }
        let mut rest = &code[i..];
        let mut base = at.to_vec();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        base.extend(ident(rest));
        out.push(base);
    }
    out
}

/// A cycle in `edges`, if any (depth-first search).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == m).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Edges between the modules at `depth` under `parent` (depth 1: the
/// top-level modules), with one file that makes each.
fn edges(files: &[(Vec<String>, String)], parent: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
    let depth = parent.len();
    let modules: BTreeSet<String> = files
        .iter()
        .filter(|(m, _)| m.len() > depth && m.starts_with(parent))
        .map(|(m, _)| m[depth].clone())
        .collect();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (module, text) in files {
        if module.len() <= depth || !module.starts_with(parent) {
            continue; // the parent itself (`mod.rs`, `lib.rs`) or elsewhere
        }
        let from = &module[depth];
        for r in references(module, text) {
            if r.len() > depth && r.starts_with(parent) && modules.contains(&r[depth]) && r[depth] != *from {
                out.entry(from.clone())
                    .or_default()
                    .entry(r[depth].clone())
                    .or_insert_with(|| module.join("::"));
            }
        }
    }
    out
}

fn read_src() -> Vec<(Vec<String>, String, PathBuf)> {
    // LOGCURSOR_LAYERS_SRC: check another tree (an older revision, to measure).
    let src = std::env::var_os("LOGCURSOR_LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    read_tree(&src)
}

/// Every `.rs` file under `dir` with its module path and text.
fn read_tree(dir: &Path) -> Vec<(Vec<String>, String, PathBuf)> {
    sources(dir)
        .into_iter()
        .map(|(m, p)| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (m, text, p)
        })
        .collect()
}

fn describe(edges: &BTreeMap<String, BTreeMap<String, String>>, cycle: &[String]) -> String {
    cycle
        .windows(2)
        .map(|w| format!("{} -> {} (in {})", w[0], w[1], edges[&w[0]][&w[1]]))
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn no_import_cycle_between_the_modules_of_src() {
    let files: Vec<(Vec<String>, String)> = read_src().into_iter().map(|(m, t, _)| (m, t)).collect();
    let mut parents: BTreeSet<Vec<String>> = BTreeSet::from([Vec::new()]);
    for (m, _) in &files {
        for n in 1..m.len() {
            parents.insert(m[..n].to_vec());
        }
    }
    let mut cycles = Vec::new();
    for parent in &parents {
        let e = edges(&files, parent);
        let plain: BTreeMap<String, BTreeSet<String>> = e
            .iter()
            .map(|(k, v)| (k.clone(), v.keys().cloned().collect()))
            .collect();
        if let Some(cycle) = find_cycle(&plain) {
            let under = if parent.is_empty() {
                "crate".to_string()
            } else {
                parent.join("::")
            };
            cycles.push(format!("under {under}: {}", describe(&e, &cycle)));
        }
    }
    if std::env::var_os("LOGCURSOR_LAYERS_PRINT").is_some() {
        eprintln!("{:#?}", edges(&files, &[]));
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// The rows of the drawing in `lib.rs`, top first: the modules of each.
fn drawn_layers(lib_rs: &str) -> Vec<Vec<String>> {
    let Some(start) = lib_rs.find("//! ```text") else {
        return Vec::new();
    };
    lib_rs[start..]
        .lines()
        .skip(1)
        .map(|l| l.trim_start_matches("//!").trim())
        .take_while(|l| !l.starts_with("```"))
        .map(|l| {
            let names = l.split("  ").next().unwrap_or("");
            names.split(',').map(|n| n.trim().to_string()).collect()
        })
        .collect()
}

#[test]
fn every_import_points_down_the_layers_drawn_in_lib_rs() {
    let all = read_src();
    let lib = all
        .iter()
        .find(|(m, _, p)| m.is_empty() && p.ends_with("lib.rs"))
        .map(|(_, t, _)| t.clone())
        .unwrap_or_default();
    let rows = drawn_layers(&lib);
    assert!(rows.len() > 3, "no layer drawing found in lib.rs: {rows:?}");
    let row_of = |m: &str| rows.iter().position(|r| r.iter().any(|n| n == m));
    let files: Vec<(Vec<String>, String)> = all.into_iter().map(|(m, t, _)| (m, t)).collect();
    let mut wrong = Vec::new();
    for (from, to) in edges(&files, &[]) {
        for (target, file) in to {
            match (row_of(&from), row_of(&target)) {
                (Some(a), Some(b)) if a < b => {}
                (Some(_), Some(_)) => wrong.push(format!("{from} -> {target} (in {file}) does not point down")),
                _ => wrong.push(format!("{from} -> {target} (in {file}): a module not drawn in lib.rs")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_file_is_over_500_lines_without_saying_why_at_its_top() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let long: Vec<String> = read_src()
        .into_iter()
        .chain(["tests", "examples"].into_iter().flat_map(|d| read_tree(&root.join(d))))
        .filter(|(_, text, _)| {
            text.lines().count() > MAX_LINES && !text.lines().take(30).any(|l| l.contains("Why this file is long"))
        })
        .map(|(_, text, path)| format!("{} ({} lines)", path.display(), text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines without a reason at the top:\n{}",
        long.join("\n")
    );
}

/// The checks catch what they are for.
#[test]
fn a_cycle_is_found_and_a_super_path_climbs_to_the_root() {
    let files = vec![
        (vec!["a".to_string()], "use crate::b::X;".to_string()),
        (
            vec!["b".to_string(), "inner".to_string()],
            "fn f() { super::super::a::g() }".to_string(),
        ),
        (
            vec!["c".to_string()],
            "// use crate::a;\nuse other_crate::a;".to_string(),
        ),
    ];
    let e = edges(&files, &[]);
    let plain: BTreeMap<String, BTreeSet<String>> = e
        .iter()
        .map(|(k, v)| (k.clone(), v.keys().cloned().collect()))
        .collect();
    assert_eq!(find_cycle(&plain), Some(vec!["a".into(), "b".into(), "a".into()]));
    assert!(!e.contains_key("c"), "comments and other crates are not edges: {e:?}");
    let rows = drawn_layers("//! ```text\n//! app, cli      top\n//! store    leaf\n//! ```\n");
    assert_eq!(
        rows,
        vec![vec!["app".to_string(), "cli".to_string()], vec!["store".to_string()]]
    );
}
