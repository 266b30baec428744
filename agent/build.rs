//! Lays out ucd's code so that what it runs sits together.
//!
//! An idle agent runs a few MB of functions spread over all of its 17 MB of
//! code. The kernel maps a binary's code 64 KB around each page it first
//! runs, so nearly all of that code stayed resident. `ucd.order` lists the
//! functions that ran in an agent of a local cluster (starting, joining,
//! answering `uc`, idling; written by `scripts/ucd-order.sh`, most run
//! first), and the linker places them first.
//!
//! Only for the shipped build (the `dist` profile) on x86_64 Linux, where
//! rustc links with lld: the names carry hashes of that profile's build, and
//! `--symbol-ordering-file` is lld's. A name that no longer exists (after a
//! dependency or compiler update) is skipped without a warning; regenerate
//! the file then.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=ucd.order");
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
    // OUT_DIR is <target dir>/[<triple>/]<profile>/build/<pkg>-<hash>/out.
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if target != "x86_64-unknown-linux-gnu" || profile != "dist" {
        return;
    }
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("ucd.order");
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=ucd=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=ucd=-Wl,--no-warn-symbol-ordering");
    }
}
