//! The `tunefuse` command line.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tunefuse::bench;

#[derive(Parser)]
#[command(
    name = "tunefuse",
    version,
    about = "Fused kernels for robust and parameter-efficient fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// CUDA device 0 when present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time the fused ops against the copy-bandwidth floor and print one table.
    Bench {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// PyTorch peer timings (JSON from bench/torch_peers.py) to add to the table.
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Also write the measured rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Copy a Hugging Face model directory with its weights cast to another
    /// dtype (e.g. bf16, to halve what travels to a GPU machine).
    ConvertCheckpoint {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Print the table from saved results (`bench --json`) and PyTorch peers.
    Table {
        #[arg(long)]
        ours: PathBuf,
        #[arg(long)]
        peers: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunefuse: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Bench {
            device,
            peers,
            json,
        } => {
            let peers = peers
                .map(|p| bench::load_peers(&p))
                .transpose()?
                .unwrap_or_default();
            let dev = match device {
                DeviceArg::Cpu => candle_core::Device::Cpu,
                DeviceArg::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
                    format!("no CUDA device ({e}); build with `--features cuda` on a machine with a GPU, or use --device cpu")
                })?,
                DeviceArg::Auto => candle_core::Device::cuda_if_available(0).map_err(|e| e.to_string())?,
            };
            let name = bench::device_name(&dev);
            eprintln!("tunefuse bench on {name}");
            let copy = bench::copy_bandwidth(&dev).map_err(|e| e.to_string())?;
            let rows = bench::run_all(&dev, |what| eprintln!("  timing {what} ..."))
                .map_err(|e| e.to_string())?;
            print!("{}", bench::table(&name, copy, &rows, &peers));
            if let Some(path) = json {
                let doc = serde_json::json!({ "device": name, "copy_gbps": copy, "results": rows });
                std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Cmd::ConvertCheckpoint {
            input,
            output,
            dtype,
        } => {
            let dtype = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "bf16" => candle_core::DType::BF16,
                "f16" => candle_core::DType::F16,
                other => return Err(format!("unknown dtype {other:?}: f32, bf16 or f16")),
            };
            tunefuse::model::bert::convert_checkpoint(&input, &output, dtype)
                .map_err(|e| e.to_string())?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Table { ours, peers } => {
            let peers = peers
                .map(|p| bench::load_peers(&p))
                .transpose()?
                .unwrap_or_default();
            let (name, copy, rows) = bench::load_ours(&ours)?;
            print!("{}", bench::table(&name, copy, &rows, &peers));
            Ok(())
        }
    }
}
