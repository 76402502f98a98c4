//! The documentation stands alone and is right: every relative link and `docs/…` path it or the
//! code names exists (anchors included), nothing points at files outside the repository, the
//! README's commands are the ones CI runs, and the crypto test vectors in docs/wechat-api.md are
//! checked against wxpush's own code.

use std::path::{Path, PathBuf};

use crate::wx::{Cipher, crypto};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Text files under `dir`, recursively (build output and virtualenvs left out).
fn files(dir: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    walk(&path, out);
                }
            } else if std::fs::read_to_string(&path).is_ok() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    let path = root().join(dir);
    if path.is_file() {
        out.push(path)
    } else {
        walk(&path, &mut out)
    }
    out
}

fn markdown_files() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md"), root().join("README.zh-CN.md")];
    out.extend(["docs", "examples"].iter().flat_map(|d| files(d)).filter(|p| p.extension().is_some_and(|e| e == "md")));
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    markdown.lines().filter_map(|l| l.strip_prefix('#')).map(|h| slug(h.trim_start_matches('#'))).collect()
}

/// Targets of inline links `[text](target)`, outside code blocks.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        for (i, _) in line.match_indices("](") {
            let rest = &line[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
            }
        }
    }
    out
}

#[test]
fn relative_links_and_their_anchors_resolve() {
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            assert!(resolved.exists(), "{}: the link {target} leads nowhere", file.display());
            if !anchor.is_empty() {
                let headings = anchors(&read(&resolved));
                assert!(headings.iter().any(|h| h == anchor), "{}: no heading #{anchor} in {path}", file.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "the scan finds the links ({checked})");
}

/// The paths starting with `prefix` and ending with `suffix` that the files under `dirs` name,
/// with the file naming each.
fn named_paths(dirs: &[&str], prefix: &str, suffix: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for file in dirs.iter().flat_map(|d| files(d)) {
        let text = read(&file);
        for (i, _) in text.match_indices(prefix) {
            let rest = &text[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c))).unwrap_or(rest.len());
            let path = rest[..end].trim_end_matches('.');
            if path.ends_with(suffix) {
                out.push((file.clone(), path.to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_docs_and_code_name_only_files_the_repository_has() {
    // Every `docs/….md` and every test file (`tests/it/….rs`) named anywhere exists.
    let everywhere =
        ["README.md", "README.zh-CN.md", "docs", "examples", "src", "tests", "config", "deploy", "scripts", ".ci"];
    let docs = named_paths(&everywhere, "docs/", ".md");
    let tests = named_paths(&[&everywhere[..], &["benches"]].concat(), "tests/", ".rs");
    for (file, path) in docs.iter().chain(&tests) {
        assert!(root().join(path).exists(), "{} names {path}, which does not exist", file.display());
    }
    assert!(docs.len() >= 10 && tests.len() >= 10, "the scans find the references ({}, {})", docs.len(), tests.len());
    // The contract and the WeChat reference live in docs/, not outside the repository.
    for dir in ["README.md", "README.zh-CN.md", "docs", "examples", "config", "deploy", "scripts", ".ci", "src"] {
        for file in files(dir) {
            let text = read(&file);
            // Spelled in two parts so that this check does not itself name the old paths.
            for stale in [concat!("CONTRACT", ".md"), concat!("reference/", "wechat-api.md")] {
                assert!(!text.contains(stale), "{} points at {stale}: use docs/", file.display());
            }
        }
    }
}

#[test]
fn ci_runs_the_readme_test_command_and_the_python_examples() {
    let readme = read(&root().join("README.md"));
    let ci = read(&root().join(".ci/run"));
    for command in ["scripts/dev test", "scripts/services up"] {
        assert!(readme.contains(command), "the README shows {command}");
        assert!(ci.contains(command), ".ci/run runs {command}");
    }
    assert!(readme.contains("cargo test --lib"), "the README says how to test without services");
    assert!(ci.contains("examples/python/run_with_sandbox.py"), "CI runs the Python examples");
    let chinese = read(&root().join("README.zh-CN.md"));
    assert!(chinese.contains("scripts/dev demo") && chinese.contains("scripts/dev test"));
}

/// The ```json blocks of a markdown file that are test vectors.
fn vectors(markdown: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in markdown.lines() {
        match (&mut block, line.trim()) {
            (None, "```json") => block = Some(String::new()),
            (Some(text), "```") => {
                let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("a json block: {e}\n{text}"));
                if value.get("vector").is_some() {
                    out.push(value);
                }
                block = None;
            }
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn the_crypto_test_vectors_in_the_docs_hold() {
    let doc = read(&root().join("docs/wechat-api.md"));
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_owned();
    let mut counts = [0; 3];
    for v in vectors(&doc) {
        let (token, ts, nonce) = (s(&v, "token"), s(&v, "timestamp"), s(&v, "nonce"));
        match s(&v, "vector").as_str() {
            "signature" => {
                assert_eq!(crypto::signature(&token, &ts, &nonce), s(&v, "signature"), "{v}");
                counts[0] += 1;
            }
            "decrypt" => {
                let cipher = Cipher::new(&s(&v, "encoding_aes_key")).expect("the key");
                assert_eq!(crypto::msg_signature(&token, &ts, &nonce, &s(&v, "encrypt")), s(&v, "msg_signature"));
                let plain = cipher.decrypt(&s(&v, "encrypt")).expect("decrypts");
                assert_eq!(String::from_utf8(plain.msg).unwrap(), s(&v, "msg"), "{v}");
                assert_eq!(plain.appid, s(&v, "appid"));
                counts[1] += 1;
            }
            "encrypt" => {
                let cipher = Cipher::new(&s(&v, "encoding_aes_key")).expect("the key");
                let random: [u8; 16] = s(&v, "random").as_bytes().try_into().expect("16 bytes of random");
                let encrypted = cipher.encrypt(&random, s(&v, "msg").as_bytes(), &s(&v, "appid"));
                assert_eq!(encrypted, s(&v, "encrypt"), "{v}");
                assert_eq!(crypto::msg_signature(&token, &ts, &nonce, &encrypted), s(&v, "msg_signature"));
                counts[2] += 1;
            }
            other => panic!("unknown vector kind {other}"),
        }
    }
    assert_eq!(counts, [4, 3, 2], "signature, decrypt and encrypt vectors");
}
