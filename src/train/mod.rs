//! Fine-tuning support: data readers and evaluation metrics.
pub mod data;
pub mod metrics;
pub mod optim;
pub mod trainer;
