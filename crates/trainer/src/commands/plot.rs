//! `facerec plot --run RUN_DIR [--out DIR]` (`cargo xtask plot --run RUN_DIR`): draws the training curves of a
//! run from its `metrics.jsonl` to PNG with [`facerec_evaluation::plot::line_png`]:
//!
//! - `loss.png`: training loss (the mean over each logging window) over the global step;
//! - `lr.png`: learning rate over the global step;
//! - `accuracy.png`: verification accuracy over the step, one curve per target (only when the run
//!   logged evaluations);
//! - `grad_scale.png`: the mixed-precision grad scale, when the records carry `grad_scale`.
//!
//! Records are JSON objects, one a line: `{"kind": "train", "step", "loss", "lr", ...}` and
//! `{"kind": "eval", "step", "target", "accuracy", ...}`; other kinds are ignored, and a record
//! without `kind` is read as a training record. A line that is not a JSON object, or a train/eval
//! record without a numeric `step`, is an error naming the file and the line. `null` values (a
//! non-finite loss is written as `null`) leave a gap in the curve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use facerec_evaluation::plot::{line_png, Series};

/// `facerec plot` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A run directory holding `metrics.jsonl`, or a metrics `.jsonl` file.
    #[arg(long, value_name = "RUN_DIR|METRICS.jsonl")]
    pub run: PathBuf,
    /// Output folder for the PNGs. Default: `<run dir>/plots`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The curves read from a metrics file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Curves {
    /// (step, loss) of every train record.
    pub loss: Vec<(f64, f64)>,
    /// (step, lr).
    pub lr: Vec<(f64, f64)>,
    /// (step, grad scale), when logged.
    pub grad_scale: Vec<(f64, f64)>,
    /// Target name -> (step, accuracy), in file order.
    pub accuracy: BTreeMap<String, Vec<(f64, f64)>>,
}

/// A number field: `Some(NaN)` for `null` or absent (a gap), an error for anything else.
fn number(rec: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<f64, String> {
    match rec.get(key) {
        None | Some(serde_json::Value::Null) => Ok(f64::NAN),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("`{key}` is {v}, not a number")),
    }
}

/// Parse the text of a metrics file; `origin` names it in errors.
pub fn parse_metrics(text: &str, origin: &Path) -> Result<Curves> {
    let mut c = Curves::default();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{} line {}", origin.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Some(rec) = value.as_object() else {
            bail!("{}: expected a JSON object, got {value}", at());
        };
        let kind = rec.get("kind").and_then(|k| k.as_str()).unwrap_or("train");
        if kind != "train" && kind != "eval" {
            continue;
        }
        let step = rec
            .get("step")
            .and_then(|s| s.as_f64())
            .with_context(|| format!("{}: a `{kind}` record needs a numeric `step`", at()))?;
        let field = |k: &str| number(rec, k).map_err(|e| anyhow::anyhow!("{}: {e}", at()));
        if kind == "train" {
            c.loss.push((step, field("loss")?));
            c.lr.push((step, field("lr")?));
            if rec.contains_key("grad_scale") {
                c.grad_scale.push((step, field("grad_scale")?));
            }
        } else {
            let target = rec
                .get("target")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{}: an `eval` record needs a string `target`", at()))?;
            c.accuracy
                .entry(target.to_string())
                .or_default()
                .push((step, field("accuracy")?));
        }
    }
    Ok(c)
}

/// Draw the curves into `out`; returns the files written.
pub fn draw(c: &Curves, out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut one = |name: &str, title: &str, series: &[Series]| -> Result<()> {
        let path = out.join(name);
        line_png(series, title, "GLOBAL STEP", &path)?;
        written.push(path);
        Ok(())
    };
    one(
        "loss.png",
        "TRAINING LOSS",
        &[Series {
            name: "loss",
            points: &c.loss,
        }],
    )?;
    one(
        "lr.png",
        "LEARNING RATE",
        &[Series {
            name: "lr",
            points: &c.lr,
        }],
    )?;
    if !c.accuracy.is_empty() {
        let series: Vec<Series> = c
            .accuracy
            .iter()
            .map(|(name, points)| Series { name, points })
            .collect();
        one("accuracy.png", "VERIFICATION ACCURACY", &series)?;
    }
    if c.grad_scale.iter().any(|p| p.1.is_finite()) {
        one(
            "grad_scale.png",
            "GRAD SCALE",
            &[Series {
                name: "grad scale",
                points: &c.grad_scale,
            }],
        )?;
    }
    Ok(written)
}

/// Run `facerec plot`.
pub fn run(args: Args) -> Result<()> {
    ensure!(
        args.run.exists(),
        "{} does not exist (expected a run directory or its metrics.jsonl)",
        args.run.display()
    );
    let (metrics, default_out) = if args.run.is_dir() {
        (args.run.join("metrics.jsonl"), args.run.join("plots"))
    } else {
        let dir = args.run.parent().unwrap_or(Path::new("."));
        (args.run.clone(), dir.join("plots"))
    };
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let curves = parse_metrics(&text, &metrics)?;
    ensure!(
        curves.loss.iter().any(|p| p.1.is_finite()),
        "{}: no training record with a finite loss, nothing to plot",
        metrics.display()
    );
    let out = args.out.unwrap_or(default_out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for path in draw(&curves, &out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_train_and_eval_records() {
        let text = r#"{"kind":"train","step":50,"epoch":0,"loss":20.5,"lr":0.05}
{"kind":"eval","step":50,"target":"orl","accuracy":0.8}

{"kind":"train","step":100,"epoch":0,"loss":null,"lr":0.1,"grad_scale":65536.0}
{"kind":"checkpoint","path":"x"}
{"kind":"eval","step":100,"target":"orl","accuracy":0.85}
{"kind":"eval","step":100,"target":"lfw","accuracy":0.6}
"#;
        let c = parse_metrics(text, Path::new("m.jsonl")).unwrap();
        assert_eq!(c.lr, vec![(50.0, 0.05), (100.0, 0.1)]);
        assert_eq!(c.loss[0], (50.0, 20.5));
        assert!(c.loss[1].1.is_nan(), "null loss is a gap");
        assert_eq!(c.grad_scale, vec![(100.0, 65536.0)]);
        assert_eq!(c.accuracy["orl"], vec![(50.0, 0.8), (100.0, 0.85)]);
        assert_eq!(c.accuracy["lfw"], vec![(100.0, 0.6)]);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let err = |text: &str| {
            format!(
                "{:#}",
                parse_metrics(text, Path::new("/r/metrics.jsonl")).unwrap_err()
            )
        };
        let e = err("{\"kind\":\"train\",\"step\":1,\"loss\":1,\"lr\":0.1}\n{\"kind\":\"train\",\"step\":2,\"lo");
        assert!(
            e.contains("/r/metrics.jsonl line 2") && e.contains("not valid JSON"),
            "{e}"
        );
        let e = err("[1, 2]\n");
        assert!(e.contains("line 1") && e.contains("JSON object"), "{e}");
        let e = err("{\"kind\":\"train\",\"loss\":1}\n");
        assert!(e.contains("line 1") && e.contains("`step`"), "{e}");
        let e = err("{\"kind\":\"train\",\"step\":3,\"loss\":\"high\",\"lr\":0.1}\n");
        assert!(e.contains("line 1") && e.contains("`loss`"), "{e}");
        let e = err("{\"kind\":\"eval\",\"step\":3,\"accuracy\":0.5}\n");
        assert!(e.contains("`target`"), "{e}");
    }
}
