//! Fine-tuning: configuration, active learning, assembly of a run, the loop and its
//! callbacks, one optimiser step, checkpoints, evaluation, the objective and
//! the methods it combines, task heads, data readers, metrics, optimisers,
//! and the results table of a grid of runs.
pub mod active;
pub mod analyze;
pub mod callbacks;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod data;
pub mod evaluate;
pub mod export;
pub mod files;
pub mod fit;
#[cfg(feature = "cuda")]
pub(crate) mod graph;
pub mod methods;
pub mod metrics;
pub mod mft;
pub mod mlm;
pub mod ner;
pub mod objective;
pub mod optim;
pub mod params;
pub mod plots;
pub mod posttrain;
pub mod probing;
pub mod report;
pub mod run;
pub mod scoring;
pub mod step;
pub mod task;
pub mod trainer;
