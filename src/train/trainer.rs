//! The names a user of the trainer reaches for, in one place: the run, its
//! configuration and results, the methods' settings.
pub use super::callbacks::Event;
pub use super::config::{config_differences, Config, DeviceKind, Metric, Precision, Reading};
pub use super::evaluate::{evaluate_checkpoint, Eval};
pub use super::fit::Summary;
pub use super::methods::{
    AdapterConfig, BregmanConfig, FreeLbConfig, LoraConfig, Method, MixoutConfig, R3fConfig,
    SmartConfig, SmartMode, SmartReduction,
};
pub use super::run::Run;
pub use super::task::{cross_entropy, squared_error, HeadKind};
