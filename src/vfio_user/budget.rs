//! The process-wide budget of guest-memory windows. Every window mapped
//! from a client's descriptor holds a file descriptor and a slot of the
//! SIGBUS guard (see `memory`), and both run out for the whole process,
//! not per connection: without a budget, four clients could take them all
//! and leave a fifth's window unguarded (a truncated memfd then kills the
//! process) or make the next accept fail for want of descriptors.
//!
//! The budget is the smaller of the guard's slots and the open-file limit
//! less a reserve kept for everything else (accepting clients, interrupt
//! eventfds, the management and metrics sockets, images). Every device
//! registered with it is guaranteed [`FLOOR`] windows whatever the others
//! hold; beyond that a device may take windows from the rest of the budget
//! up to its fair share of it. A device is refused when the floors of all
//! devices would no longer fit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

/// Windows every device is guaranteed (QEMU maps a handful for guest RAM,
/// a few more while the firmware shadows its ROMs).
pub const FLOOR: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "the process's budget of {capacity} guest-memory windows cannot guarantee \
         {FLOOR} to one more device ({devices} registered, {held} windows beyond their \
         floors held); remove a device or raise the open-file limit (ulimit -n)"
    )]
    NoRoomForDevice {
        capacity: usize,
        devices: usize,
        held: usize,
    },
    #[error(
        "this device holds {used} guest-memory windows, its share of the process's \
         budget of {capacity} ({devices} devices)"
    )]
    OverShare {
        used: usize,
        capacity: usize,
        devices: usize,
    },
    #[error("the process's budget of {capacity} guest-memory windows is taken")]
    Exhausted { capacity: usize },
}

struct State {
    capacity: usize,
    devices: usize,
    /// Windows held beyond their device's floor, all devices together.
    excess: usize,
}

impl State {
    /// What the floors leave to share.
    fn shared(&self) -> usize {
        self.capacity.saturating_sub(self.devices * FLOOR)
    }
}

/// A budget of windows shared by devices.
pub struct Budget {
    state: Mutex<State>,
}

/// Descriptors kept out of the budget for everything that is not a window.
fn fd_reserve(limit: usize) -> usize {
    (limit / 4).max(256)
}

/// The process's budget: guard slots, or the descriptors the open-file
/// limit leaves after the reserve, whichever is fewer.
fn capacity() -> usize {
    // SAFETY: rlimit is plain data; getrlimit fills it in.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to `r`.
    let fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    crate::memory::GUARD_SLOTS.min(fds.saturating_sub(fd_reserve(fds)))
}

impl Budget {
    /// The budget of this process.
    pub fn process() -> &'static Arc<Budget> {
        static B: OnceLock<Arc<Budget>> = OnceLock::new();
        B.get_or_init(|| Budget::with_capacity(capacity()))
    }

    pub fn with_capacity(capacity: usize) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(State {
                capacity,
                devices: 0,
                excess: 0,
            }),
        })
    }

    /// The whole budget, in windows.
    pub fn total(&self) -> usize {
        self.state.lock().capacity
    }

    /// Registers a device: refused when the devices' floors would no
    /// longer fit in the budget.
    pub fn register(self: &Arc<Self>) -> Result<Arc<Share>, BudgetError> {
        let mut s = self.state.lock();
        if (s.devices + 1) * FLOOR + s.excess > s.capacity {
            return Err(BudgetError::NoRoomForDevice {
                capacity: s.capacity,
                devices: s.devices,
                held: s.excess,
            });
        }
        s.devices += 1;
        Ok(Arc::new(Share {
            used: AtomicUsize::new(0),
            budget: self.clone(),
        }))
    }
}

/// One device's part of the budget; the device leaves it when this drops.
pub struct Share {
    used: AtomicUsize,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share({} windows)", self.used())
    }
}

impl Share {
    /// Registers a device with the process's budget.
    pub fn register() -> Result<Arc<Share>, BudgetError> {
        Budget::process().register()
    }

    /// Windows this device holds now (mapped, or unmapped but still used
    /// by a request in flight).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most windows this device may hold while the others are
    /// registered: its floor and its part of what the floors leave.
    pub fn limit(&self) -> usize {
        let s = self.budget.state.lock();
        FLOOR + s.shared() / s.devices.max(1)
    }

    /// One more window for this device, or why not.
    pub fn take(self: &Arc<Self>) -> Result<Token, BudgetError> {
        let mut s = self.budget.state.lock();
        let used = self.used.load(Ordering::Relaxed);
        if used >= FLOOR {
            let limit = FLOOR + s.shared() / s.devices.max(1);
            if used >= limit {
                return Err(BudgetError::OverShare {
                    used,
                    capacity: s.capacity,
                    devices: s.devices,
                });
            }
            if s.excess >= s.shared() {
                return Err(BudgetError::Exhausted {
                    capacity: s.capacity,
                });
            }
            s.excess += 1;
        }
        self.used.store(used + 1, Ordering::Relaxed);
        Ok(Token {
            share: self.clone(),
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        // Every token holds the share: none is left when it drops.
        self.budget.state.lock().devices -= 1;
    }
}

/// One window's place in the budget, given back when it drops.
#[derive(Debug)]
pub struct Token {
    share: Arc<Share>,
}

impl Drop for Token {
    fn drop(&mut self) {
        let mut s = self.share.budget.state.lock();
        let used = self.share.used.load(Ordering::Relaxed);
        if used > FLOOR {
            s.excess -= 1;
        }
        self.share.used.store(used - 1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four devices that take all they may leave the fifth its share; a
    /// device added while all are full is refused (its floor is not
    /// there), and gets it once windows come back.
    #[test]
    fn greedy_devices_leave_the_others_their_share() {
        let budget = Budget::with_capacity(15_000);
        let shares: Vec<_> = (0..5).map(|_| budget.register().unwrap()).collect();
        let mut held = Vec::new();
        for s in &shares[..4] {
            while let Ok(t) = s.take() {
                held.push(t);
            }
            assert_eq!(s.used(), s.limit());
        }
        let fifth: Vec<_> = (0..shares[4].limit())
            .map(|_| shares[4].take().expect("the fifth's share"))
            .collect();
        assert!(shares[4].take().is_err());
        assert!(matches!(
            budget.register(),
            Err(BudgetError::NoRoomForDevice { .. })
        ));
        drop(fifth);
        let late = budget.register().expect("room again");
        let floor: Vec<_> = (0..FLOOR).map(|_| late.take().unwrap()).collect();
        assert_eq!(floor.len(), FLOOR);
        drop(floor);
        drop(held);
        assert!(shares.iter().all(|s| s.used() == 0));
    }
}
