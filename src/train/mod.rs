//! Fine-tuning: data readers, metrics, optimisers, the trainer and the
//! results table of a grid of runs.
pub mod data;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod trainer;
