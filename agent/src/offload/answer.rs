//! Reading a pool's answer into labelled scores, whatever shape the pool answers with.
//!
//! Pools name their outputs `scores` (and `classes`), as TF Serving's classification examples,
//! Triton, KServe and MLServer classifiers do; `probabilities` (what `edge-agent serve`
//! answered on its tensor signatures before it answered `scores`) is read as `scores`. Only
//! the first row of a `[N, ...]` output is read: the agent sends one image. The shapes:
//!
//! | `scores`  | `classes` | labels and scores                                               |
//! |-----------|-----------|-----------------------------------------------------------------|
//! | `[N, k]`  | `[N, k]`  | pairwise: `classes[i]` scored `scores[i]` (TF Serving Inception) |
//! | `[N, C]`  | `[N, C]`  | pairwise, every class                                           |
//! | `[N, C]`  | `[N, k]`  | `classes[i]` scored at its own index in the full vector: the     |
//! |           |           | bundle's labels give the index, so `C` must be the bundle's      |
//! |           |           | output classes (MLServer/Triton classifiers)                     |
//! | `[N, C]`  | none      | the bundle's labels, `C` must be its output classes             |
//!
//! Labels come out best first, at most `top_k`. With `offload.pool_scores = "logits"` a full
//! vector (`[N, C]` without classes, or with fewer classes than scores) is turned into
//! probabilities with a softmax; pairwise logits cannot be (the other classes' logits are
//! not known) and stay logits, and the reply says so. Anything else (no scores, classes
//! without scores, more classes than scores, a full vector that is not the bundle's, a class
//! the bundle does not know, a score that is not finite) is an error naming what was found:
//! the request is then answered locally with reason `..._cluster_failed`.

use std::collections::HashMap;

use edge_runtime::bundle::Manifest;

use crate::config::PoolScores;
use crate::reply::Label;

/// The values of one output tensor of a pool's reply, whatever the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Floats(Vec<f32>),
    Strings(Vec<Vec<u8>>),
    /// A datatype this reader has no use for (named in errors).
    Other(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// As the pool gave it; empty when it gave none.
    pub shape: Vec<i64>,
    pub values: Values,
}

/// The cluster's answer: labels best first, with what their scores are.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub top: Vec<Label>,
    pub scores: PoolScores,
}

/// Reads the outputs of a reply (by name) for `manifest`'s model.
pub fn read(
    outputs: &HashMap<String, Output>,
    manifest: &Manifest,
    top_k: usize,
    kind: PoolScores,
) -> Result<Answer, String> {
    let names = || {
        let mut n: Vec<&str> = outputs.keys().map(String::as_str).collect();
        n.sort_unstable();
        n.join(", ")
    };
    let Some((scores_name, scores)) = ["scores", "probabilities"]
        .into_iter()
        .find_map(|n| outputs.get(n).map(|o| (n, o)))
    else {
        return Err(format!("the reply has no `scores` output (outputs: {})", names()));
    };
    let Values::Floats(values) = &scores.values else {
        return Err(format!(
            "output `{scores_name}` is not a float tensor ({})",
            describe(&scores.values)
        ));
    };
    let scores_row = first_row(scores_name, &scores.shape, values)?;
    if let Some(i) = scores_row.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "output `{scores_name}` holds a score that is not finite ({} at index {i})",
            scores_row[i]
        ));
    }
    let classes_row = match outputs.get("classes") {
        None => None,
        Some(o) => match &o.values {
            Values::Strings(v) => Some(first_row("classes", &o.shape, v)?),
            other => {
                return Err(format!(
                    "output `classes` is not a string tensor ({})",
                    describe(other)
                ));
            }
        },
    };
    // A bundle without labels names its classes `class_<index>` (`runtime::top_k`).
    let label_index = |label: &str| match manifest.labels.iter().position(|l| l == label) {
        Some(i) => Some(i + manifest.output.label_offset),
        None if manifest.labels.is_empty() => label
            .strip_prefix("class_")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| (manifest.output.label_offset..manifest.output.classes).contains(i)),
        None => None,
    };
    let bundle_classes = manifest.output.classes;
    let full_vector = |what: &str| -> Result<Vec<f32>, String> {
        if scores_row.len() != bundle_classes {
            return Err(format!(
                "output `{scores_name}` holds {} scores {what}, the bundle's model has {bundle_classes} classes: \
                 which score is whose cannot be told",
                scores_row.len()
            ));
        }
        let mut v = scores_row.to_vec();
        if kind == PoolScores::Logits {
            edge_runtime::runtime::softmax(&mut v);
        }
        Ok(v)
    };
    let (mut top, kind) = match classes_row {
        Some(classes) if classes.len() == scores_row.len() => {
            let top = classes
                .iter()
                .zip(scores_row)
                .map(|(c, &score)| {
                    let label = String::from_utf8_lossy(c).into_owned();
                    Label {
                        index: label_index(&label),
                        label,
                        score,
                    }
                })
                .collect();
            (top, kind)
        }
        Some(classes) if classes.len() < scores_row.len() => {
            let full = full_vector(&format!("beside {} classes", classes.len()))?;
            let top = classes
                .iter()
                .map(|c| {
                    let label = String::from_utf8_lossy(c).into_owned();
                    let index = label_index(&label).ok_or_else(|| {
                        format!("the pool's class `{label}` is not a label of the bundle: its score cannot be found")
                    })?;
                    Ok(Label {
                        label,
                        index: Some(index),
                        score: full[index],
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            (top, PoolScores::Probabilities)
        }
        Some(classes) => {
            return Err(format!(
                "output `classes` holds {} classes for {} scores",
                classes.len(),
                scores_row.len()
            ));
        }
        None => {
            let full = full_vector("without classes")?;
            let top = edge_runtime::runtime::top_k(manifest, &full, top_k)
                .into_iter()
                .map(Label::from)
                .collect();
            (top, PoolScores::Probabilities)
        }
    };
    // Best first (a stable sort keeps the pool's order among equal scores).
    top.sort_by(|a, b| b.score.total_cmp(&a.score));
    top.truncate(top_k);
    Ok(Answer { top, scores: kind })
}

/// The first row of a `[N, ...]` output (`[k]` is one row).
fn first_row<'a, T>(name: &str, shape: &[i64], values: &'a [T]) -> Result<&'a [T], String> {
    let row = match shape {
        [] => values.len(),
        [n, rest @ ..] if rest.is_empty() || *n >= 1 => {
            // `[k]` is one row of k.
            let (n, row) = if rest.is_empty() {
                (1, *n)
            } else {
                (*n, rest.iter().product())
            };
            if row < 0 || n.saturating_mul(row) != values.len() as i64 {
                return Err(format!(
                    "output `{name}` has shape {shape:?} but holds {} values",
                    values.len()
                ));
            }
            row as usize
        }
        _ => return Err(format!("output `{name}` has shape {shape:?}: no row")),
    };
    values
        .get(..row)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| format!("output `{name}` is empty"))
}

fn describe(v: &Values) -> String {
    match v {
        Values::Floats(_) => "float".into(),
        Values::Strings(_) => "string".into(),
        Values::Other(t) => t.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_runtime::bundle::manifest::{
        InputSpec, Layout, ModelInfo, OutputKind, OutputSpec, Preprocessing, SourceFormat, SourceInfo,
    };

    /// `manifest(UNLABELLED)`: the 4-class bundle without labels.
    const UNLABELLED: usize = usize::MAX;

    /// A bundle of 4 classes, `a`..`d`, or 5 with a background class first (`offset` 1).
    fn manifest(offset: usize) -> Manifest {
        if offset == UNLABELLED {
            return Manifest {
                labels: Vec::new(),
                ..manifest(0)
            };
        }
        Manifest {
            format_version: 1,
            model: ModelInfo {
                name: "m".into(),
                version: "1".into(),
            },
            source: SourceInfo {
                format: SourceFormat::Onnx,
                file: "m.onnx".into(),
                sha256: String::new(),
                signature: None,
            },
            tract_version: String::new(),
            converter_version: String::new(),
            input: InputSpec {
                name: "input".into(),
                shape: vec![1, 2, 2, 3],
                layout: Layout::Nhwc,
                dtype: "float32".into(),
            },
            preprocessing: Preprocessing::inception(),
            output: OutputSpec {
                name: "scores".into(),
                kind: OutputKind::Probabilities,
                classes: 4 + offset,
                label_offset: offset,
            },
            labels: ["a", "b", "c", "d"].map(String::from).to_vec(),
            verification: None,
        }
    }

    fn floats(shape: &[i64], v: &[f32]) -> Output {
        Output {
            shape: shape.to_vec(),
            values: Values::Floats(v.to_vec()),
        }
    }

    fn strings(shape: &[i64], v: &[&str]) -> Output {
        Output {
            shape: shape.to_vec(),
            values: Values::Strings(v.iter().map(|s| s.as_bytes().to_vec()).collect()),
        }
    }

    type Top = Vec<(&'static str, Option<usize>, f32)>;
    /// (case, bundle offset, outputs, top_k, pool_scores, labels, their kind)
    type Case = (
        &'static str,
        usize,
        Vec<(&'static str, Output)>,
        usize,
        PoolScores,
        Top,
        PoolScores,
    );

    fn top(answer: &Answer) -> Vec<(String, Option<usize>, f32)> {
        answer
            .top
            .iter()
            .map(|l| (l.label.clone(), l.index, l.score))
            .collect()
    }

    #[test]
    fn every_shape_a_pool_answers_with_pairs_each_label_with_its_own_score() {
        use PoolScores::{Logits, Probabilities as Probs};
        let full = [0.1, 0.6, 0.05, 0.25];
        let logits = [0.0f32, 2.0, -1.0, 1.0];
        let mut soft = logits;
        edge_runtime::runtime::softmax(&mut soft);
        let cases: Vec<Case> = vec![
            (
                "[N,k] scores with [N,k] classes (TF Serving Inception): pairwise",
                0,
                vec![
                    ("classes", strings(&[1, 2], &["b", "d"])),
                    ("scores", floats(&[1, 2], &[0.6, 0.25])),
                ],
                5,
                Probs,
                vec![("b", Some(1), 0.6), ("d", Some(3), 0.25)],
                Probs,
            ),
            (
                "[N,C] scores with [N,k] classes (MLServer/Triton): each class scored at its index",
                0,
                vec![
                    ("classes", strings(&[1, 2], &["b", "d"])),
                    ("scores", floats(&[1, 4], &full)),
                ],
                5,
                Probs,
                vec![("b", Some(1), 0.6), ("d", Some(3), 0.25)],
                Probs,
            ),
            (
                "[N,C] with [N,k] classes, a background class first in the bundle",
                1,
                vec![
                    ("classes", strings(&[1, 2], &["a", "c"])),
                    ("scores", floats(&[1, 5], &[0.5, 0.2, 0.1, 0.15, 0.05])),
                ],
                5,
                Probs,
                vec![("a", Some(1), 0.2), ("c", Some(3), 0.15)],
                Probs,
            ),
            (
                "[N,C] with [N,k] classes, a bundle without labels: class_<index>",
                UNLABELLED,
                vec![
                    ("classes", strings(&[1, 2], &["class_1", "class_3"])),
                    ("scores", floats(&[1, 4], &full)),
                ],
                5,
                Probs,
                vec![("class_1", Some(1), 0.6), ("class_3", Some(3), 0.25)],
                Probs,
            ),
            (
                "[N,C] scores with [N,C] classes: pairwise, best first, top-k",
                0,
                vec![
                    ("classes", strings(&[1, 4], &["a", "b", "c", "d"])),
                    ("scores", floats(&[1, 4], &full)),
                ],
                2,
                Probs,
                vec![("b", Some(1), 0.6), ("d", Some(3), 0.25)],
                Probs,
            ),
            (
                "[N,C] scores alone: the bundle's labels",
                0,
                vec![("scores", floats(&[1, 4], &full))],
                3,
                Probs,
                vec![("b", Some(1), 0.6), ("d", Some(3), 0.25), ("a", Some(0), 0.1)],
                Probs,
            ),
            (
                "`probabilities` [N,C] (edge-agent serve before `scores`)",
                0,
                vec![("probabilities", floats(&[1, 4], &full))],
                1,
                Probs,
                vec![("b", Some(1), 0.6)],
                Probs,
            ),
            (
                "[N,C] logits alone: softmax, then probabilities",
                0,
                vec![("scores", floats(&[1, 4], &logits))],
                2,
                Logits,
                vec![("b", Some(1), soft[1]), ("d", Some(3), soft[3])],
                Probs,
            ),
            (
                "[N,C] logits with [N,k] classes: softmax over the full vector",
                0,
                vec![
                    ("classes", strings(&[1, 1], &["d"])),
                    ("scores", floats(&[1, 4], &logits)),
                ],
                5,
                Logits,
                vec![("d", Some(3), soft[3])],
                Probs,
            ),
            (
                "[N,k] logits with [N,k] classes: stay logits",
                0,
                vec![
                    ("classes", strings(&[1, 2], &["b", "zebra"])),
                    ("scores", floats(&[1, 2], &[7.5, 3.0])),
                ],
                5,
                Logits,
                vec![("b", Some(1), 7.5), ("zebra", None, 3.0)],
                Logits,
            ),
            (
                "batch of 2: the first row",
                0,
                vec![
                    ("classes", strings(&[2, 1], &["c", "a"])),
                    ("scores", floats(&[2, 1], &[0.9, 0.8])),
                ],
                5,
                Probs,
                vec![("c", Some(2), 0.9)],
                Probs,
            ),
            (
                "pairwise out of order: sorted best first",
                0,
                vec![
                    ("classes", strings(&[2], &["a", "b"])),
                    ("scores", floats(&[2], &[0.1, 0.6])),
                ],
                5,
                Probs,
                vec![("b", Some(1), 0.6), ("a", Some(0), 0.1)],
                Probs,
            ),
        ];
        for (case, offset, outputs, k, kind, want, want_kind) in cases {
            let outputs: HashMap<String, Output> =
                outputs.into_iter().map(|(n, o)| (n.to_owned(), o)).collect();
            let got = read(&outputs, &manifest(offset), k, kind).unwrap_or_else(|e| panic!("{case}: {e}"));
            let want: Vec<(String, Option<usize>, f32)> =
                want.into_iter().map(|(l, i, s)| (l.to_owned(), i, s)).collect();
            assert_eq!(top(&got), want, "{case}");
            assert_eq!(got.scores, want_kind, "{case}");
        }
    }

    #[test]
    fn answers_that_cannot_be_read_say_what_was_found() {
        let cases: Vec<(Vec<(&str, Output)>, &str)> = vec![
            (vec![], "no `scores` output (outputs: )"),
            (
                vec![
                    ("classes", strings(&[1, 1], &["a"])),
                    ("logits", floats(&[1, 4], &[0.0; 4])),
                ],
                "no `scores` output (outputs: classes, logits)",
            ),
            (
                vec![("scores", floats(&[1, 3], &[0.2, 0.3, 0.5]))],
                "holds 3 scores without classes, the bundle's model has 4 classes",
            ),
            (
                vec![
                    ("classes", strings(&[1, 1], &["a"])),
                    ("scores", floats(&[1, 5], &[0.2; 5])),
                ],
                "holds 5 scores beside 1 classes, the bundle's model has 4 classes",
            ),
            (
                vec![
                    ("classes", strings(&[1, 1], &["zebra"])),
                    ("scores", floats(&[1, 4], &[0.25; 4])),
                ],
                "the pool's class `zebra` is not a label of the bundle",
            ),
            (
                vec![
                    ("classes", strings(&[1, 3], &["a", "b", "c"])),
                    ("scores", floats(&[1, 2], &[0.5, 0.5])),
                ],
                "holds 3 classes for 2 scores",
            ),
            (
                vec![("scores", floats(&[1, 4], &[0.1, f32::NAN, 0.2, 0.3]))],
                "not finite (NaN at index 1)",
            ),
            (
                vec![("scores", floats(&[1, 5], &[0.25; 4]))],
                "has shape [1, 5] but holds 4 values",
            ),
            (vec![("scores", floats(&[0, 4], &[]))], "has shape [0, 4]"),
            (
                vec![("scores", strings(&[1, 1], &["0.5"]))],
                "output `scores` is not a float tensor (string)",
            ),
            (
                vec![
                    ("classes", floats(&[1, 1], &[3.0])),
                    ("scores", floats(&[1, 1], &[0.5])),
                ],
                "output `classes` is not a string tensor (float)",
            ),
            (
                vec![(
                    "scores",
                    Output {
                        shape: vec![1, 4],
                        values: Values::Other("datatype INT64".into()),
                    },
                )],
                "not a float tensor (datatype INT64)",
            ),
        ];
        for (outputs, want) in cases {
            let outputs: HashMap<String, Output> =
                outputs.into_iter().map(|(n, o)| (n.to_owned(), o)).collect();
            let err = read(&outputs, &manifest(0), 5, PoolScores::Probabilities).expect_err(want);
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }
}
