//! Lays out ucd's code so that what it runs sits together.
//!
//! An agent that starts and idles runs about 5 MB of functions, which the
//! linker had spread over nearly all of ucd's code. The kernel maps a
//! binary's code 64 KB around each page it first runs, so nearly all of
//! that code stayed resident. `ucd.order` lists the
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
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
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
    if target != "x86_64-unknown-linux-gnu" || profile != "dist" || !links_with_lld() {
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

/// rustc links x86_64 Linux programs with its own lld from 1.90 on, unless
/// the build names another linker.
fn links_with_lld() -> bool {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker")
        || std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
