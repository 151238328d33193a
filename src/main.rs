use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vfio_user_blk::cli::{Command, Options};
use vfio_user_blk::target::{metrics, rpc, Target};

fn main() -> ExitCode {
    let opts = Options::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&opts.log_level))
        .init();
    let r = match &opts.command {
        Some(Command::Rpc {
            rpc_socket,
            method,
            params,
        }) => rpc::client(rpc_socket, method, params).map(|v| {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
            );
        }),
        None => run(&opts),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the causes, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vfio-user-blk: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    // Signals are taken before anything is created, so that none is lost.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let target = Target::start(opts)?;
    if let Some(path) = &opts.rpc_socket {
        if let Err(e) = rpc::serve(target.clone(), path, opts.force) {
            target.shutdown();
            return Err(e);
        }
    }
    if let Some(addr) = opts.metrics {
        if let Err(e) = metrics::serve(target.clone(), addr) {
            target.shutdown();
            if let Some(p) = &opts.rpc_socket {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    }
    if let Some(sig) = signals.forever().next() {
        info!("signal {sig}: draining, flushing and removing the sockets");
        target.shutdown();
        if let Some(p) = &opts.rpc_socket {
            let _ = std::fs::remove_file(p);
        }
        info!("stopped");
    } else {
        error!("signal handling ended");
    }
    Ok(())
}
