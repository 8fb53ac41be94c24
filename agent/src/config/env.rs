//! The `EDGE_AGENT_*` environment variables as a figment provider that keeps strings strings.
//!
//! figment's own `Env` provider reads every value as TOML-like data, so `EDGE_AGENT_DEVICE_ID=007`
//! became the number 7 and `EDGE_AGENT_MQTT__PASSWORD=123456` or `=true` failed to load as
//! strings. Here a key whose value is a string in the configuration (names, paths, URLs,
//! passwords, enum names, addresses) takes the variable's text exactly as it is; every other
//! key (numbers, booleans, lists) is parsed as figment does. Errors still name the variable.

use std::collections::BTreeSet;

use figment::providers::Env;
use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

pub(super) struct TypedEnv {
    env: Env,
    /// Dotted key paths (`mqtt.password`) whose values are strings.
    strings: BTreeSet<String>,
}

impl TypedEnv {
    /// `env` filtered and split as wanted; `shape` is the configuration (its defaults) as
    /// JSON, which says which keys hold strings.
    pub(super) fn new(env: Env, shape: &serde_json::Value) -> Self {
        let mut strings = BTreeSet::new();
        collect_strings(shape, String::new(), &mut strings);
        Self { env, strings }
    }

    /// The value figment gets for `key` from the variable's `text`.
    fn value(&self, key: &str, text: String) -> Value {
        if self.strings.contains(key) {
            return Value::from(text);
        }
        match text.parse::<Value>() {
            Ok(v) => v,
            Err(never) => match never {},
        }
    }
}

fn collect_strings(v: &serde_json::Value, path: String, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::String(_) => {
            out.insert(path);
        }
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                collect_strings(v, p, out);
            }
        }
        _ => {}
    }
}

/// Puts `value` at `path` in `dict`, creating the tables on the way.
fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, table) = entry {
                insert(table, rest, value);
            }
        }
    }
}

impl Provider for TypedEnv {
    fn metadata(&self) -> Metadata {
        self.env.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        for (key, text) in self.env.iter() {
            let path: Vec<&str> = key.as_str().split('.').collect();
            insert(&mut dict, &path, self.value(key.as_str(), text));
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}
