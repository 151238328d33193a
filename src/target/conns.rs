//! The places of a listening socket's connections (the management socket,
//! the metrics endpoint), shared so that slow clients cannot take them
//! all: when every place is taken, the connection that has waited longest
//! for its request (not one being answered) is closed to make room. A
//! client that sends its request at once, as every real one does, is
//! answered however many others hold a connection open without one.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

struct Entry {
    id: u64,
    /// Since when it has waited for a request (its last answer, or its
    /// opening).
    since: Instant,
    /// A request of it is being answered: never closed for another.
    busy: bool,
    /// The connection's socket, to shut down when it must make room.
    socket: OwnedFd,
}

pub struct Places {
    max: usize,
    inner: Mutex<(u64, Vec<Entry>)>,
}

/// What happened to a new connection.
pub enum Admitted {
    /// It has a place (and an older, idle connection may have been closed
    /// to make it).
    Yes { place: Place, evicted: bool },
    /// Every place is busy answering a request.
    Full,
}

/// A connection's place; given back when dropped.
pub struct Place {
    id: u64,
    places: Arc<Places>,
}

impl Places {
    pub fn new(max: usize) -> Arc<Places> {
        Arc::new(Places {
            max: max.max(1),
            inner: Mutex::new((0, Vec::new())),
        })
    }

    /// A place for the connection whose socket `socket` is (a duplicate of
    /// it, kept to shut the connection down if it must make room).
    pub fn admit(self: &Arc<Self>, socket: &impl AsRawFd) -> Admitted {
        // SAFETY: dup of a descriptor the caller holds open for the call;
        // the result is a new descriptor we own.
        let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Admitted::Full;
        }
        // SAFETY: fcntl just returned this descriptor and nothing else
        // owns it.
        let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut g = self.inner.lock();
        let mut evicted = false;
        if g.1.len() >= self.max {
            let oldest =
                g.1.iter()
                    .enumerate()
                    .filter(|(_, p)| !p.busy)
                    .min_by_key(|(_, p)| p.since)
                    .map(|(i, _)| i);
            let Some(i) = oldest else {
                return Admitted::Full;
            };
            let p = g.1.swap_remove(i);
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(p.socket.as_raw_fd(), libc::SHUT_RDWR) };
            evicted = true;
        }
        g.0 += 1;
        let id = g.0;
        g.1.push(Entry {
            id,
            since: Instant::now(),
            busy: false,
            socket,
        });
        Admitted::Yes {
            place: Place {
                id,
                places: self.clone(),
            },
            evicted,
        }
    }

    /// Connections holding a place now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().1.len()
    }
}

impl Place {
    /// A request is being answered (true), or the connection waits for
    /// the next one (false).
    pub fn busy(&self, busy: bool) {
        let mut g = self.places.inner.lock();
        if let Some(p) = g.1.iter_mut().find(|p| p.id == self.id) {
            p.busy = busy;
            if !busy {
                p.since = Instant::now();
            }
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.inner.lock().1.retain(|p| p.id != self.id);
    }
}

/// Serves the connections `incoming` gives, each on a thread of its own
/// (named `name-conn`) and with a place among `places`, for as long as the
/// listener lives. `full` gets a connection refused because every place is
/// busy answering. A log line says when `evicted` (the connection waiting
/// longest) was closed for a new one; this listener's warnings have a rate
/// limit of their own (a flood on another listener does not mute them).
pub fn accept_each<S, I>(
    name: &'static str,
    incoming: I,
    places: &Arc<Places>,
    evicted: &str,
    full: impl Fn(S),
    serve: impl Fn(S, Place) + Clone + Send + 'static,
) where
    S: AsRawFd + Send + 'static,
    I: Iterator<Item = std::io::Result<S>>,
{
    let limit = crate::util::RateLimit::new();
    let warn = |what: std::fmt::Arguments| match limit.allow() {
        Some(0) => log::warn!("{name}: {what}"),
        Some(n) => log::warn!("{name}: {what} ({n} similar lines suppressed)"),
        None => {}
    };
    for s in incoming {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to come
                // back rather than spin.
                warn(format_args!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let place = match places.admit(&s) {
            Admitted::Yes { place, evicted: e } => {
                if e {
                    warn(format_args!(
                        "{} connections open: {evicted} was closed for a new one",
                        places.max
                    ));
                }
                place
            }
            Admitted::Full => {
                full(s);
                continue;
            }
        };
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || serve(s, place));
        if let Err(e) = spawned {
            warn(format_args!("cannot start a thread: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_longest_idle_connection_makes_room_and_a_busy_one_never_does() {
        let places = Places::new(2);
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let (c, _c_peer) = UnixStream::pair().unwrap();
        let (d, _d_peer) = UnixStream::pair().unwrap();
        let Admitted::Yes { place: pa, .. } = places.admit(&a) else {
            panic!()
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        let Admitted::Yes { place: pb, .. } = places.admit(&b) else {
            panic!()
        };
        pb.busy(true);
        // c takes a's place: a was idle longest; b is busy.
        let Admitted::Yes { place: pc, evicted } = places.admit(&c) else {
            panic!()
        };
        assert!(evicted);
        let mut buf = [0u8; 1];
        assert_eq!(a_peer.read(&mut buf).unwrap(), 0, "a was shut down");
        drop(pa);
        assert_eq!(places.len(), 2);
        pc.busy(true);
        assert!(matches!(places.admit(&d), Admitted::Full));
    }
}
