//! NVTX ranges, so an Nsight Systems timeline shows the training step's
//! phases (forward, each ascent step, backward, optimiser step).
//!
//! With the `nvtx` feature (part of `cuda`), `libnvToolsExt.so.1` (NVTX's injection shim,
//! shipped with the CUDA toolkit and the `nvidia-nvtx` wheels; override with
//! `TUNEFUSE_NVTX_LIB`) is opened on first use; without it, or without the
//! feature, ranges cost nothing and do nothing.

/// An open range; it ends when dropped.
#[must_use = "the range ends when this value is dropped"]
pub struct Range {
    #[cfg(feature = "nvtx")]
    open: bool,
}

/// Opens a range named `name`.
pub fn range(name: &str) -> Range {
    #[cfg(feature = "nvtx")]
    {
        Range {
            open: imp::push(name),
        }
    }
    #[cfg(not(feature = "nvtx"))]
    {
        let _ = name;
        Range {}
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        #[cfg(feature = "nvtx")]
        if self.open {
            imp::pop();
        }
    }
}

#[cfg(feature = "nvtx")]
mod imp {
    use std::ffi::{c_char, c_int, CString};
    use std::sync::OnceLock;

    struct Api {
        push: unsafe extern "C" fn(*const c_char) -> c_int,
        pop: unsafe extern "C" fn() -> c_int,
        _lib: libloading::Library,
    }

    fn api() -> Option<&'static Api> {
        static API: OnceLock<Option<Api>> = OnceLock::new();
        API.get_or_init(|| {
            let names = std::env::var("TUNEFUSE_NVTX_LIB")
                .map(|n| vec![n])
                .unwrap_or_else(|_| vec!["libnvToolsExt.so.1".into(), "libnvToolsExt.so".into()]);
            for n in names {
                // SAFETY: loading NVTX runs no initialisers beyond its own
                // setup; the symbols are looked up with their C signatures.
                unsafe {
                    let Ok(lib) = libloading::Library::new(&n) else {
                        continue;
                    };
                    let push = lib
                        .get::<unsafe extern "C" fn(*const c_char) -> c_int>(b"nvtxRangePushA\0")
                        .map(|s| *s);
                    let pop = lib
                        .get::<unsafe extern "C" fn() -> c_int>(b"nvtxRangePop\0")
                        .map(|s| *s);
                    if let (Ok(push), Ok(pop)) = (push, pop) {
                        return Some(Api {
                            push,
                            pop,
                            _lib: lib,
                        });
                    }
                }
            }
            None
        })
        .as_ref()
    }

    pub(super) fn push(name: &str) -> bool {
        let Some(a) = api() else { return false };
        let Ok(c) = CString::new(name) else {
            return false;
        };
        // SAFETY: `c` is a valid NUL-terminated string for the call.
        unsafe { (a.push)(c.as_ptr()) };
        true
    }

    pub(super) fn pop() {
        if let Some(a) = api() {
            // SAFETY: pairs with a successful push on this thread.
            unsafe { (a.pop)() };
        }
    }
}
