//! The trainer used as a library: a configuration built in code (your own
//! data in a CSV file, SMART with LoRA, transformers' pooler head), run with
//! a callback that sees every step, then the summary and the per-step
//! metrics read back, and the checkpoint evaluated again.
//!
//! `cargo run --release --example trainer_as_library -- MODEL_DIR`
//! (a Hugging Face BERT directory; `scripts/fetch-model.sh` prints one).
//! Writes into a temporary directory and removes it.
use tunefuse::model::Pooling;
use tunefuse::train::trainer::{
    evaluate_checkpoint, Config, DeviceKind, Event, LoraConfig, Method, Run, SmartConfig,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .ok_or("usage: trainer_as_library MODEL_DIR (scripts/fetch-model.sh prints one)")?;
    let dir = std::env::temp_dir().join(format!("tunefuse-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&model, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(model: &str, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    // A small sentiment file in the layout run_glue.py reads.
    let good = [
        "a wonderful, moving film",
        "great acting and a clever plot",
        "i loved every minute",
    ];
    let bad = [
        "a dull, lifeless mess",
        "the plot makes no sense",
        "i want those two hours back",
    ];
    let mut csv = String::from("sentence,label\n");
    for i in 0..16 {
        csv.push_str(&format!("\"{}\",positive\n", good[i % 3]));
        csv.push_str(&format!("\"{}\",negative\n", bad[i % 3]));
    }
    std::fs::write(dir.join("train.csv"), &csv)?;
    std::fs::write(dir.join("dev.csv"), &csv)?;

    let cfg = Config {
        task: "files".into(),
        train_file: Some(dir.join("train.csv")),
        dev_file: Some(dir.join("dev.csv")),
        model: model.into(),
        output: dir.join("run"),
        epochs: 2,
        batch_size: 8,
        lr: 1e-3,
        max_len: 32,
        pooling: Pooling::Pooler,
        device: DeviceKind::Auto,
        methods: vec![
            Method::Smart(SmartConfig::default()),
            Method::Lora(LoraConfig::default()),
        ],
        ..Config::default()
    };
    let mut run = Run::new(cfg)?;
    println!(
        "{} training examples, labels {:?}, {} trainable tensors",
        run.train.examples.len(),
        run.train.labels,
        run.opt.params.len()
    );
    let summary = run.fit(false, |e| match e {
        Event::Step {
            step,
            total,
            loss: Some(l),
            ..
        } => println!("step {step}/{total}: loss {l:.4}"),
        Event::Message(m) => println!("{m}"),
        _ => {}
    })?;
    println!(
        "best {} {:.3} at step {}; final: {}",
        summary.metric,
        summary.best,
        summary.best_step,
        summary.last.brief()
    );
    // Every logged step is a JSON line in metrics.jsonl.
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl"))?;
    println!("metrics.jsonl: {} lines", metrics.lines().count());
    // The best checkpoint evaluates to the recorded best score.
    let again = evaluate_checkpoint(&dir.join("run/best"), None, "dev", None, None, None)?;
    if again.accuracy != summary.best {
        return Err(format!(
            "the checkpoint evaluates to {} but the run recorded {}",
            again.accuracy, summary.best
        )
        .into());
    }
    println!("best/ re-evaluated: accuracy {:.3}", again.accuracy);
    Ok(())
}
