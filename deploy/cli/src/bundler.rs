//! Builds a bundle from an entry file: walks the static import graph,
//! strips TypeScript types with deno_ast and keeps source maps.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atoll_protocol::{Bundle, Module, ModuleKind};
use deno_ast::swc::ast::{ModuleDecl, ModuleItem};
use deno_ast::{
    EmitOptions, MediaType, ParseParams, ProgramRef, SourceMapOption, TranspileModuleOptions,
    TranspileOptions,
};
use url::Url;

/// A built bundle and the files it was built from.
pub struct Built {
    /// The bundle.
    pub bundle: Bundle,
    /// Every source file of the graph (to watch for changes).
    pub files: Vec<PathBuf>,
}

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Syntax error.
    #[error("{0}")]
    Parse(String),
    /// An import that cannot be bundled.
    #[error("{file}: cannot import {specifier:?}: {why}")]
    Import {
        /// The importing file.
        file: String,
        /// The import specifier.
        specifier: String,
        /// What is wrong with it.
        why: String,
    },
    /// The bundle is invalid.
    #[error(transparent)]
    Bundle(#[from] atoll_protocol::BundleError),
}

/// Builds the bundle rooted at `entry`. Module specifiers are
/// `file:///<path relative to root>`, so bundles never carry the
/// developer's absolute paths; imports must stay inside `root`.
pub fn build(entry: &Path, root: &Path) -> Result<Built, BuildError> {
    let root = canonical(root)?;
    let entry = canonical(entry)?;
    let entry_spec = specifier_for(&entry, &root).ok_or_else(|| BuildError::Import {
        file: entry.display().to_string(),
        specifier: entry.display().to_string(),
        why: format!("the entry is outside the project root {}", root.display()),
    })?;

    let mut modules = BTreeMap::new();
    let mut files = Vec::new();
    let mut queue = VecDeque::from([(entry.clone(), entry_spec.clone())]);
    while let Some((path, spec)) = queue.pop_front() {
        if modules.contains_key(spec.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| BuildError::Read {
            path: path.clone(),
            source,
        })?;
        files.push(path.clone());
        let media_type = MediaType::from_path(&path);
        let (module, imports) = match media_type {
            MediaType::Json => {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                    BuildError::Parse(format!("{}: invalid JSON: {e}", path.display()))
                })?;
                (
                    Module {
                        kind: ModuleKind::Json,
                        code: text,
                        source_map: None,
                    },
                    Vec::new(),
                )
            }
            MediaType::JavaScript
            | MediaType::Mjs
            | MediaType::TypeScript
            | MediaType::Mts
            | MediaType::Jsx
            | MediaType::Tsx => transpile(&spec, text, media_type)?,
            other => {
                return Err(BuildError::Parse(format!(
                    "{}: unsupported module type {other}",
                    path.display()
                )));
            }
        };
        modules.insert(spec.to_string(), module);
        for specifier in imports {
            let import_error = |why: String| BuildError::Import {
                file: path.display().to_string(),
                specifier: specifier.clone(),
                why,
            };
            let target = if let Some(abs) = specifier.strip_prefix('/') {
                root.join(abs)
            } else if specifier.starts_with("./") || specifier.starts_with("../") {
                path.parent().unwrap_or(&root).join(&specifier)
            } else {
                return Err(import_error(
                    "only relative imports of project files are supported".into(),
                ));
            };
            if !target.is_file() {
                return Err(import_error(format!("{} does not exist", target.display())));
            }
            let target = canonical(&target)?;
            let target_spec = specifier_for(&target, &root).ok_or_else(|| {
                import_error(format!("it is outside the project root {}", root.display()))
            })?;
            queue.push_back((target, target_spec));
        }
    }
    let bundle = Bundle::new(entry_spec.to_string(), modules)?;
    Ok(Built { bundle, files })
}

/// The root a bundle's specifiers are relative to: `preferred` if it holds
/// `entry`, else the entry's own directory.
pub fn project_root(entry: &Path, preferred: &Path) -> PathBuf {
    let entry = entry.canonicalize().unwrap_or_else(|_| entry.to_path_buf());
    match preferred.canonicalize() {
        Ok(p) if entry.starts_with(&p) => p,
        _ => entry
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| preferred.to_path_buf()),
    }
}

fn canonical(p: &Path) -> Result<PathBuf, BuildError> {
    p.canonicalize().map_err(|source| BuildError::Read {
        path: p.to_path_buf(),
        source,
    })
}

fn specifier_for(path: &Path, root: &Path) -> Option<Url> {
    let rel = path.strip_prefix(root).ok()?;
    let mut s = String::from("file:///");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    s.push_str(&parts.join("/"));
    Url::parse(&s).ok()
}

fn transpile(
    spec: &Url,
    text: String,
    media_type: MediaType,
) -> Result<(Module, Vec<String>), BuildError> {
    let parsed = deno_ast::parse_module(ParseParams {
        specifier: spec.clone(),
        text: Arc::from(text),
        media_type,
        capture_tokens: false,
        scope_analysis: false,
        maybe_syntax: None,
    })
    .map_err(|e| BuildError::Parse(e.to_string()))?;
    let imports = static_imports(parsed.program_ref());
    let emitted = parsed
        .transpile(
            &TranspileOptions::default(),
            &TranspileModuleOptions::default(),
            &EmitOptions {
                source_map: SourceMapOption::Separate,
                inline_sources: true,
                ..Default::default()
            },
        )
        .map_err(|e| BuildError::Parse(format!("{spec}: {e}")))?
        .into_source();
    Ok((
        Module {
            kind: ModuleKind::Js,
            code: emitted.text,
            source_map: emitted.source_map,
        },
        imports,
    ))
}

/// Specifiers of `import … from`, `export … from` (type-only ones excluded:
/// they vanish when types are stripped).
fn static_imports(program: ProgramRef<'_>) -> Vec<String> {
    let ProgramRef::Module(module) = program else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in &module.body {
        let ModuleItem::ModuleDecl(decl) = item else {
            continue;
        };
        let src = match decl {
            ModuleDecl::Import(i) if !i.type_only => Some(&i.src),
            ModuleDecl::ExportAll(e) if !e.type_only => Some(&e.src),
            ModuleDecl::ExportNamed(n) if !n.type_only => n.src.as_ref(),
            _ => None,
        };
        if let Some(src) = src {
            out.push(src.value.to_string_lossy().into_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_ts_graph_with_json_and_rejects_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(
            root.join("main.ts"),
            "import { n } from './lib.ts';\nimport data from './data.json' with { type: 'json' };\n\
             import type { T } from './types.ts';\n\
             const x: number = n + data.k;\nexport default { fetch() { return new Response(String(x)); } };\n",
        )
        .expect("write");
        std::fs::write(root.join("lib.ts"), "export const n: number = 1;\n").expect("write");
        std::fs::write(root.join("data.json"), "{\"k\": 2}").expect("write");
        let built = build(&root.join("main.ts"), root).expect("builds");
        let keys: Vec<_> = built.bundle.modules.keys().cloned().collect();
        assert_eq!(
            keys,
            vec!["file:///data.json", "file:///lib.ts", "file:///main.ts"]
        );
        let main = &built.bundle.modules["file:///main.ts"];
        assert!(!main.code.contains(": number"), "types stripped");
        assert!(main.source_map.is_some());

        std::fs::write(root.join("bad.ts"), "import x from 'npm:left-pad';\n").expect("write");
        let err = build(&root.join("bad.ts"), root)
            .err()
            .expect("bare import refused");
        assert!(err.to_string().contains("only relative imports"), "{err}");

        let inner = root.join("inner");
        std::fs::create_dir(&inner).expect("mkdir");
        std::fs::write(inner.join("esc.ts"), "import '../lib.ts';\n").expect("write");
        let err = build(&inner.join("esc.ts"), &inner)
            .err()
            .expect("escape refused");
        assert!(
            err.to_string().contains("outside the project root"),
            "{err}"
        );
    }
}
