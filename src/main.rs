use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vfio_user_blk::cli::{bind_socket, build_target, Options};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let opts = Options::parse();
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain of causes, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            error!("{}", chain.join(": "));
            eprintln!("vfio-user-blk: {}", chain.join("\n  caused by: "));
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    let target = build_target(opts, false)?;
    // Bind every socket before serving any: a taken path fails the start
    // and removes the sockets already bound.
    let mut bound: Vec<PathBuf> = Vec::new();
    let mut listeners = Vec::new();
    for (spec, _) in &target.devices {
        match bind_socket(&spec.socket, opts.force) {
            Ok(l) => {
                bound.push(spec.socket.clone());
                listeners.push(l);
            }
            Err(e) => {
                for p in &bound {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
    }
    // Remove the sockets on SIGINT/SIGTERM so that the next run starts clean.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let paths = bound.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: removing the sockets and exiting");
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0);
        }
    });
    let mut threads = Vec::new();
    for ((spec, mut server), listener) in target.devices.into_iter().zip(listeners) {
        info!("listening on {}", spec.socket.display());
        threads.push(
            std::thread::Builder::new()
                .name("vfio-user".into())
                .spawn(move || server.run(listener))?,
        );
    }
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("a device's server stopped: {e}"),
            Err(_) => error!("a device's server thread panicked"),
        }
    }
    Ok(())
}
