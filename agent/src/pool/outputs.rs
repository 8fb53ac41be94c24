//! What the pool answers, whatever the protocol: outputs named as TF Serving's classification
//! examples and Triton/KServe classifiers name them, so that their clients find them.
//!
//! - A labelled top-k (encoded images always; tensors when a top-k or `classes` is asked
//!   for): `classes` `[N, k]` (label names) and `scores` `[N, k]`, pairwise, best first, as
//!   TF Serving's Inception example answers.
//! - Otherwise (tensors): `scores` `[N, C]`, the probability of every output class (a
//!   background class included: the shape of the model's output), as TF Serving's MNIST
//!   classification example answers.
//!
//! Scores are probabilities (softmax applied for logit models). Before `scores`, the tensor
//! signatures answered the full vector as `probabilities`; agents still read that name.

use edge_runtime::runtime::Classifier;

use super::engine::Scored;

/// The answer a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// The best `k` labels and their scores.
    TopK(usize),
    /// The score of every class.
    Every,
}

/// The outputs of a reply, `[N, ...]` each, values row after row.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// Label names, for a top-k.
    pub classes: Option<(Vec<i64>, Vec<Vec<u8>>)>,
    pub scores: (Vec<i64>, Vec<f32>),
}

impl Outputs {
    pub fn new(model: &Classifier, scored: Vec<Scored>, asked: Asked) -> Self {
        let n = scored.len() as i64;
        match asked {
            Asked::TopK(k) => {
                let mut classes = Vec::new();
                let mut scores = Vec::new();
                for s in &scored {
                    for pred in model.top_k(&s.probabilities, k) {
                        classes.push(pred.label.into_bytes());
                        scores.push(pred.score);
                    }
                }
                let shape = vec![n, (scores.len() as i64).checked_div(n).unwrap_or(0)];
                Outputs {
                    classes: Some((shape.clone(), classes)),
                    scores: (shape, scores),
                }
            }
            Asked::Every => {
                let c = scored.first().map_or(0, |s| s.probabilities.len()) as i64;
                Outputs {
                    classes: None,
                    scores: (
                        vec![n, c],
                        scored.into_iter().flat_map(|s| s.probabilities).collect(),
                    ),
                }
            }
        }
    }
}
