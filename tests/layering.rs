//! The layering check: every `crate::` path in `src/` may point only down the layer table below,
//! and the modules of one layer may not import each other in a circle.
//!
//! The table is the one place the order is written down (ARCHITECTURE.md explains it). A file
//! belongs to the first layer whose prefix matches its path under `src/`. A `use` of a module in a
//! higher layer fails with the file and line; so does any import circle, with the files on it.
//! Paths must be spelled `crate::…` (one module path per `use`, no `crate::{a, b}` groups, no
//! `super::` outside test modules) so that this check sees every edge. A folder's `mod.rs` may
//! re-export its children's items (`pub use crate::config::env::Env;`): that line is the folder's
//! facade, not a dependency, and makes no edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up: (name, path prefixes under `src/`). A layer may use the layers
/// before it in this list, never those after it.
const LAYERS: &[(&str, &[&str])] = &[
    ("leaves", &["clock.rs", "sync.rs", "wire/"]),
    ("config", &["config/"]),
    ("transport", &["transport/"]),
    ("cluster", &["cluster/"]),
    ("health", &["health/"]),
    ("select", &["select/"]),
    ("proxy", &["proxy/"]),
    ("store", &["store/"]),
    ("control", &["control/"]),
    ("server", &["server.rs", "server/"]),
    ("cli", &["cli/"]),
    ("root", &["lib.rs", "main.rs"]),
];

/// One problem found, printed as `src/<file>:<line>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    file: String,
    line: usize,
    message: String,
}

fn layer_of(file: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, prefixes)| prefixes.iter().any(|p| file.starts_with(p)))
}

/// The file that defines the module a `crate::` path names: the longest prefix of its segments
/// that is a module file of the tree.
fn resolve(segments: &[&str], files: &BTreeMap<String, String>) -> Option<String> {
    (1..=segments.len()).rev().find_map(|n| {
        let base = segments[..n].join("/");
        [format!("{base}.rs"), format!("{base}/mod.rs")]
            .into_iter()
            .find(|f| files.contains_key(f))
    })
}

/// The module paths (`crate::a::b`, lower-case segments only) used on one line of code.
fn crate_paths(code: &str) -> Vec<Result<Vec<&str>, &'static str>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if after.starts_with('{') {
            out.push(Err(
                "grouped `crate::{…}` import: write one module path per `use`",
            ));
            continue;
        }
        let mut segments = Vec::new();
        let mut s = after;
        loop {
            let len = s
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(s.len());
            if len == 0 {
                break;
            }
            segments.push(&s[..len]);
            match s[len..].strip_prefix("::") {
                Some(next) => s = next,
                None => break,
            }
        }
        if !segments.is_empty() {
            out.push(Ok(segments));
        }
    }
    out
}

/// The code of a line: `None` for comment lines (doc links may point anywhere); the part before
/// a trailing `//` comment otherwise.
fn code_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with("//") {
        return None;
    }
    Some(match t.find(" //") {
        Some(i) => &t[..i],
        None => t,
    })
}

/// Whether this line is a folder's `mod.rs` re-exporting an item of its own child module: the
/// facade of the folder, not a dependency of its code (the children may then use the facade).
fn reexports_child(file: &str, code: &str, target: &str) -> bool {
    let Some(folder) = file.strip_suffix("mod.rs") else {
        return false;
    };
    code.starts_with("pub use ") && target.starts_with(folder) && target != file
}

/// Checks a source tree given as (path under `src/`, contents).
fn check(files: &BTreeMap<String, String>) -> Vec<Violation> {
    let mut problems = Vec::new();
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in files {
        let Some(from) = layer_of(file) else {
            problems.push(Violation {
                file: file.clone(),
                line: 0,
                message: "this file is in no layer: add its folder to LAYERS in tests/layering.rs"
                    .into(),
            });
            continue;
        };
        let mut in_tests = false;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            if line.trim_start().starts_with("#[cfg(test)]") {
                in_tests = true;
            }
            let Some(code) = code_of(line) else { continue };
            if !in_tests && (code.contains("super::") || code.starts_with("use super")) {
                problems.push(Violation {
                    file: file.clone(),
                    line: line_no,
                    message: "`super::` outside a test module: spell the path `crate::…`".into(),
                });
            }
            for path in crate_paths(code) {
                let segments = match path {
                    Ok(s) => s,
                    Err(message) => {
                        problems.push(Violation {
                            file: file.clone(),
                            line: line_no,
                            message: message.into(),
                        });
                        continue;
                    }
                };
                let Some(target) = resolve(&segments, files) else {
                    continue;
                };
                if &target == file {
                    continue;
                }
                let Some(to) = layer_of(&target) else {
                    continue;
                };
                if to > from {
                    problems.push(Violation {
                        file: file.clone(),
                        line: line_no,
                        message: format!(
                            "upward import: `crate::{}` is in layer `{}`, above `{}`",
                            segments.join("::"),
                            LAYERS[to].0,
                            LAYERS[from].0
                        ),
                    });
                } else if to == from && !reexports_child(file, code, &target) {
                    edges.entry(file.as_str()).or_default().insert(target);
                }
            }
        }
    }
    for cycle in cycles(&edges) {
        problems.push(Violation {
            file: cycle[0].clone(),
            line: 0,
            message: format!("import circle: {}", cycle.join(" -> ")),
        });
    }
    problems.sort();
    problems.dedup();
    problems
}

/// The import circles among the files of one layer (each reported once, from its smallest file).
fn cycles(edges: &BTreeMap<&str, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn walk(
        node: &str,
        edges: &BTreeMap<&str, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle: Vec<String> = stack[at..].to_vec();
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| n.as_str())
                .map_or(0, |(i, _)| i);
            cycle.rotate_left(min);
            cycle.push(cycle[0].clone());
            found.insert(cycle);
            return;
        }
        if done.contains(node) {
            return;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            walk(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(node.to_string());
    }
    let mut found = BTreeSet::new();
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        walk(node, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found.into_iter().collect()
}

fn read_tree(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name")
            .to_string();
        if path.is_dir() {
            read_tree(&path, &format!("{prefix}{name}/"), out);
        } else if name.ends_with(".rs") {
            let text = std::fs::read_to_string(&path).expect("readable source file");
            out.insert(format!("{prefix}{name}"), text);
        }
    }
}

#[test]
fn src_imports_point_down_the_layers_and_form_no_circle() {
    let mut files = BTreeMap::new();
    read_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut files,
    );
    assert!(files.len() > 20, "read only {} files", files.len());
    let problems = check(&files);
    let report: Vec<String> = problems
        .iter()
        .map(|p| format!("src/{}:{}: {}", p.file, p.line, p.message))
        .collect();
    assert!(
        report.is_empty(),
        "layering problems:\n{}",
        report.join("\n")
    );
}

fn tree(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

#[test]
fn an_upward_import_is_reported_with_file_and_line() {
    let files = tree(&[
        ("health/mod.rs", "pub mod queue;\n"),
        (
            "health/queue.rs",
            "use crate::clock::Clock;\n\nuse crate::proxy::handler::Gateway;\n",
        ),
        (
            "proxy/handler.rs",
            "use crate::health::queue::FailureQueue;\n",
        ),
        ("clock.rs", ""),
    ]);
    assert_eq!(
        check(&files),
        vec![Violation {
            file: "health/queue.rs".into(),
            line: 3,
            message: "upward import: `crate::proxy::handler` is in layer `proxy`, above `health`"
                .into(),
        }]
    );
}

#[test]
fn a_circle_inside_a_layer_is_reported() {
    let files = tree(&[
        ("proxy/a.rs", "use crate::proxy::b::B;\n"),
        ("proxy/b.rs", "fn f() { crate::proxy::c::g() }\n"),
        (
            "proxy/c.rs",
            "use crate::proxy::a::A; // back to the start\n",
        ),
        ("proxy/d.rs", "use crate::proxy::a::A;\n"),
    ]);
    let problems = check(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        problems[0].message,
        "import circle: proxy/a.rs -> proxy/b.rs -> proxy/c.rs -> proxy/a.rs"
    );
}

#[test]
fn a_facade_reexport_is_not_an_edge_but_a_real_use_is() {
    let facade = tree(&[
        (
            "config/mod.rs",
            "mod env;\npub use crate::config::env::Env;\npub struct Config;\n",
        ),
        (
            "config/env.rs",
            "use crate::config::Config;\npub trait Env {}\n",
        ),
    ]);
    assert_eq!(check(&facade), vec![]);
    let used = tree(&[
        (
            "config/mod.rs",
            "mod env;\nfn f() { crate::config::env::g() }\npub struct Config;\n",
        ),
        (
            "config/env.rs",
            "use crate::config::Config;\npub fn g() {}\n",
        ),
    ]);
    assert_eq!(check(&used).len(), 1, "{:?}", check(&used));
}

#[test]
fn comments_groups_super_and_unknown_files_are_handled() {
    let files = tree(&[
        // A doc link may point anywhere; code may not hide its edges.
        (
            "health/endpoint.rs",
            "//! See [`crate::proxy::handler`].\nuse crate::{clock, config};\nuse super::x;\n\
             #[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        ("stray/thing.rs", ""),
        ("clock.rs", ""),
        ("config/mod.rs", ""),
    ]);
    let messages: Vec<String> = check(&files)
        .into_iter()
        .map(|p| format!("{}:{}: {}", p.file, p.line, p.message))
        .collect();
    assert_eq!(
        messages,
        vec![
            "health/endpoint.rs:2: grouped `crate::{…}` import: write one module path per `use`",
            "health/endpoint.rs:3: `super::` outside a test module: spell the path `crate::…`",
            "stray/thing.rs:0: this file is in no layer: add its folder to LAYERS in tests/layering.rs",
        ]
    );
}
