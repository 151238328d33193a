use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vfio_user_blk::cli::{Command, Options};
use vfio_user_blk::target::{metrics, remove_own_socket, rpc};

fn main() -> ExitCode {
    // Before any descriptor is opened: those from 3 on may be sockets the
    // service manager passed.
    vfio_user_blk::activation::adopt();
    let opts = Options::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&opts.log_level))
        .init();
    vfio_user_blk::activation::say_adopted();
    let r = match &opts.command {
        Some(Command::Rpc {
            rpc_socket,
            method,
            params,
        }) => rpc::client(rpc_socket, method, params).map(|v| {
            // (events_subscribe printed its events as they came.)
            if method != "events_subscribe" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
                );
            }
        }),
        Some(c @ (Command::Completions { .. } | Command::Man)) => {
            use std::io::Write;
            vfio_user_blk::cli::generated(c)
                .ok_or_else(|| anyhow::anyhow!("cannot render the manual page"))
                .and_then(|b| Ok(std::io::stdout().write_all(&b)?))
        }
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

/// Removes the management socket, unless the service manager passed it
/// (its socket unit keeps it).
fn remove_rpc_socket(p: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let passed = std::fs::symlink_metadata(p)
        .is_ok_and(|m| vfio_user_blk::activation::was_passed((m.dev(), m.ino())));
    if !passed {
        let _ = std::fs::remove_file(p);
    }
}

/// Every guest-memory window and every client holds descriptors: take the
/// whole allowance the system gives (the soft limit is often 1024).
fn raise_fd_limit() {
    // SAFETY: rlimit is plain data; getrlimit fills it in.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 && r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: a valid pointer to `r`.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    raise_fd_limit();
    // Signals are taken before anything is created, so that none is lost.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let target = opts.start_target()?;
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
                remove_rpc_socket(p);
            }
            return Err(e);
        }
    }
    // Every socket listens: a service manager may start the guests.
    let disks = target.sockets().len();
    vfio_user_blk::util::sd_notify(&format!(
        "READY=1\nSTATUS=serving {disks} disk(s)\nMAINPID={}",
        std::process::id()
    ));
    let Some(sig) = signals.forever().next() else {
        error!("signal handling ended");
        return Ok(());
    };
    vfio_user_blk::util::sd_notify(&format!(
        "STOPPING=1\nSTATUS=signal {sig}: draining and flushing the disks"
    ));
    info!(
        "signal {sig}: draining, flushing and removing the sockets (a second signal stops at once)"
    );
    let sockets = target.sockets();
    let t = target.clone();
    let done = std::thread::spawn(move || t.shutdown());
    while !done.is_finished() {
        if let Some(sig) = signals.pending().next() {
            error!("signal {sig} again: stopping now, without draining");
            for (p, id) in &sockets {
                remove_own_socket(p, *id);
            }
            if let Some(p) = &opts.rpc_socket {
                remove_rpc_socket(p);
            }
            std::process::exit(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(p) = &opts.rpc_socket {
        remove_rpc_socket(p);
    }
    // RBD images close on threads of their own: their locks are let go of
    // before we leave, unless the cluster does not answer.
    vfio_user_blk::backend::rbd::wait_closed(std::time::Duration::from_secs(5));
    info!("stopped");
    Ok(())
}
