use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vfio_user_blk::cli::{bind_socket, build, Options};

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
    let mut server = build(opts)?;
    let listener = bind_socket(&opts.socket, opts.force)?;
    // Remove the socket on SIGINT/SIGTERM so that the next run starts clean.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let path = opts.socket.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: removing {} and exiting", path.display());
            let _ = std::fs::remove_file(&path);
            std::process::exit(0);
        }
    });
    info!("listening on {}", opts.socket.display());
    server.run(listener)?;
    Ok(())
}
