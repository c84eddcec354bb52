//! Fine-tuning support: data readers and evaluation metrics.
pub mod data;
pub mod metrics;
