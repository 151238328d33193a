use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook::iterator::Signals;

use vfio_user_blk::cli::{Command, Options};
use vfio_user_blk::target::{metrics, remove_own_socket, rpc};

fn main() -> ExitCode {
    // What a live upgrade handed over (this binary replaced the one that
    // served, in the same process).
    let incoming = match vfio_user_blk::relaunch::at_start() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vfio-user-blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before any descriptor is opened: those from 3 on may be sockets the
    // service manager passed.
    vfio_user_blk::activation::adopt();
    let opts = Options::parse();
    if vfio_user_blk::relaunch::checking() {
        // An upgrade asks whether this binary can take over.
        println!("{}", vfio_user_blk::relaunch::check_answer());
        return ExitCode::SUCCESS;
    }
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
        None => run(&opts, incoming),
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

/// Takes over from the binary this one replaced (a live upgrade).
fn take_over(
    opts: &Options,
    incoming: vfio_user_blk::relaunch::Incoming,
) -> anyhow::Result<std::sync::Arc<vfio_user_blk::target::Target>> {
    let t = vfio_user_blk::target::upgrade::take_over(
        opts.engine_config(false),
        opts.settings(),
        opts.config_file(),
        incoming,
    )?;
    match t.rpc {
        Some((l, p)) => rpc::serve_listener(t.target.clone(), l, &p, t.reply, t.management)?,
        None => {
            if let Some((s, a, ..)) = &t.reply {
                vfio_user_blk::target::upgrade::answer(s, a);
            }
        }
    }
    if let Some(l) = t.metrics {
        metrics::serve_listener(t.target.clone(), l)?;
    }
    Ok(t.target)
}

fn run(opts: &Options, incoming: Option<vfio_user_blk::relaunch::Incoming>) -> anyhow::Result<()> {
    raise_fd_limit();
    // Signals are taken before anything is created, so that none is lost.
    // (The relay to the next binary first: the handlers of a signal run
    // in the order they were registered, and an exec under way ends the
    // thread that runs them at any point.)
    vfio_user_blk::relaunch::register_stop_relay()?;
    let signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR2])?;
    if let Some(i) = incoming {
        // (The signals stay held, as the binary before held them across
        // the exec, until this one has taken over: a rollback executes
        // the old binary again with them still pending.)
        let stop = i.stop;
        let target = take_over(opts, i)?;
        vfio_user_blk::relaunch::release_signals();
        vfio_user_blk::relaunch::replay_stop(stop);
        return serve_until_signal(opts, target, signals);
    }
    // Every thread the target starts holds the stop signals blocked (as
    // after an upgrade): only this one takes them. A thread that took one
    // while an upgrade executes the next binary would lose it with this
    // image.
    vfio_user_blk::relaunch::hold_signals();
    let started = start_serving(opts);
    vfio_user_blk::relaunch::release_signals();
    serve_until_signal(opts, started?, signals)
}

fn start_serving(opts: &Options) -> anyhow::Result<std::sync::Arc<vfio_user_blk::target::Target>> {
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
    Ok(target)
}

/// Serves until SIGINT, SIGTERM or SIGHUP (SIGUSR2 upgrades the binary in
/// place), then stops gracefully.
fn serve_until_signal(
    opts: &Options,
    target: std::sync::Arc<vfio_user_blk::target::Target>,
    mut signals: Signals,
) -> anyhow::Result<()> {
    // Every socket listens: a service manager may start the guests.
    let disks = target.sockets().len();
    vfio_user_blk::util::sd_notify(&format!(
        "READY=1\nSTATUS=serving {disks} disk(s)\nMAINPID={}",
        std::process::id()
    ));
    let sig = loop {
        let Some(sig) = signals.forever().next() else {
            error!("signal handling ended");
            return Ok(());
        };
        if sig != SIGUSR2 {
            break sig;
        }
        let t = target.clone();
        // (Started with the stop signals blocked, as every other thread.)
        let mask = vfio_user_blk::relaunch::hold_signals();
        let upgrading = std::thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || {
                info!("SIGUSR2: upgrading in place");
                if let Err(e) = t.upgrade(None, None) {
                    error!("upgrade: {e:#}");
                }
            });
        vfio_user_blk::relaunch::restore_signals(&mask);
        if let Err(e) = upgrading {
            error!("upgrade: cannot start its thread: {e}");
        }
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
