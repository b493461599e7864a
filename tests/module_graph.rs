//! The crate's top-level modules form no circle: a module that uses another (a `crate::NAME`
//! path outside comments and unit tests) is never used by it, directly or through others. So a
//! lower module (`codec`, `media`, `metrics`, …) can be read, changed and tested without the
//! ones built on it. This reads the sources as text: no build needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            if matches!(&*first, "lib.rs" | "main.rs" | "bin") || first.ends_with("_tests.rs") {
                continue;
            }
            let module = first.trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere: they are cut off, as are comments.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            for line in code.lines() {
                let line = line.split("//").next().unwrap();
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        edges.entry(module.clone()).or_default().insert(name);
                    }
                }
            }
        }
    }
    edges
}

/// A path from `from` back to `to` through `edges`, if there is one.
fn path(
    edges: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_owned()]);
    }
    if !seen.insert(from.to_owned()) {
        return None;
    }
    for next in edges.get(from).into_iter().flatten() {
        if let Some(mut p) = path(edges, next, to, seen) {
            p.insert(0, from.to_owned());
            return Some(p);
        }
    }
    None
}

#[test]
fn the_top_level_modules_form_no_circle() {
    let edges = graph();
    assert!(
        edges.contains_key("node") && edges.contains_key("webrtc"),
        "{edges:?}"
    );
    for (module, uses) in &edges {
        for used in uses {
            if let Some(back) = path(&edges, used, module, &mut BTreeSet::new()) {
                panic!("{module} uses {used}, and {} leads back", back.join(" -> "));
            }
        }
    }
}
