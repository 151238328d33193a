//! Interrupt delivery: the eventfds that DEVICE_SET_IRQS hands over, looked
//! up at the moment an interrupt is raised (the client swaps them at will),
//! with pending state for vectors that are masked or have no descriptor yet.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use log::{debug, warn};
use parking_lot::Mutex;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};

use crate::vfio_user::{Errno, IrqAction, IrqData, IrqSet};

#[derive(Default)]
struct Vector {
    fd: Option<File>,
    masked: bool,
    pending: bool,
}

#[derive(Default)]
struct State {
    intx_fd: Option<File>,
    /// INTx is level-triggered and masks itself when it fires.
    intx_masked: bool,
    intx_level: bool,
    msix: Vec<Vector>,
    msix_enabled: bool,
    msix_function_masked: bool,
    err_fd: Option<File>,
}

/// The interrupt state of one PCI function. Shared between the protocol
/// thread (which installs descriptors) and whoever raises interrupts.
pub struct Interrupts {
    state: Mutex<State>,
    /// Size of the MSI-X table; fixed for the life of the function.
    vectors: u16,
}

/// Takes an interrupt descriptor from the client: it must be an eventfd,
/// and it is made non-blocking, so that raising an interrupt can never block
/// the thread that raises it (a counter at its maximum, a full pipe).
fn check_interrupt_fd(fd: &OwnedFd) -> Result<(), Errno> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match link {
        Ok(l) if l.as_os_str() == "anon_inode:[eventfd]" => {}
        Ok(l) => {
            warn!(
                "SET_IRQS: interrupt descriptor is {}, not an eventfd; refused",
                l.display()
            );
            return Err(libc::EINVAL);
        }
        // Without /proc we cannot tell; non-blocking below still keeps us
        // from blocking on it.
        Err(e) => debug!("cannot inspect an interrupt descriptor: {e}"),
    }
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let set = flags >= 0 && {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0 }
    };
    if !set {
        warn!(
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

impl Interrupts {
    pub fn new(msix_vectors: u16) -> Interrupts {
        let mut st = State::default();
        st.msix
            .resize_with(usize::from(msix_vectors), Vector::default);
        Interrupts {
            state: Mutex::new(st),
            vectors: msix_vectors,
        }
    }

    pub fn msix_vectors(&self) -> u16 {
        self.vectors
    }

    pub fn msix_enabled(&self) -> bool {
        self.state.lock().msix_enabled
    }

    /// Raises MSI-X vector `v` if MSI-X is enabled, and says whether it
    /// was (otherwise the caller falls back to INTx). A vector that cannot
    /// be delivered now (function or vector masked, no descriptor yet) stays
    /// pending and is delivered as soon as it can be. One lock per
    /// interrupt: this is on the completion path.
    pub fn signal_msix(&self, v: u16) -> bool {
        let mut st = self.state.lock();
        if !st.msix_enabled {
            return false;
        }
        let blocked = st.msix_function_masked;
        let Some(vec) = st.msix.get_mut(usize::from(v)) else {
            debug!("interrupt on vector {v}, which does not exist; dropped");
            return true;
        };
        match &vec.fd {
            Some(fd) if !blocked && !vec.masked => kick(fd),
            _ => vec.pending = true,
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
        let mut st = self.state.lock();
        st.msix_enabled = enabled;
        st.msix_function_masked = function_masked;
        Self::flush_pending(&mut st);
    }

    /// Pending bits for the PBA, one per vector, packed little-endian into
    /// u64 words.
    pub fn pending_word(&self, word: usize) -> u64 {
        let st = self.state.lock();
        let mut bits = 0u64;
        for (i, v) in st.msix.iter().enumerate().skip(word * 64).take(64) {
            if v.pending {
                bits |= 1 << (i % 64);
            }
        }
        bits
    }

    fn flush_pending(st: &mut State) {
        if !st.msix_enabled || st.msix_function_masked {
            return;
        }
        for vec in st.msix.iter_mut() {
            if vec.pending && !vec.masked {
                if let Some(fd) = &vec.fd {
                    kick(fd);
                    vec.pending = false;
                }
            }
        }
    }

    /// Back to power-on: no MSI-X, nothing pending, INTx unmasked and low.
    /// Descriptors stay (DEVICE_RESET keeps IRQ registrations).
    pub fn reset(&self) {
        let mut st = self.state.lock();
        st.msix_enabled = false;
        st.msix_function_masked = false;
        st.intx_masked = false;
        st.intx_level = false;
        for v in st.msix.iter_mut() {
            v.pending = false;
            v.masked = false;
        }
    }

    /// Forget every descriptor (the client went away).
    pub fn drop_descriptors(&self) {
        let mut st = self.state.lock();
        st.intx_fd = None;
        st.err_fd = None;
        for v in st.msix.iter_mut() {
            v.fd = None;
        }
    }

    /// Applies a validated SET_IRQS request.
    pub fn set_irqs(&self, set: IrqSet) -> Result<(), Errno> {
        // Every descriptor is checked before any state changes.
        if let IrqData::Eventfds(fds) = &set.data {
            fds.iter().try_for_each(check_interrupt_fd)?;
        }
        let mut st = self.state.lock();
        let (start, count) = (set.start as usize, set.count as usize);
        match (set.index, set.action) {
            (VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger) => match set.data {
                IrqData::Eventfds(mut fds) => st.intx_fd = fds.pop().map(File::from),
                IrqData::None if count == 0 => {
                    st.intx_fd = None;
                    st.intx_masked = false;
                }
                IrqData::None => Self::software_intx(&mut st),
                IrqData::Bool(b) => {
                    if b.first() == Some(&true) {
                        Self::software_intx(&mut st);
                    }
                }
            },
            (VFIO_PCI_INTX_IRQ_INDEX, action) => {
                let on = match &set.data {
                    IrqData::Bool(b) => b.first() == Some(&true),
                    // An eventfd for mask/unmask (the KVM resample fd) is
                    // accepted and closed: we unmask on NONE|UNMASK messages.
                    IrqData::Eventfds(_) => false,
                    IrqData::None => true,
                };
                if on {
                    if action == IrqAction::Mask {
                        st.intx_masked = true;
                    } else {
                        st.intx_masked = false;
                        Self::fire_intx(&mut st);
                    }
                }
            }
            (VFIO_PCI_MSIX_IRQ_INDEX, IrqAction::Trigger) => match set.data {
                IrqData::None if count == 0 => {
                    for v in st.msix.iter_mut() {
                        v.fd = None;
                    }
                }
                IrqData::Eventfds(fds) if fds.is_empty() => {
                    for v in &mut st.msix[start..start + count] {
                        v.fd = None;
                    }
                }
                IrqData::Eventfds(fds) => {
                    for (v, fd) in st.msix[start..start + count].iter_mut().zip(fds) {
                        v.fd = Some(File::from(fd));
                    }
                    Self::flush_pending(&mut st);
                }
                IrqData::None => {
                    for v in start..start + count {
                        Self::software_msix(&mut st, v);
                    }
                }
                IrqData::Bool(b) => {
                    for (i, on) in b.into_iter().enumerate() {
                        if on {
                            Self::software_msix(&mut st, start + i);
                        }
                    }
                }
            },
            (VFIO_PCI_MSIX_IRQ_INDEX, action) => {
                let flags: Vec<bool> = match set.data {
                    IrqData::None => vec![true; count],
                    IrqData::Bool(b) => b,
                    IrqData::Eventfds(_) => return Err(libc::EINVAL),
                };
                for (v, on) in st.msix[start..start + count].iter_mut().zip(flags) {
                    if on {
                        v.masked = action == IrqAction::Mask;
                    }
                }
                Self::flush_pending(&mut st);
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

    fn software_intx(st: &mut State) {
        if let Some(fd) = &st.intx_fd {
            kick(fd);
        }
    }

    fn software_msix(st: &mut State, v: usize) {
        if let Some(Some(fd)) = st.msix.get(v).map(|v| &v.fd) {
            kick(fd);
        }
    }
}
