//! `ucd`, the uc agent: parses its configuration and runs until told to stop.

use clap::Parser;
use uc_agent::config::Subcommand;

fn main() {
    let args = uc_agent::config::Args::parse();
    if let Some(Subcommand::Shim {
        dir,
        id,
        memory,
        cpu,
        argv,
    }) = &args.command
    {
        let code = uc_workload::shim::run(&uc_workload::shim::ShimArgs {
            dir: dir.clone(),
            id: id.clone(),
            memory: *memory,
            cpu: *cpu,
            argv: argv.clone(),
            isolate: true,
        });
        std::process::exit(code);
    }
    if let Some(Subcommand::Enter {
        target,
        cgroup_procs,
        tty,
        argv,
    }) = &args.command
    {
        match uc_workload::exec::enter(*target, cgroup_procs, *tty, argv) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("uc exec: {e}");
                std::process::exit(126);
            }
        }
    }
    if let Some(Subcommand::DialStdio { socket }) = &args.command {
        // No tracing here: stdout carries the API's bytes.
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(uc_agent::dial_stdio(socket)));
        if let Err(e) = result {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    uc_agent::init_tracing();
    // ring is the one crypto provider (TLS of the ingress, and of the ACME client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = args.into_config().and_then(|config| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(uc_agent::run(config))
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
