//! How sure the local answer is (DESIGN.md section 5): the measures a confidence cascade
//! can use. Each maps a probability vector to [0, 1], 1 meaning certain.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConfidenceMeasure {
    /// The top-1 probability.
    Top1,
    /// Top-1 minus top-2 probability.
    Margin,
    /// `1 + sum(p ln p) / ln N`: 1 for a one-hot vector, 0 for the uniform one.
    Entropy,
}

/// The confidence of `p` (probabilities, summing to about 1) under `measure`.
pub fn confidence(measure: ConfidenceMeasure, p: &[f32]) -> f32 {
    match measure {
        ConfidenceMeasure::Top1 => p.iter().copied().fold(0.0, f32::max),
        ConfidenceMeasure::Margin => {
            let (mut a, mut b) = (0.0f32, 0.0f32);
            for &x in p {
                if x > a {
                    b = a;
                    a = x;
                } else if x > b {
                    b = x;
                }
            }
            a - b
        }
        ConfidenceMeasure::Entropy => {
            if p.len() < 2 {
                return 1.0;
            }
            let sum: f64 = p
                .iter()
                .filter(|&&x| x > 0.0)
                .map(|&x| f64::from(x) * f64::from(x).ln())
                .sum();
            (1.0 + sum / (p.len() as f64).ln()).clamp(0.0, 1.0) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConfidenceMeasure::*;

    #[test]
    fn measures_on_known_vectors() {
        let one_hot = [0.0, 1.0, 0.0, 0.0];
        let uniform = [0.25; 4];
        let split = [0.5, 0.4, 0.1, 0.0];
        assert_eq!(confidence(Top1, &one_hot), 1.0);
        assert_eq!(confidence(Top1, &split), 0.5);
        assert!((confidence(Margin, &split) - 0.1).abs() < 1e-6);
        assert_eq!(confidence(Margin, &uniform), 0.0);
        assert!((confidence(Entropy, &one_hot) - 1.0).abs() < 1e-6);
        assert!(confidence(Entropy, &uniform).abs() < 1e-6);
        let e = confidence(Entropy, &split);
        assert!(e > 0.0 && e < 1.0, "{e}");
    }
}
