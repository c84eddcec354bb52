//! The BERT encoder, its heads, tokenisation and checkpoint loading.
pub mod bert;
pub mod config;
pub mod heads;
pub mod layers;
pub mod tokenize;

pub use bert::{Bert, EncoderOutput, Outputs};
pub use config::BertConfig;
pub use heads::{ClassifierHead, Pooling, RegressionHead};
pub use layers::{Adapter, AdapterPlacement, Dense, Lora, Stream};
pub use tokenize::{Batch, TextTokenizer};
