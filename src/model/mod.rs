//! The BERT-shaped encoder and the families it loads (BERT, RoBERTa,
//! XLM-RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2/v3), its heads, tokenisation and
//! checkpoint loading.
pub mod bert;
pub mod config;
pub mod family;
pub mod heads;
pub mod layers;
pub mod tokenize;

pub use bert::{Bert, EncoderOutput, Outputs};
pub use config::BertConfig;
pub use family::Family;
pub use heads::{ClassifierHead, Pooling, RegressionHead, TokenHead};
pub use layers::{Adapter, AdapterPlacement, Dense, Lora, StepAnchor, Stream};
pub use tokenize::{Batch, Encoded, Input, TextTokenizer, WordBatch};
