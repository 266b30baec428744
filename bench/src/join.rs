//! Benchmark of `uc machine add`: the time from the command to the new machine reachable over
//! the mesh from every machine, step by step, on hosts reached over real SSH (the e2e SSH lab:
//! each host a network namespace with its own sshd and install directories). Each round adds a
//! fresh host ("cold": the binary is copied), removes it (its agent resets itself), and adds it
//! again ("prepared": the binary is there). Beside it, in the same run, the bare tools' floor: one
//! `ssh HOST true`, and copying the same `ucd` with `ssh HOST 'cat > FILE'`. Prints a Markdown
//! section and, with `--out`, writes it into docs/benchmarks.md between the `join` markers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use uc_bench::percentile;
use uc_e2e::{Bins, SshLab, eventually};

#[derive(Parser)]
struct Args {
    /// Hosts added (each once cold, once prepared).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Markdown file to update (between `<!-- join:begin -->` and `<!-- join:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Runs `uc -o json ARGS` on the laptop; returns the wall time and the JSON it printed.
fn timed_uc(lab: &SshLab, args: &[&str]) -> anyhow::Result<(f64, Value)> {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let t0 = Instant::now();
    let out = lab.uc(&full)?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "uc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((secs, serde_json::from_slice(&out.stdout)?))
}

/// Step name (the host's address taken out) -> seconds.
fn steps(v: &Value, host: &str) -> BTreeMap<String, f64> {
    v["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let name = s["step"].as_str()?.replace(host, "HOST");
                    Some((name, s["seconds"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lab = SshLab::start(args.rounds + 1)?;
    let bins = Bins::find(None)?;
    let ucd_mb = std::fs::metadata(&bins.ucd)?.len() as f64 / 1e6;
    timed_uc(
        &lab,
        &["machine", "init", &lab.host_target(0), "-y", "--name", "b0"],
    )?;

    // The floor: what ssh alone takes for a round trip and for the copy.
    let mut rtt = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let out = lab.ssh(1, "true")?;
        rtt.push(t0.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!("ssh true: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let config = lab.ssh_config().display().to_string();
    for _ in 0..3 {
        let t0 = Instant::now();
        let status = lab
            .laptop_command("ssh")?
            .args(["-F", &config, &lab.host_target(1), "cat > /tmp/ucd-copy"])
            .stdin(Stdio::from(std::fs::File::open(&bins.ucd)?))
            .stdout(Stdio::null())
            .status()?;
        copy.push(t0.elapsed().as_secs_f64());
        if !status.success() {
            bail!("copying ucd with ssh failed");
        }
    }
    lab.host_sh(1, "rm -f /tmp/ucd-copy")?;

    let mut cold_total = Vec::new();
    let mut warm_total = Vec::new();
    let mut cold_steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut warm_steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in 1..=args.rounds {
        let host = lab.host_target(r);
        let name = format!("b{r}");
        let (secs, v) = timed_uc(&lab, &["machine", "add", &host, "-y", "--name", &name])?;
        cold_total.push(secs);
        for (k, s) in steps(&v, &host) {
            cold_steps.entry(k).or_default().push(s);
        }
        timed_uc(&lab, &["machine", "rm", &name])?;
        eventually(Duration::from_secs(60), "the removed agent resets", || {
            let out = lab.host_sh(
                r,
                "test -e /var/lib/uc/state.redb || test -e /run/uc/ucd-supervise.pid",
            )?;
            if out.status.success() {
                bail!("still there");
            }
            Ok(())
        })?;
        let (secs, v) = timed_uc(
            &lab,
            &["machine", "add", &host, "-y", "--name", &format!("{name}x")],
        )?;
        warm_total.push(secs);
        for (k, s) in steps(&v, &host) {
            warm_steps.entry(k).or_default().push(s);
        }
        eprintln!(
            "round {r}: cold {:.2} s, prepared {:.2} s",
            cold_total[r - 1],
            warm_total[r - 1]
        );
    }

    let mut md = String::from(
        "<!-- join:begin -->\n## Joining over SSH: `uc machine add` to reachable over the mesh (issue 4)\n\n",
    );
    md.push_str(&format!(
        "_{} · `bench/join.sh --rounds {}` · release build, ucd {ucd_mb:.0} MB · hosts are network namespaces with their own sshd on one machine (the e2e SSH lab), no systemd there (the agent runs under uc's restart loop) · medians of {} adds each_\n\n",
        uc_bench::date_utc(),
        args.rounds,
        args.rounds
    ));
    md.push_str(
        "| step | cold host (binary copied) | prepared host (binary there) |\n|---|---|---|\n",
    );
    let keys: Vec<&String> = cold_steps
        .keys()
        .chain(warm_steps.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // In the order the command runs them.
    let order = |k: &str| {
        [
            "reaching the cluster",
            "connecting",
            "checking",
            "copying",
            "installing",
            "waiting until it has caught up",
            "waiting until every machine",
        ]
        .iter()
        .position(|p| k.starts_with(p))
        .unwrap_or(99)
    };
    let mut keys = keys;
    keys.sort_by_key(|k| order(k));
    for k in keys {
        let c = cold_steps
            .get(k)
            .map(|v| format!("{:.2} s", median(v)))
            .unwrap_or("-".into());
        let w = warm_steps
            .get(k)
            .map(|v| format!("{:.2} s", median(v)))
            .unwrap_or("-".into());
        md.push_str(&format!("| {k} | {c} | {w} |\n"));
    }
    md.push_str(&format!(
        "| **total, `uc machine add` to reachable from every machine (wall)** | **{:.2} s** | **{:.2} s** |\n\n",
        median(&cold_total),
        median(&warm_total)
    ));
    md.push_str(&format!(
        "The bare tools, same hosts, same run: one `ssh HOST true` {:.2} s (median of 5); copying the same ucd with `ssh HOST 'cat > FILE'` {:.2} s (median of 3). On a prepared host the connect step includes hashing the installed ucd to compare it with the local one. Target: under 5 s from `uc machine add` to reachable, binary copy included (the cold column): {}.\n",
        median(&rtt),
        median(&copy),
        if median(&cold_total) < 5.0 { "met" } else { "NOT met" }
    ));
    md.push_str("<!-- join:end -->");
    print!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "join", &md)
            .with_context(|| format!("updating {}", out.display()))?;
    }
    Ok(())
}
