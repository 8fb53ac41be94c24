//! Routing decisions that need no I/O (DESIGN.md section 5): where a request is answered
//! (`decide`: locally, by the cluster, or both, a confidence cascade), how sure the local
//! answer is (the measures a cascade can use, each mapping a probability vector to [0, 1], 1
//! meaning certain), and how long a cluster call may take given the request's deadline.
//! The daemon's worker only executes what `decide` says (`daemon/workers.rs`).

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

/// Why a request was answered where it was: the `reason` of its reply and of the
/// `edge_agent_requests_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Answered locally; no cluster is configured.
    LocalOnly,
    /// Answered locally; a cluster is configured and was not needed.
    Local,
    /// The local wait would exceed `offload.max_local_wait_ms`: sent to the cluster.
    Load,
    /// Sent to the cluster for load, which failed: answered locally.
    ClusterFailed,
    /// The local answer was not confident enough: the cluster's answer is sent.
    LowConfidence,
    /// Not confident enough, but too little time was left for a cluster call.
    LowConfidenceDeadline,
    /// Not confident enough; the cluster failed: the local answer is sent.
    LowConfidenceClusterFailed,
    /// Not confident enough; the cluster was unavailable (breaker open, no endpoint).
    LowConfidenceClusterUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LocalOnly => "local_only",
            Self::Local => "local",
            Self::Load => "load",
            Self::ClusterFailed => "cluster_failed",
            Self::LowConfidence => "low_confidence",
            Self::LowConfidenceDeadline => "low_confidence_deadline",
            Self::LowConfidenceClusterFailed => "low_confidence_cluster_failed",
            Self::LowConfidenceClusterUnavailable => "low_confidence_cluster_unavailable",
        }
    }
}

/// What is known about a request when deciding where it is answered. The worker fills it
/// in, asks `decide`, does what it says and asks again, until a reply is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Situation {
    /// The cluster, when one is configured: `None` answers everything locally.
    pub cluster: Option<Cluster>,
    /// The local answer's confidence and the threshold under which the cluster is asked
    /// (`offload.min_confidence`), once the request was classified locally.
    pub local: Option<Confidence>,
    /// The cluster call already made for this request that failed, and why it was made
    /// (`Load` or `LowConfidence`).
    pub failed: Option<Reason>,
}

/// The cluster's side of a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cluster {
    /// Estimated wait for local inference of this request (ms) and the most it may be
    /// (`offload.max_local_wait_ms`; 0 turns offloading for load off).
    pub estimated_wait_ms: f64,
    pub max_local_wait_ms: f64,
    /// The breaker lets a call through and an endpoint is in rotation.
    pub available: bool,
    /// The time the request has left before its deadline (`None`: no deadline); a call is
    /// made only with at least `MIN_CLUSTER_CALL` left (see `cluster_call_timeout`).
    pub time_left: Option<Duration>,
}

/// The local answer's confidence, against the cascade's threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    pub confidence: f32,
    pub min_confidence: f32,
}

/// The next step for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Ask the cluster; its answer is the reply (source `cluster`) with this reason. If the
    /// call fails, decide again with `failed` set to this reason.
    Cluster(Reason),
    /// Classify on the device, then decide again with its confidence.
    ClassifyLocally,
    /// Send the local answer (source `local`) with this reason.
    Local(Reason),
}

/// Where a request goes next: to the cluster for load before classifying locally when the
/// local wait is too long, and after classifying locally to the cluster when the answer is
/// not confident enough (a cascade); the local answer whenever the cluster is unavailable,
/// has failed, or the request has too little time left for it.
pub fn decide(s: &Situation) -> Route {
    let Some(cluster) = s.cluster else {
        return match s.local {
            None => Route::ClassifyLocally,
            Some(_) => Route::Local(Reason::LocalOnly),
        };
    };
    // A call has time when `cluster_call_timeout` would give it any, whatever the timeout.
    let has_time = cluster_call_timeout(Duration::MAX, cluster.time_left).is_some();
    match s.local {
        None => {
            let overloaded =
                cluster.max_local_wait_ms > 0.0 && cluster.estimated_wait_ms > cluster.max_local_wait_ms;
            if s.failed.is_none() && overloaded && cluster.available && has_time {
                Route::Cluster(Reason::Load)
            } else {
                Route::ClassifyLocally
            }
        }
        Some(c) if c.confidence < c.min_confidence => {
            if s.failed == Some(Reason::LowConfidence) {
                Route::Local(Reason::LowConfidenceClusterFailed)
            } else if !has_time {
                // Asking now could only make the reply later than the client wants it.
                Route::Local(Reason::LowConfidenceDeadline)
            } else if cluster.available {
                Route::Cluster(Reason::LowConfidence)
            } else {
                Route::Local(Reason::LowConfidenceClusterUnavailable)
            }
        }
        Some(_) if s.failed == Some(Reason::Load) => Route::Local(Reason::ClusterFailed),
        Some(_) => Route::Local(Reason::Local),
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

    /// Every way through `decide`, as the worker walks it: each row is a request's situation
    /// and the steps it takes (`Fails` marks a cluster call that failed), ending in the
    /// reply's source and reason.
    #[test]
    fn routing_table() {
        #[derive(Debug, Clone, Copy)]
        enum Step {
            Answers,
            Fails,
        }
        use Step::{Answers, Fails};
        let ms = Duration::from_millis;
        // (case, cluster configured, estimated wait ms, max_local_wait_ms, cluster available,
        //  time left before the deadline, local confidence (threshold 0.3), the outcomes of
        //  the cluster calls in order, the reply's (source, reason))
        type Row = (
            &'static str,
            bool,
            f64,
            f64,
            bool,
            Option<Duration>,
            f32,
            &'static [Step],
            (&'static str, &'static str),
        );
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // case                               cluster wait    max     avail  time left     conf  cluster calls     reply
            ("no cluster",                        false, 5000.0, 1000.0, false, None,          0.1, &[],               ("local", "local_only")),
            ("no cluster, unsure",                false, 0.0,    1000.0, false, None,          0.1, &[],               ("local", "local_only")),
            ("idle, confident",                   true,  10.0,   1000.0, true,  None,          0.9, &[],               ("local", "local")),
            ("overloaded",                        true,  5000.0, 1000.0, true,  None,          0.9, &[Answers],        ("cluster", "load")),
            ("wait at the limit",                 true,  1000.0, 1000.0, true,  None,          0.9, &[],               ("local", "local")),
            ("load offload off",                  true,  5000.0, 0.0,    true,  None,          0.9, &[],               ("local", "local")),
            ("overloaded, cluster fails",         true,  5000.0, 1000.0, true,  None,          0.9, &[Fails],          ("local", "cluster_failed")),
            ("overloaded, unavailable",           true,  5000.0, 1000.0, false, None,          0.9, &[],               ("local", "local")),
            ("overloaded, 49 ms left",            true,  5000.0, 1000.0, true,  Some(ms(49)),  0.9, &[],               ("local", "local")),
            ("overloaded, 50 ms left",            true,  5000.0, 1000.0, true,  Some(ms(50)),  0.9, &[Answers],        ("cluster", "load")),
            ("unsure",                            true,  0.0,    1000.0, true,  None,          0.1, &[Answers],        ("cluster", "low_confidence")),
            ("unsure, 300 ms left",               true,  0.0,    1000.0, true,  Some(ms(300)), 0.1, &[Answers],        ("cluster", "low_confidence")),
            ("unsure, cluster fails",             true,  0.0,    1000.0, true,  None,          0.1, &[Fails],          ("local", "low_confidence_cluster_failed")),
            ("unsure, unavailable",               true,  0.0,    1000.0, false, None,          0.1, &[],               ("local", "low_confidence_cluster_unavailable")),
            ("unsure, 10 ms left",                true,  0.0,    1000.0, true,  Some(ms(10)),  0.1, &[],               ("local", "low_confidence_deadline")),
            ("unsure, no time, unavailable",      true,  0.0,    1000.0, false, Some(ms(0)),   0.1, &[],               ("local", "low_confidence_deadline")),
            ("both: load fails, cascade answers", true,  5000.0, 1000.0, true,  None,          0.1, &[Fails, Answers], ("cluster", "low_confidence")),
            ("both: both calls fail",             true,  5000.0, 1000.0, true,  None,          0.1, &[Fails, Fails],   ("local", "low_confidence_cluster_failed")),
            ("both, 20 ms left",                  true,  5000.0, 1000.0, true,  Some(ms(20)),  0.1, &[],               ("local", "low_confidence_deadline")),
            ("confidence at the threshold",       true,  0.0,    1000.0, true,  None,          0.3, &[],               ("local", "local")),
        ];
        for &(case, configured, wait, max_wait, available, time_left, confidence, calls, expected) in rows {
            let mut s = Situation {
                cluster: configured.then_some(Cluster {
                    estimated_wait_ms: wait,
                    max_local_wait_ms: max_wait,
                    available,
                    time_left,
                }),
                local: None,
                failed: None,
            };
            let mut calls = calls.iter();
            let mut steps = 0;
            let got = loop {
                steps += 1;
                assert!(steps <= 4, "{case}: no end");
                match decide(&s) {
                    Route::Cluster(reason) => match calls.next() {
                        Some(Answers) => break ("cluster", reason.as_str()),
                        Some(Fails) => s.failed = Some(reason),
                        None => panic!("{case}: unexpected cluster call for {reason:?}"),
                    },
                    Route::ClassifyLocally => {
                        assert!(s.local.is_none(), "{case}: classified twice");
                        s.local = Some(Confidence {
                            confidence,
                            min_confidence: 0.3,
                        });
                    }
                    Route::Local(reason) => break ("local", reason.as_str()),
                }
            };
            assert_eq!(got, expected, "{case}");
            assert!(
                calls.next().is_none(),
                "{case}: a cluster call expected but not made"
            );
        }
    }
}
