//! The crate's error type. Every check on user input returns one of these,
//! naming the offending values; nothing in the public API panics on bad input.
use candle_core::DType;

/// Errors returned by tunefuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor shapes that do not fit together.
    #[error("{op}: {msg}")]
    Shape {
        /// The op or component that refused.
        op: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
    /// A dtype the op does not support, or two inputs with different dtypes.
    #[error("{op}: {msg}")]
    DType {
        /// The op or component that refused.
        op: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
    /// A parameter outside its range.
    #[error("{op}: {msg}")]
    Param {
        /// The op or component that refused.
        op: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
    /// Tensors on different devices.
    #[error("{op}: {msg}")]
    Device {
        /// The op or component that refused.
        op: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
    /// A file that cannot be read or written.
    #[error("cannot access {path}: {msg}")]
    Io {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A file whose content is malformed (the message names the line or
    /// tensor).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Training produced values that are not finite (a diverged run), or a
    /// model's outputs are not finite.
    #[error("{0}")]
    NotFinite(String),
    /// A run stopped on SIGINT or SIGTERM after writing its resumable state
    /// (see [`crate::interrupt`]).
    #[error("{0}")]
    Interrupted(String),
    /// An error from candle (allocation, CUDA launch, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the crate's error.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Shape {
        op,
        msg: msg.into(),
    }
}

pub(crate) fn param_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Param {
        op,
        msg: msg.into(),
    }
}

/// The floating dtypes every fused op supports on every device.
pub(crate) fn check_float_dtype(op: &'static str, what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(()),
        other => Err(Error::DType {
            op,
            msg: format!("{what} has dtype {other:?}; expected f32, bf16 or f16 (f64 on CPU)"),
        }),
    }
}

/// A companion tensor of an op's main input (a mask, a bias) must have its
/// dtype and be on its device.
pub(crate) fn check_companion(
    op: &'static str,
    (t, name): (&candle_core::Tensor, &str),
    (like, like_name): (&candle_core::Tensor, &str),
) -> Result<()> {
    if t.dtype() != like.dtype() {
        return Err(Error::DType {
            op,
            msg: format!(
                "{name} is {:?}, {like_name} {:?}; they must match",
                t.dtype(),
                like.dtype()
            ),
        });
    }
    if !t.device().same_device(like.device()) {
        return Err(Error::Device {
            op,
            msg: format!("{name} is not on {like_name}'s device"),
        });
    }
    Ok(())
}

pub(crate) fn check_same(
    op: &'static str,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    names: (&str, &str),
) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(shape_err(
            op,
            format!(
                "{} has shape {:?} but {} has shape {:?}",
                names.0,
                a.dims(),
                names.1,
                b.dims()
            ),
        ));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType {
            op,
            msg: format!(
                "{} is {:?} but {} is {:?}",
                names.0,
                a.dtype(),
                names.1,
                b.dtype()
            ),
        });
    }
    if !a.device().same_device(b.device()) {
        return Err(Error::Device {
            op,
            msg: format!(
                "{} is on {:?} but {} is on {:?}",
                names.0,
                a.device().location(),
                names.1,
                b.device().location()
            ),
        });
    }
    Ok(())
}

/// Converts an I/O error on `path`.
pub(crate) fn io_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// A malformed-content error on `path`.
pub(crate) fn format_err(path: &std::path::Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}
