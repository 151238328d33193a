//! librbd and librados, loaded at run time (dlopen): one binary runs where
//! Ceph's libraries are not installed, and says how to install them when an
//! `rbd:` disk is asked for. Only the functions the backend calls, with the
//! C types of Ceph 16 (pacific) headers `rbd/librbd.h` and
//! `rados/librados.h`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

pub type Rados = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Completion = *mut c_void;
pub type CompletionCb = unsafe extern "C" fn(c: Completion, arg: *mut c_void);
pub type UpdateCb = unsafe extern "C" fn(arg: *mut c_void);

/// `rbd_config_option_t`: one configuration option as an image has it.
#[repr(C)]
pub struct ConfigOption {
    pub name: *mut c_char,
    pub value: *mut c_char,
    pub source: c_int,
}

/// `RBD_LOCK_MODE_EXCLUSIVE`: no automatic hand-over of the lock.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// The functions, resolved once. The libraries stay loaded for the life of
/// the process (the pointers below point into them).
pub struct Lib {
    _rados: libloading::Library,
    _rbd: libloading::Library,
    pub rados_create2: unsafe extern "C" fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_config_image_list: unsafe extern "C" fn(Image, *mut ConfigOption, *mut c_int) -> c_int,
    pub rbd_config_image_list_cleanup: unsafe extern "C" fn(*mut ConfigOption, c_int),
    pub rbd_lock_acquire: unsafe extern "C" fn(Image, c_int) -> c_int,
    pub rbd_lock_release: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_update_watch: unsafe extern "C" fn(Image, *mut u64, UpdateCb, *mut c_void) -> c_int,
    pub rbd_update_unwatch: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Option<CompletionCb>, *mut Completion) -> c_int,
    pub rbd_aio_wait_for_complete: unsafe extern "C" fn(Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
}

/// What to tell a user whose machine lacks the libraries.
const INSTALL: &str = "install Ceph's client libraries: apt-get install librbd1 (Debian, Ubuntu)";

fn load() -> Result<Lib, String> {
    let open = |name: &str| {
        // SAFETY: loading Ceph's client libraries runs their initialisers,
        // which only set up their own state.
        unsafe { libloading::Library::new(name) }
            .map_err(|e| format!("cannot load {name} ({e}); {INSTALL}"))
    };
    let rados = open("librados.so.2")?;
    let rbd = open("librbd.so.1")?;
    macro_rules! sym {
        ($lib:expr, $name:ident) => {{
            // SAFETY: the symbol is declared with the type of Ceph 16's
            // header; the pointer is used only while the library, kept in
            // `Lib`, stays loaded.
            let s = unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("{} lacks {}: {e}", stringify!($lib), stringify!($name)))?;
            *s
        }};
    }
    Ok(Lib {
        rados_create2: sym!(rados, rados_create2),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_get_features: sym!(rbd, rbd_get_features),
        rbd_resize: sym!(rbd, rbd_resize),
        rbd_config_image_list: sym!(rbd, rbd_config_image_list),
        rbd_config_image_list_cleanup: sym!(rbd, rbd_config_image_list_cleanup),
        rbd_lock_acquire: sym!(rbd, rbd_lock_acquire),
        rbd_lock_release: sym!(rbd, rbd_lock_release),
        rbd_update_watch: sym!(rbd, rbd_update_watch),
        rbd_update_unwatch: sym!(rbd, rbd_update_unwatch),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_wait_for_complete: sym!(rbd, rbd_aio_wait_for_complete),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
        _rados: rados,
        _rbd: rbd,
    })
}

/// The libraries, loaded at the first `rbd:` disk.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}
