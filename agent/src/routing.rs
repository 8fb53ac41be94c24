//! Routing decisions that need no I/O (DESIGN.md section 5): how sure the local answer is
//! (the measures a confidence cascade can use, each mapping a probability vector to [0, 1],
//! 1 meaning certain), and how long a cluster call may take given the request's deadline.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Less time than this left before a request's deadline: the cluster is not asked (a call
/// that short cannot come back with an answer; the local one is sent instead).
pub const MIN_CLUSTER_CALL: Duration = Duration::from_millis(50);

/// How long one cluster call may take: `timeout` (`offload.timeout_ms`), or the time the
/// request has `left` before its deadline when that is shorter; `None` when less than
/// `MIN_CLUSTER_CALL` is left (the call is not made). `left` is `None` without a deadline.
pub fn cluster_call_timeout(timeout: Duration, left: Option<Duration>) -> Option<Duration> {
    match left {
        None => Some(timeout),
        Some(left) if left < MIN_CLUSTER_CALL => None,
        Some(left) => Some(timeout.min(left)),
    }
}

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

/// The confidence of `p` (probabilities, summing to about 1) under `measure`. A vector with a
/// NaN or an infinity says nothing: confidence 0.
pub fn confidence(measure: ConfidenceMeasure, p: &[f32]) -> f32 {
    if p.iter().any(|x| !x.is_finite()) {
        return 0.0;
    }
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
            // Over the classes given (renormalised: a background class may have been left out).
            let total: f64 = p.iter().filter(|&&x| x > 0.0).map(|&x| f64::from(x)).sum();
            if total <= 0.0 {
                return 0.0;
            }
            let sum: f64 = p
                .iter()
                .filter(|&&x| x > 0.0)
                .map(|&x| f64::from(x) / total * (f64::from(x) / total).ln())
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
        // Without its background class a vector is judged on what is left.
        let labelled = [0.05f32, 0.0, 0.0]; // the background took 0.95
        assert!((confidence(Entropy, &labelled) - 1.0).abs() < 1e-6);
        assert_eq!(confidence(Entropy, &[0.0; 3]), 0.0);
    }

    #[test]
    fn a_vector_with_nan_or_infinity_is_not_confident() {
        for v in [
            [f32::NAN; 4],
            [0.1, f32::NAN, 0.9, 0.0],
            [0.0, f32::INFINITY, 0.0, 0.0],
        ] {
            for m in [Top1, Margin, Entropy] {
                assert_eq!(confidence(m, &v), 0.0, "{m:?} {v:?}");
            }
        }
    }

    #[test]
    fn a_cluster_call_never_outlives_the_deadline() {
        let t = Duration::from_millis(2000);
        assert_eq!(cluster_call_timeout(t, None), Some(t));
        assert_eq!(
            cluster_call_timeout(t, Some(Duration::from_millis(300))),
            Some(Duration::from_millis(300))
        );
        assert_eq!(cluster_call_timeout(t, Some(Duration::from_secs(10))), Some(t));
        assert_eq!(
            cluster_call_timeout(t, Some(MIN_CLUSTER_CALL)),
            Some(MIN_CLUSTER_CALL)
        );
        assert_eq!(cluster_call_timeout(t, Some(Duration::from_millis(49))), None);
        assert_eq!(cluster_call_timeout(t, Some(Duration::ZERO)), None);
    }
}
