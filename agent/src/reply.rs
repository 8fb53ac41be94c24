//! The reply documents of the device daemon (DESIGN.md section 4), built here and nowhere
//! else: a successful reply answered locally or by the cluster (`source`, `reason`, the top
//! labels, timings) and the error reply `{"id", "device", "model"?, "error": {"code",
//! "message"}}` with its stable codes. Parsing requests is `request`'s; where a request is
//! answered is `routing`'s.

use serde::Serialize;

/// The stable error codes of error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed (3.1.1 envelope, bad property values).
    InvalidRequest,
    /// The image cannot be decoded (garbage, truncated).
    InvalidImage,
    /// The image exceeds the byte or pixel limits.
    TooLarge,
    /// Not JPEG or PNG.
    UnsupportedFormat,
    /// The deadline passed before the request was classified.
    DeadlineExceeded,
    /// The agent failed (and retried) or the model failed.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidImage => "invalid_image",
            Self::TooLarge => "too_large",
            Self::UnsupportedFormat => "unsupported_format",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
        }
    }

    /// The code for an error code string of the runtime (`RuntimeError::code`).
    pub fn from_runtime(code: &str) -> Self {
        match code {
            "invalid_image" => Self::InvalidImage,
            "too_large" => Self::TooLarge,
            "unsupported_format" => Self::UnsupportedFormat,
            _ => Self::Internal,
        }
    }

    pub const ALL: [ErrorCode; 6] = [
        Self::InvalidRequest,
        Self::InvalidImage,
        Self::TooLarge,
        Self::UnsupportedFormat,
        Self::DeadlineExceeded,
        Self::Internal,
    ];
}

/// The model a reply names.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

/// One label of a reply.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Label {
    pub label: String,
    /// Index in the model's output; absent when the cluster answered with a label the
    /// local model does not have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub score: f32,
}

impl From<edge_runtime::runtime::Prediction> for Label {
    /// A class the local model scored (so its index is known).
    fn from(p: edge_runtime::runtime::Prediction) -> Self {
        Self {
            label: p.label,
            index: Some(p.index),
            score: p.score,
        }
    }
}

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Timings {
    /// From arrival to the start of classification.
    pub queued: f64,
    pub preprocess: f64,
    pub inference: f64,
    /// From arrival to the reply.
    pub total: f64,
}

/// A successful reply.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reply<'a> {
    pub id: &'a str,
    pub device: &'a str,
    pub model: &'a ModelRef,
    /// `local` or `cluster`.
    pub source: &'a str,
    /// Why that path served it.
    pub reason: &'a str,
    pub top: Vec<Label>,
    /// `probability`, or `logit` when a pool answered with raw logits.
    pub score_kind: &'a str,
    pub low_confidence: bool,
    pub timings_ms: Timings,
}

impl Reply<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|e| {
            error_document(self.id, self.device, None, ErrorCode::Internal, &e.to_string())
        })
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: ErrorCode,
    message: &'a str,
}

#[derive(Serialize)]
struct ErrorReply<'a> {
    id: &'a str,
    device: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a ModelRef>,
    error: ErrorBody<'a>,
}

/// `{"id", "device", "model"?, "error": {"code", "message"}}`.
pub fn error_document(
    id: &str,
    device: &str,
    model: Option<&ModelRef>,
    code: ErrorCode,
    message: &str,
) -> Vec<u8> {
    let reply = ErrorReply {
        id,
        device,
        model,
        error: ErrorBody { code, message },
    };
    // Serialising strings and numbers cannot fail; keep a literal fallback anyway.
    serde_json::to_vec(&reply)
        .unwrap_or_else(|_| br#"{"error":{"code":"internal","message":"reply encoding failed"}}"#.to_vec())
}

/// The request a reply answers and who answers it: what every reply of the daemon repeats.
#[derive(Debug, Clone, Copy)]
pub struct Answering<'a> {
    /// The request id (the client's, or the one the agent made up).
    pub id: &'a str,
    pub device: &'a str,
    /// The model that served the request, from its start to its reply.
    pub model: &'a ModelRef,
}

/// How a pool's scores are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    Probability,
    /// Raw logits: they say nothing against a probability threshold.
    Logit,
}

impl ScoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Probability => "probability",
            Self::Logit => "logit",
        }
    }
}

impl<'a> Answering<'a> {
    /// The reply of a request classified on the device (`source` `local`), for `reason`.
    /// `low_confidence` is the device's own judgement of its answer.
    pub fn local(
        &self,
        reason: &'a str,
        top: Vec<Label>,
        low_confidence: bool,
        timings_ms: Timings,
    ) -> Vec<u8> {
        Reply {
            id: self.id,
            device: self.device,
            model: self.model,
            source: "local",
            reason,
            top,
            score_kind: ScoreKind::Probability.as_str(),
            low_confidence,
            timings_ms,
        }
        .to_json()
    }

    /// The reply of a request the cluster answered (`source` `cluster`), for `reason`: low
    /// confidence when its best probability is below `low_confidence_threshold` (never for
    /// logits). The cluster call's time is the reply's inference time.
    pub fn cluster(
        &self,
        reason: &'a str,
        top: Vec<Label>,
        scores: ScoreKind,
        low_confidence_threshold: f32,
        timings_ms: Timings,
    ) -> Vec<u8> {
        let best = top.first().map(|l| l.score).unwrap_or(0.0);
        Reply {
            id: self.id,
            device: self.device,
            model: self.model,
            source: "cluster",
            reason,
            top,
            score_kind: scores.as_str(),
            low_confidence: scores == ScoreKind::Probability && best < low_confidence_threshold,
            timings_ms,
        }
        .to_json()
    }

    /// The error reply of this request, naming the model.
    pub fn error(&self, code: ErrorCode, message: &str) -> Vec<u8> {
        error_document(self.id, self.device, Some(self.model), code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_documents() {
        let model = ModelRef {
            name: "m".into(),
            version: "1".into(),
        };
        let reply = Reply {
            id: "r1",
            device: "cam1",
            model: &model,
            source: "local",
            reason: "local",
            top: vec![Label {
                label: "cat".into(),
                index: Some(3),
                score: 0.9,
            }],
            score_kind: "probability",
            low_confidence: false,
            timings_ms: Timings::default(),
        };
        let v: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["model"]["version"], "1");
        assert_eq!(v["top"][0]["label"], "cat");
        assert!(v["timings_ms"]["total"].is_number());
        let e: serde_json::Value = serde_json::from_slice(&error_document(
            "r2",
            "cam1",
            Some(&model),
            ErrorCode::TooLarge,
            "big",
        ))
        .unwrap();
        assert_eq!(e["error"]["code"], "too_large");
        assert_eq!(e["model"]["name"], "m");
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn cluster_replies_judge_probabilities_not_logits() {
        let model = ModelRef {
            name: "m".into(),
            version: "1".into(),
        };
        let to = Answering {
            id: "r1",
            device: "cam1",
            model: &model,
        };
        let top = || {
            vec![Label {
                label: "cat".into(),
                index: None,
                score: 0.2,
            }]
        };
        let t = Timings::default();
        let p: serde_json::Value =
            serde_json::from_slice(&to.cluster("load", top(), ScoreKind::Probability, 0.5, t)).unwrap();
        assert_eq!(
            (&p["source"], &p["reason"], &p["score_kind"], &p["low_confidence"]),
            (
                &"cluster".into(),
                &"load".into(),
                &"probability".into(),
                &true.into()
            )
        );
        let l: serde_json::Value =
            serde_json::from_slice(&to.cluster("low_confidence", top(), ScoreKind::Logit, 0.5, t)).unwrap();
        assert_eq!(
            (&l["score_kind"], &l["low_confidence"]),
            (&"logit".into(), &false.into())
        );
        let local: serde_json::Value =
            serde_json::from_slice(&to.local("local_only", top(), true, t)).unwrap();
        assert_eq!(
            (&local["source"], &local["reason"], &local["low_confidence"]),
            (&"local".into(), &"local_only".into(), &true.into())
        );
        let e: serde_json::Value = serde_json::from_slice(&to.error(ErrorCode::Internal, "x")).unwrap();
        assert_eq!(
            (&e["error"]["code"], &e["model"]["name"]),
            (&"internal".into(), &"m".into())
        );
    }
}
