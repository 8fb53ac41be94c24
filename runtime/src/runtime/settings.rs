//! Runtime settings: tract knobs applied to one model while it is optimised and planned,
//! through a scoped [`KnobScope`] (never the process environment), so two models in one
//! process can run with different settings.
//!
//! Only knobs tract declares `scopable` are accepted: the others are read at evaluation or
//! once per process (`TRACT_AVGPOOL_SEPARABLE`, `TRACT_CPU_ISA`) and a scope would not reach
//! them.
//!
//! One setting is ours, not tract's: [`EDGE_KERNELS`] `= gemm` has the runtime's own kernels
//! ([`super::kernels`]) take the place of tract's convolutions and 1x1 products; `tract` (or
//! absent) keeps tract's. With them, [`EDGE_WINOGRAD`] and [`EDGE_MICRO_KERNELS`] (`on` by
//! default, or `off`) choose how they compute.

use std::collections::BTreeMap;
use std::fmt;

use tract_core::knobs::KnobScope;

use super::RuntimeError;

/// The setting choosing between tract's convolution kernels and the runtime's own.
pub const EDGE_KERNELS: &str = "EDGE_KERNELS";
/// With the runtime's own kernels: `off` computes 3x3 convolutions directly, not by Winograd.
pub const EDGE_WINOGRAD: &str = "EDGE_WINOGRAD";
/// With the runtime's own kernels: `off` runs every product through `gemm::gemm` rather than
/// our driver of its micro-kernels (weights packed at load, epilogues fused).
pub const EDGE_MICRO_KERNELS: &str = "EDGE_MICRO_KERNELS";

/// Our settings (not tract knobs) that take `on` or `off`.
const SWITCHES: [&str; 2] = [EDGE_WINOGRAD, EDGE_MICRO_KERNELS];

/// Knob name to value, e.g. `TRACT_LAZY_IM2COL_MIN_KERNEL = 1000`. Empty: tract's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RuntimeSettings {
    knobs: BTreeMap<String, String>,
}

impl RuntimeSettings {
    /// Checks every pair against tract's knob registry: an unknown knob, one that is not
    /// scopable or a value of the wrong type is refused, naming it.
    pub fn new<K: Into<String>, V: Into<String>>(
        knobs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, RuntimeError> {
        let settings = RuntimeSettings {
            knobs: knobs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        };
        settings.scope()?;
        Ok(settings)
    }

    /// Parses `NAME=VALUE` (as `--setting` takes it).
    pub fn parse_pair(text: &str) -> Result<(String, String), RuntimeError> {
        let (name, value) = text.split_once('=').ok_or_else(|| {
            RuntimeError::Settings(format!(
                "{text:?} is not NAME=VALUE (e.g. TRACT_DISABLE_DIRECT_SPATIAL=1)"
            ))
        })?;
        Ok((name.trim().to_string(), value.trim().to_string()))
    }

    pub fn knobs(&self) -> &BTreeMap<String, String> {
        &self.knobs
    }

    /// The runtime's own convolution and 1x1 kernels, if they are on.
    pub fn edge_kernels(&self) -> Option<super::kernels::KernelOptions> {
        self.knobs
            .get(EDGE_KERNELS)
            .is_some_and(|v| v == "gemm")
            .then(|| super::kernels::KernelOptions {
                winograd: self.knobs.get(EDGE_WINOGRAD).is_none_or(|v| v != "off"),
                micro_kernels: self.knobs.get(EDGE_MICRO_KERNELS).is_none_or(|v| v != "off"),
            })
    }

    /// tract's defaults, nothing set.
    pub fn is_default(&self) -> bool {
        self.knobs.is_empty()
    }

    /// These settings with `name` set to `value`.
    pub(super) fn with(&self, name: &str, value: &str) -> Self {
        let mut knobs = self.knobs.clone();
        knobs.insert(name.to_string(), value.to_string());
        RuntimeSettings { knobs }
    }

    /// The scope to enter around optimising and planning a model.
    pub(super) fn scope(&self) -> Result<KnobScope, RuntimeError> {
        if let Some(value) = self.knobs.get(EDGE_KERNELS)
            && value != "gemm"
            && value != "tract"
        {
            return Err(RuntimeError::Settings(format!(
                "{EDGE_KERNELS}={value:?}: the kernels are \"gemm\" (the runtime's own) or \"tract\""
            )));
        }
        for switch in SWITCHES {
            if let Some(value) = self.knobs.get(switch)
                && value != "on"
                && value != "off"
            {
                return Err(RuntimeError::Settings(format!(
                    "{switch}={value:?}: \"on\" (the default with {EDGE_KERNELS}=gemm) or \"off\""
                )));
            }
        }
        let tract = self
            .knobs
            .iter()
            .filter(|(k, _)| k.as_str() != EDGE_KERNELS && !SWITCHES.contains(&k.as_str()));
        KnobScope::new(tract.map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| RuntimeError::Settings(format!("{e:#}")))
    }
}

impl fmt::Display for RuntimeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.knobs.is_empty() {
            return f.write_str("tract defaults");
        }
        let pairs: Vec<String> = self.knobs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&pairs.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopable_knobs_are_accepted_and_shown() {
        let s = RuntimeSettings::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")]).unwrap();
        assert_eq!(s.to_string(), "TRACT_DISABLE_DIRECT_SPATIAL=true");
        assert_eq!(RuntimeSettings::default().to_string(), "tract defaults");
    }

    #[test]
    fn unknown_unscopable_and_mistyped_knobs_are_refused() {
        for (k, v) in [
            ("TRACT_NO_SUCH_KNOB", "1"),
            // Read at evaluation: a scope would silently not apply.
            ("TRACT_AVGPOOL_SEPARABLE", "1"),
            ("TRACT_LAZY_IM2COL_MIN_KERNEL", "many"),
        ] {
            let err = RuntimeSettings::new([(k, v)]).unwrap_err().to_string();
            assert!(err.contains(k) || err.contains(v), "{err}");
        }
    }

    #[test]
    fn the_runtime_kernels_setting_is_ours() {
        let s = RuntimeSettings::new([(EDGE_KERNELS, "gemm")]).unwrap();
        assert_eq!(s.edge_kernels().map(|k| k.winograd), Some(true));
        let s = RuntimeSettings::new([(EDGE_KERNELS, "gemm"), (EDGE_WINOGRAD, "off")]).unwrap();
        assert_eq!(s.edge_kernels().map(|k| k.winograd), Some(false));
        let tract = RuntimeSettings::new([(EDGE_KERNELS, "tract")]).unwrap();
        assert!(tract.edge_kernels().is_none());
        let err = RuntimeSettings::new([(EDGE_KERNELS, "fast")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("EDGE_KERNELS") && err.contains("gemm"), "{err}");
        let s = RuntimeSettings::new([(EDGE_KERNELS, "gemm"), (EDGE_MICRO_KERNELS, "off")]).unwrap();
        let options = s.edge_kernels().unwrap();
        assert!(options.winograd && !options.micro_kernels);
        let err = RuntimeSettings::new([(EDGE_MICRO_KERNELS, "no")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("EDGE_MICRO_KERNELS"), "{err}");
        let err = RuntimeSettings::new([(EDGE_WINOGRAD, "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("EDGE_WINOGRAD"), "{err}");
    }

    #[test]
    fn pairs_parse() {
        assert_eq!(
            RuntimeSettings::parse_pair("TRACT_X = 3").unwrap(),
            ("TRACT_X".to_string(), "3".to_string())
        );
        assert!(RuntimeSettings::parse_pair("TRACT_X").is_err());
    }
}
