//! Interrupt delivery: the eventfds that DEVICE_SET_IRQS hands over, looked
//! up at the moment an interrupt is raised (the client swaps them at will),
//! with pending state for vectors that are masked or have no descriptor yet.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};

use crate::util::DeviceLog;
use crate::vfio_user::{Errno, IrqAction, IrqData, IrqSet};

/// One MSI-X vector. Each has its own lock, held only to decide: the
/// eventfd is written after the lock is released, so interrupts of
/// different queues never wait for each other or for a write.
#[derive(Default)]
struct Vector {
    fd: Option<Arc<File>>,
    masked: bool,
    pending: bool,
}

#[derive(Default)]
struct State {
    intx_fd: Option<File>,
    /// INTx is level-triggered and masks itself when it fires.
    intx_masked: bool,
    intx_level: bool,
    err_fd: Option<File>,
}

/// The interrupt state of one PCI function. Shared between the protocol
/// thread (which installs descriptors) and the reactors that raise
/// interrupts.
pub struct Interrupts {
    /// INTx and the error eventfd (not on the completion path with MSI-X).
    state: Mutex<State>,
    msix: Vec<Mutex<Vector>>,
    msix_enabled: AtomicBool,
    msix_function_masked: AtomicBool,
    /// Size of the MSI-X table; fixed for the life of the function.
    vectors: u16,
    /// The function's log (its name, its limit on guest-caused lines).
    log: Arc<DeviceLog>,
}

/// Takes an interrupt descriptor from the client: it must be an eventfd,
/// and it is made non-blocking, so that raising an interrupt can never block
/// the thread that raises it (a counter at its maximum, a full pipe).
fn check_interrupt_fd(fd: &OwnedFd, log: &DeviceLog) -> Result<(), Errno> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match link {
        Ok(l) if l.as_os_str() == "anon_inode:[eventfd]" => {}
        Ok(l) => {
            crate::dev_log!(
                log,
                Warn,
                "SET_IRQS: interrupt descriptor is {}, not an eventfd; refused",
                l.display()
            );
            return Err(libc::EINVAL);
        }
        // Without /proc we cannot tell; non-blocking below still keeps us
        // from blocking on it.
        Err(e) => crate::dev_debug!(log, "cannot inspect an interrupt descriptor: {e}"),
    }
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let set = flags >= 0 && {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0 }
    };
    if !set {
        crate::dev_log!(
            log,
            Warn,
            "SET_IRQS: cannot make an interrupt descriptor non-blocking: {}",
            std::io::Error::last_os_error()
        );
        return Err(libc::EINVAL);
    }
    Ok(())
}

fn kick(fd: &File) {
    // An eventfd adds the 8-byte value to its counter. A full counter
    // (EAGAIN) still means the interrupt is pending on the other side.
    if let Err(e) = (&*fd).write(&1u64.to_ne_bytes()) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            crate::warn_limited!("writing an interrupt eventfd failed: {e}");
        }
    }
}

/// One MSI-X vector as a live upgrade carries it (fd: -1 for none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVector {
    pub fd: i64,
    pub masked: bool,
    pub pending: bool,
}

/// The interrupt state of a function as a live upgrade carries it: the
/// descriptors by number (see [`crate::handover`]), -1 for none.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedIrqs {
    pub msix: Vec<SavedVector>,
    pub intx_fd: i64,
    pub intx_masked: bool,
    pub intx_level: bool,
    pub err_fd: i64,
}

impl Interrupts {
    /// The state and the descriptors, listed in `out`.
    pub fn save(&self, out: &mut crate::handover::Outgoing) -> SavedIrqs {
        let mut fd_of = |f: Option<&File>| f.map_or(-1, |f| out.add(f.as_fd()));
        let st = self.state.lock();
        let msix = self
            .msix
            .iter()
            .map(|v| {
                let v = v.lock();
                SavedVector {
                    fd: fd_of(v.fd.as_deref()),
                    masked: v.masked,
                    pending: v.pending,
                }
            })
            .collect();
        SavedIrqs {
            msix,
            intx_fd: fd_of(st.intx_fd.as_ref()),
            intx_masked: st.intx_masked,
            intx_level: st.intx_level,
            err_fd: fd_of(st.err_fd.as_ref()),
        }
    }

    /// Takes a saved state: every descriptor must be an eventfd, as at
    /// SET_IRQS. MSI-X enable and mask come from config space afterwards
    /// (`set_msix_control`).
    pub fn restore(&self, s: &SavedIrqs, fds: &mut crate::handover::FdBag) -> Result<(), String> {
        if s.msix.len() != self.msix.len() {
            return Err(format!(
                "{} MSI-X vectors saved for a function of {}",
                s.msix.len(),
                self.msix.len()
            ));
        }
        let mut take = |n: i64| -> Result<Option<File>, String> {
            let Some(fd) = fds.take_opt(n)? else {
                return Ok(None);
            };
            check_interrupt_fd(&fd, &self.log)
                .map_err(|_| format!("interrupt descriptor {n} is not an eventfd"))?;
            Ok(Some(File::from(fd)))
        };
        let mut vectors = Vec::with_capacity(s.msix.len());
        for v in &s.msix {
            vectors.push((take(v.fd)?.map(Arc::new), v.masked, v.pending));
        }
        let (intx, err) = (take(s.intx_fd)?, take(s.err_fd)?);
        for (slot, (fd, masked, pending)) in self.msix.iter().zip(vectors) {
            *slot.lock() = Vector {
                fd,
                masked,
                pending,
            };
        }
        let mut st = self.state.lock();
        st.intx_fd = intx;
        st.err_fd = err;
        st.intx_masked = s.intx_masked;
        st.intx_level = s.intx_level;
        Ok(())
    }

    pub fn new(msix_vectors: u16, log: Arc<DeviceLog>) -> Interrupts {
        Interrupts {
            log,
            state: Mutex::new(State::default()),
            msix: (0..msix_vectors).map(|_| Mutex::default()).collect(),
            msix_enabled: AtomicBool::new(false),
            msix_function_masked: AtomicBool::new(false),
            vectors: msix_vectors,
        }
    }

    /// The log of the function these interrupts belong to.
    pub fn log(&self) -> &DeviceLog {
        &self.log
    }

    pub fn msix_vectors(&self) -> u16 {
        self.vectors
    }

    pub fn msix_enabled(&self) -> bool {
        self.msix_enabled.load(Ordering::SeqCst)
    }

    /// Raises MSI-X vector `v` if MSI-X is enabled, and says whether it
    /// was (otherwise the caller falls back to INTx). A vector that cannot
    /// be delivered now (function or vector masked, no descriptor yet) stays
    /// pending and is delivered as soon as it can be. This is on the
    /// completion path: one short per-vector lock, and the write after it.
    pub fn signal_msix(&self, v: u16) -> bool {
        if !self.msix_enabled.load(Ordering::SeqCst) {
            return false;
        }
        let Some(vec) = self.msix.get(usize::from(v)) else {
            crate::dev_debug!(
                self.log,
                "interrupt on vector {v}, which does not exist; dropped"
            );
            return true;
        };
        let fd = {
            let mut vec = vec.lock();
            // Read under the vector's lock: set_msix_control stores the
            // bit first and then looks at every vector under its lock, so
            // a pending bit set here is never missed.
            let blocked = self.msix_function_masked.load(Ordering::SeqCst);
            match &vec.fd {
                Some(fd) if !blocked && !vec.masked => Some(fd.clone()),
                _ => {
                    vec.pending = true;
                    None
                }
            }
        };
        if let Some(fd) = fd {
            kick(&fd);
        }
        true
    }

    /// Sets the INTx line level. A rising edge fires the trigger unless the
    /// line is masked; an unmask with the level still high fires it again.
    pub fn set_intx_level(&self, level: bool) {
        let mut st = self.state.lock();
        let rising = level && !st.intx_level;
        st.intx_level = level;
        if rising {
            Self::fire_intx(&mut st);
        }
    }

    fn fire_intx(st: &mut State) {
        if st.intx_masked || !st.intx_level {
            return;
        }
        if let Some(fd) = &st.intx_fd {
            kick(fd);
            st.intx_masked = true;
        }
    }

    /// The MSI-X enable and function-mask bits, as the guest last wrote them.
    pub fn set_msix_control(&self, enabled: bool, function_masked: bool) {
        self.msix_enabled.store(enabled, Ordering::SeqCst);
        self.msix_function_masked
            .store(function_masked, Ordering::SeqCst);
        self.flush_pending();
    }

    /// Pending bits for the PBA, one per vector, packed little-endian into
    /// u64 words.
    pub fn pending_word(&self, word: usize) -> u64 {
        let mut bits = 0u64;
        for (i, v) in self.msix.iter().enumerate().skip(word * 64).take(64) {
            if v.lock().pending {
                bits |= 1 << (i % 64);
            }
        }
        bits
    }

    /// Delivers what is pending and deliverable now.
    fn flush_pending(&self) {
        if !self.msix_enabled.load(Ordering::SeqCst)
            || self.msix_function_masked.load(Ordering::SeqCst)
        {
            return;
        }
        for vec in &self.msix {
            let fd = {
                let mut vec = vec.lock();
                if vec.pending && !vec.masked && vec.fd.is_some() {
                    vec.pending = false;
                    vec.fd.clone()
                } else {
                    None
                }
            };
            if let Some(fd) = fd {
                kick(&fd);
            }
        }
    }

    /// Back to power-on: no MSI-X, nothing pending, INTx unmasked and low.
    /// Descriptors stay (DEVICE_RESET keeps IRQ registrations).
    pub fn reset(&self) {
        self.msix_enabled.store(false, Ordering::SeqCst);
        self.msix_function_masked.store(false, Ordering::SeqCst);
        {
            let mut st = self.state.lock();
            st.intx_masked = false;
            st.intx_level = false;
        }
        for v in &self.msix {
            let mut v = v.lock();
            v.pending = false;
            v.masked = false;
        }
    }

    /// Forget every descriptor (the client went away).
    pub fn drop_descriptors(&self) {
        {
            let mut st = self.state.lock();
            st.intx_fd = None;
            st.err_fd = None;
        }
        for v in &self.msix {
            v.lock().fd = None;
        }
    }

    /// Applies a validated SET_IRQS request.
    pub fn set_irqs(&self, set: IrqSet) -> Result<(), Errno> {
        // Every descriptor is checked before any state changes.
        if let IrqData::Eventfds(fds) = &set.data {
            fds.iter()
                .try_for_each(|fd| check_interrupt_fd(fd, &self.log))?;
        }
        let mut st = self.state.lock();
        let (start, count) = (set.start as usize, set.count as usize);
        match (set.index, set.action) {
            (VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger) => {
                Self::intx_trigger(&mut st, set.data, count)
            }
            (VFIO_PCI_INTX_IRQ_INDEX, action) => Self::intx_mask(&mut st, action, &set.data),
            (VFIO_PCI_MSIX_IRQ_INDEX, IrqAction::Trigger) => {
                self.msix_trigger(set.data, start, count)
            }
            (VFIO_PCI_MSIX_IRQ_INDEX, action) => {
                return self.msix_mask(action, set.data, start, count)
            }
            (VFIO_PCI_ERR_IRQ_INDEX, IrqAction::Trigger) => match set.data {
                // We never report errors through it; holding it keeps QEMU's
                // error recovery set up.
                IrqData::Eventfds(mut fds) => st.err_fd = fds.pop().map(File::from),
                IrqData::None if count == 0 => st.err_fd = None,
                _ => return Err(libc::EINVAL),
            },
            (VFIO_PCI_MSI_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX, IrqAction::Trigger) if count == 0 => {
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    /// INTx's eventfd set or torn down, or INTx fired by the client.
    fn intx_trigger(st: &mut State, data: IrqData, count: usize) {
        match data {
            IrqData::Eventfds(mut fds) => st.intx_fd = fds.pop().map(File::from),
            IrqData::None if count == 0 => {
                st.intx_fd = None;
                st.intx_masked = false;
            }
            IrqData::None => Self::software_intx(st),
            IrqData::Bool(b) => {
                if b.first() == Some(&true) {
                    Self::software_intx(st);
                }
            }
        }
    }

    fn intx_mask(st: &mut State, action: IrqAction, data: &IrqData) {
        let on = match data {
            IrqData::Bool(b) => b.first() == Some(&true),
            // An eventfd for mask/unmask (the KVM resample fd) is accepted
            // and closed: we unmask on NONE|UNMASK messages.
            IrqData::Eventfds(_) => false,
            IrqData::None => true,
        };
        if !on {
            return;
        }
        if action == IrqAction::Mask {
            st.intx_masked = true;
        } else {
            st.intx_masked = false;
            Self::fire_intx(st);
        }
    }

    /// MSI-X vectors' eventfds set or torn down, or vectors fired by the
    /// client.
    fn msix_trigger(&self, data: IrqData, start: usize, count: usize) {
        match data {
            IrqData::None if count == 0 => {
                for v in &self.msix {
                    v.lock().fd = None;
                }
            }
            IrqData::Eventfds(fds) if fds.is_empty() => {
                for v in &self.msix[start..start + count] {
                    v.lock().fd = None;
                }
            }
            IrqData::Eventfds(fds) => {
                for (v, fd) in self.msix[start..start + count].iter().zip(fds) {
                    v.lock().fd = Some(Arc::new(File::from(fd)));
                }
                self.flush_pending();
            }
            IrqData::None => {
                for v in start..start + count {
                    self.software_msix(v);
                }
            }
            IrqData::Bool(b) => {
                for (i, on) in b.into_iter().enumerate() {
                    if on {
                        self.software_msix(start + i);
                    }
                }
            }
        }
    }

    fn msix_mask(
        &self,
        action: IrqAction,
        data: IrqData,
        start: usize,
        count: usize,
    ) -> Result<(), Errno> {
        let flags: Vec<bool> = match data {
            IrqData::None => vec![true; count],
            IrqData::Bool(b) => b,
            IrqData::Eventfds(_) => return Err(libc::EINVAL),
        };
        for (v, on) in self.msix[start..start + count].iter().zip(flags) {
            if on {
                v.lock().masked = action == IrqAction::Mask;
            }
        }
        self.flush_pending();
        Ok(())
    }

    fn software_intx(st: &mut State) {
        if let Some(fd) = &st.intx_fd {
            kick(fd);
        }
    }

    fn software_msix(&self, v: usize) {
        let fd = self.msix.get(v).and_then(|v| v.lock().fd.clone());
        if let Some(fd) = fd {
            kick(&fd);
        }
    }
}
