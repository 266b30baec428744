//! `ucd`, the uc agent: parses its configuration and runs until told to stop.

use clap::Parser;

fn main() {
    let args = uc_agent::config::Args::parse();
    uc_agent::init_tracing();
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
