//! Keys that do not apply. Each section lists, for the resolved choices, the
//! keys its components do not read (`train.optimizer.momentum` under AdamW,
//! `data.small_crops` without multi-crop, another method's `method.*` key).
//! The one list serves twice: a given key on it is an error naming the key and
//! the choice it does not apply to, and the resolved config leaves those keys
//! out, so it loads back into the same plan.

use crate::ConfigError;
use std::collections::BTreeSet;
use yaml_serde::Value;

/// Dotted keys (a key covers the keys under it) with the choice each does not apply to.
#[derive(Debug, Default, Clone)]
pub struct Rules(Vec<(String, String)>);

impl Rules {
    /// `section.key` for each of `keys` does not apply to `what` when `when` holds.
    pub fn keys(&mut self, section: &str, keys: &[&str], what: &str, when: bool) {
        if when {
            self.0.extend(keys.iter().map(|k| (format!("{section}.{k}"), what.to_string())));
        }
    }

    /// The rule covering `key`, if any.
    fn covering(&self, key: &str) -> Option<&(String, String)> {
        self.0.iter().find(|(k, _)| key == k || key.strip_prefix(k.as_str()).is_some_and(|rest| rest.starts_with('.')))
    }

    /// A given key a rule covers, as an error (the deepest: `data.aug.hue`
    /// rather than `data.aug`).
    pub fn check(&self, given: &BTreeSet<String>) -> Result<(), ConfigError> {
        for key in given.iter().rev() {
            if let Some((_, what)) = self.covering(key) {
                return Err(ConfigError::NotApplicable { key: key.clone(), what: what.clone() });
            }
        }
        Ok(())
    }

    /// Remove every covered key from a serialised config.
    pub fn prune(&self, root: &mut Value) {
        for (key, _) in &self.0 {
            let (parent, leaf) = key.rsplit_once('.').unwrap_or(("", key));
            let mut node = Some(&mut *root);
            for part in parent.split('.').filter(|p| !p.is_empty()) {
                node = node.and_then(|n| n.get_mut(part));
            }
            if let Some(Value::Mapping(m)) = node {
                m.remove(leaf);
            }
        }
    }
}
