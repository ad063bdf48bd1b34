//! Builds the V8 startup snapshot: Deno's web extensions and Atoll's
//! handler API evaluated once, so every isolate boots with them in place.

use std::fmt::Write as _;
use std::path::PathBuf;

#[path = "src/extensions.rs"]
mod extensions;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    // Lazy-loaded sources not consumed while snapshotting still have to be
    // reachable at run time; collect them before the extensions are moved.
    let mut lazy_js = Vec::new();
    let mut lazy_esm = Vec::new();
    for ext in extensions::extensions(None) {
        for f in ext.lazy_loaded_js_files.iter() {
            lazy_js.push(f.clone());
        }
        for f in ext.get_lazy_loaded_esm_sources() {
            lazy_esm.push(f.clone());
        }
    }

    let output = deno_core::snapshot::create_snapshot(
        deno_core::snapshot::CreateSnapshotOptions {
            cargo_manifest_dir: env!("CARGO_MANIFEST_DIR"),
            startup_snapshot: None,
            skip_op_registration: false,
            extensions: extensions::extensions(None),
            extension_transpiler: None,
            with_runtime_cb: None,
        },
        None,
    )
    .expect("creating the startup snapshot");

    std::fs::write(out_dir.join("ATOLL_SNAPSHOT.bin"), &output.output)
        .expect("writing the snapshot");

    let consumed: std::collections::HashSet<_> =
        output.consumed_lazy_specifiers.iter().cloned().collect();
    // deno_core binary-searches these tables.
    lazy_js.sort_by_key(|f| f.specifier);
    lazy_esm.sort_by_key(|f| f.specifier);
    let mut table = String::new();
    for (name, files) in [
        ("RESIDUAL_LAZY_JS", &lazy_js),
        ("RESIDUAL_LAZY_ESM", &lazy_esm),
    ] {
        writeln!(table, "pub static {name}: &[(&str, &str)] = &[").unwrap();
        for f in files.iter() {
            if consumed.contains(f.specifier) {
                continue;
            }
            let code = f.load().expect("reading a lazy-loaded extension source");
            writeln!(table, "    ({:?}, {:?}),", f.specifier, code.as_str()).unwrap();
        }
        writeln!(table, "];").unwrap();
    }
    std::fs::write(out_dir.join("residual_sources.rs"), table).expect("writing residual sources");

    for path in output.files_loaded_during_snapshot {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=src/extensions.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
