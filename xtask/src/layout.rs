//! The crates' module graph, for the layout rule "one direction of flow": a module (file) of `proxy/` or `bench/`
//! never reaches, through `crate::` and `super::` paths, a module that reaches it back. Test modules and comments
//! are left out (a test may use anything; a doc link is not a dependency).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`dataplane::ebpf::dump`; `` for the crate root) -> its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, src, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap_or(&p).with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                    parts.pop();
                }
                out.insert(parts.join("::"), p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The source without its `#[cfg(test)] mod tests` and without comment lines.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths after `prefix` (`crate::` or `super::`) in `code`: `a::b::c` for `crate::a::b::c::{..}`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .filter(|(i, _)| {
            // Not the tail of a longer identifier (`mycrate::`).
            code[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        })
        .map(|(i, _)| {
            let rest = &code[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            rest[..end].trim_end_matches(':')
        })
        .collect()
}

/// The longest module that `path` names (`dataplane::ebpf::dump::cluster_frontends` -> `dataplane::ebpf::dump`).
fn resolve<'m>(mods: &'m BTreeMap<String, PathBuf>, path: &str) -> Option<&'m str> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| mods.get_key_value(&parts[..n].join("::")).map(|(k, _)| k.as_str()))
}

/// Module -> the modules it uses (neither its ancestors nor its descendants).
pub fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut out = BTreeMap::new();
    for (m, file) in &mods {
        let code = code_of(&std::fs::read_to_string(file).unwrap_or_default());
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        let mut uses = BTreeSet::new();
        let targets = paths_after(&code, "crate::").into_iter().map(str::to_string).chain(
            paths_after(&code, "super::").into_iter().map(|p| {
                if parent.is_empty() {
                    p.to_string()
                } else {
                    format!("{parent}::{p}")
                }
            }),
        );
        for t in targets {
            if let Some(t) = resolve(&mods, &t) {
                let related = t == m || m.starts_with(&format!("{t}::")) || t.starts_with(&format!("{m}::"));
                if !related && !t.is_empty() {
                    uses.insert(t.to_string());
                }
            }
        }
        out.insert(m.clone(), uses);
    }
    out
}

/// The groups of modules that reach each other (strongly connected components of more than one module).
pub fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reaches = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = vec![from];
        while let Some(m) = todo.pop() {
            for n in g.get(m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n);
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&str, BTreeSet<String>> = g.keys().map(|m| (m.as_str(), reaches(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in g.keys() {
        if out.iter().any(|c| c.contains(m)) {
            continue;
        }
        let mut group: Vec<String> = g
            .keys()
            .filter(|n| *n == m || (reach[m.as_str()].contains(*n) && reach[n.as_str()].contains(m)))
            .cloned()
            .collect();
        if group.len() > 1 {
            group.sort();
            out.push(group);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    #[test]
    fn the_agent_and_the_bench_have_no_import_cycle() {
        for krate in ["proxy", "bench"] {
            let g = graph(&repo().join(krate).join("src"));
            assert!(g.len() > 5, "{krate}: found only {} modules", g.len());
            assert_eq!(
                cycles(&g),
                Vec::<Vec<String>>::new(),
                "{krate}: modules that use each other"
            );
        }
    }

    #[test]
    fn a_cycle_is_found() {
        let dir = std::env::temp_dir().join(format!("orca-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("lib.rs"), "pub mod a; pub mod b;").unwrap();
        std::fs::write(dir.join("a.rs"), "use crate::b::c::X;\n// crate::d is a comment\n").unwrap();
        std::fs::write(dir.join("b/mod.rs"), "pub mod c;").unwrap();
        std::fs::write(dir.join("b/c.rs"), "fn f() { crate::a::g() }").unwrap();
        std::fs::write(dir.join("d.rs"), "use super::a;").unwrap();
        let g = graph(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b::c".to_string()]]);
        assert_eq!(g["d"], BTreeSet::from(["a".to_string()]));
    }
}
