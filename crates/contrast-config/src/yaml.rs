//! Reading YAML: size and depth bounds before parsing, `--set` overrides, and
//! the keys a file gives.

use crate::{Config, ConfigError};
use std::path::Path;

/// The largest config file read (a config is a few kB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// The deepest nesting of mappings and sequences a config may have.
pub const MAX_YAML_DEPTH: usize = 64;

/// The most aliases (`*name`) a config may use: each expands to a copy of its anchor.
pub const MAX_YAML_ALIASES: usize = 256;

/// Refuse a config that is too large, nested too deeply or that uses too many
/// aliases before the YAML parser that builds values sees it (libyaml's cost
/// grows with the square of the flow nesting: a 200 kB document of brackets
/// costs it seconds). The check streams the document's events through a
/// second, event-level parser (yaml-rust2) and stops at the first event past a
/// bound, so its own cost is linear. Returns the depth of the deepest node.
pub fn check_yaml_shape(text: &str) -> Result<usize, String> {
    shape(text).map_err(|e| match e {
        Shape::Bound(m) | Shape::Syntax(m) => m,
    })
}

/// Why [`shape`] refused a text.
enum Shape {
    /// Past a bound (size, depth, aliases).
    Bound(String),
    /// Not YAML.
    Syntax(String),
}

fn shape(text: &str) -> Result<usize, Shape> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(Shape::Bound(format!("{} bytes; a config may be at most {MAX_CONFIG_BYTES}", text.len())));
    }
    match events(text) {
        // yaml-rust2 is stricter than libyaml (a flow mapping continued at column 0):
        // with at most MAX_YAML_DEPTH brackets libyaml's cost stays linear, and
        // [`parse_bounded`] measures the parsed value's depth.
        Err(Shape::Syntax(m)) => match text.bytes().filter(|b| matches!(b, b'[' | b'{')).count() {
            n if n <= MAX_YAML_DEPTH => Ok(n),
            _ => Err(Shape::Syntax(m)),
        },
        other => other,
    }
}

/// The deepest nesting of a parsed value (mappings and sequences).
pub fn value_depth(v: &yaml_serde::Value) -> usize {
    use yaml_serde::Value;
    match v {
        Value::Sequence(s) => 1 + s.iter().map(value_depth).max().unwrap_or(0),
        Value::Mapping(m) => 1 + m.iter().map(|(k, v)| value_depth(k).max(value_depth(v))).max().unwrap_or(0),
        Value::Tagged(t) => value_depth(&t.value),
        _ => 0,
    }
}

/// Parse YAML text within the bounds: [`check_yaml_shape`] first, then the
/// parsed value's depth. Any input under [`MAX_CONFIG_BYTES`] takes well under a second.
pub fn parse_bounded(text: &str) -> Result<yaml_serde::Value, String> {
    check_yaml_shape(text)?;
    let v: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
    match value_depth(&v) {
        d if d > MAX_YAML_DEPTH => Err(format!("nested {d} levels deep; at most {MAX_YAML_DEPTH}")),
        _ => Ok(v),
    }
}

/// The document's events, streamed, stopping at the first past a bound; the deepest nesting.
fn events(text: &str) -> Result<usize, Shape> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let (mut depth, mut deepest, mut aliases) = (0usize, 0usize, 0usize);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            // The scanner reads flow brackets ahead of the events and has a limit of its own.
            match e.to_string().contains("recursion limit") {
                true => {
                    Shape::Bound(format!("line {}: nested more than {MAX_YAML_DEPTH} levels deep", e.marker().line()))
                }
                false => Shape::Syntax(e.to_string()),
            }
        })?;
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                deepest = deepest.max(depth);
                if depth > MAX_YAML_DEPTH {
                    let m = format!("line {}: nested more than {MAX_YAML_DEPTH} levels deep", mark.line());
                    return Err(Shape::Bound(m));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            Event::Alias(_) => {
                aliases += 1;
                if aliases > MAX_YAML_ALIASES {
                    return Err(Shape::Bound(format!("line {}: more than {MAX_YAML_ALIASES} aliases", mark.line())));
                }
            }
            Event::StreamEnd => return Ok(deepest),
            _ => {}
        }
    }
}

/// Write numbers that came from `f32` fields as the f32's shortest decimal
/// (`0.3`, not `0.30000001192092896`); an f64 value is never changed.
pub(crate) fn shortest_f32(v: &mut yaml_serde::Value) {
    use yaml_serde::Value;
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|x| x.fract() != 0.0 && (*x as f32) as f64 == *x) {
                if let Ok(short) = (x as f32).to_string().parse::<f64>() {
                    *v = Value::from(short);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(shortest_f32),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, x)| shortest_f32(x)),
        _ => {}
    }
}

/// Parse YAML text with [`parse_bounded`].
fn parse_yaml(text: &str, origin: &str) -> Result<yaml_serde::Value, ConfigError> {
    parse_bounded(text).map_err(|message| ConfigError::Parse { path: origin.into(), message })
}

impl Config {
    /// Parse YAML text; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let value = parse_yaml(text, origin)?;
        Self::from_value(value, origin)
    }

    fn from_value(value: yaml_serde::Value, origin: &str) -> Result<Self, ConfigError> {
        let value = if value.is_null() { yaml_serde::Value::Mapping(Default::default()) } else { value };
        let mut given = std::collections::BTreeSet::new();
        collect_keys(&value, "", &mut given);
        // The path of the failing key (`model.norm: unknown variant ...`) comes with the message.
        let mut c: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) };
            ConfigError::Parse { path: origin.into(), message }
        })?;
        c.given = given;
        Ok(c)
    }

    /// Read a YAML file and apply `KEY=VALUE` overrides (values parsed as YAML).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = read_bounded(path)?;
        let mut value = parse_yaml(&text, &origin)?;
        if value.is_null() {
            value = yaml_serde::Value::Mapping(Default::default());
        }
        // Check the file alone first so that an unknown key is blamed on the file.
        let alone = Self::from_value(value.clone(), &origin)?;
        if alone.given.contains("train.steps") && alone.given.contains("train.epochs") {
            return Err(ConfigError::Parse {
                path: origin,
                message: "train.steps and train.epochs: give one (epochs resolve to steps)".into(),
            });
        }
        // A `--set` of either replaces the other from the file.
        for (set, other) in [("train.steps=", "epochs"), ("train.epochs=", "steps")] {
            if let Some(yaml_serde::Value::Mapping(t)) = value.get_mut("train") {
                if overrides.iter().any(|o| o.starts_with(set)) {
                    t.remove(other);
                }
            }
        }
        let mut only_overrides = yaml_serde::Value::Mapping(Default::default());
        for o in overrides {
            apply_override(&mut value, o)?;
            apply_override(&mut only_overrides, o)?;
        }
        let mut c = Self::from_value(value, &format!("{origin} (with --set overrides)"))?;
        if text.starts_with(RESOLVED_HEADER) {
            // A run's resolved config lists every default (in older versions also
            // keys its components did not read): only the overrides are choices.
            c.given.clear();
            collect_keys(&only_overrides, "", &mut c.given);
        }
        Ok(c)
    }
}

/// The first line of the config a run writes into its directory
/// (`Plan::resolved_yaml` with this header): its keys are resolved values, not
/// choices, so keys that do not apply are not refused when it is read back.
pub const RESOLVED_HEADER: &str = "# The configuration this run resolved";

/// A config file's text, reading at most one byte past [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let mut text = String::new();
    let file = std::fs::File::open(path).map_err(read)?;
    file.take(MAX_CONFIG_BYTES as u64 + 1).read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

/// Every leaf of a YAML value under its dotted key (`loss.margin`): mappings
/// are walked, anything else (a scalar, a sequence) is one leaf.
pub fn leaves(v: &yaml_serde::Value) -> Vec<(String, &yaml_serde::Value)> {
    fn walk<'v>(v: &'v yaml_serde::Value, prefix: &str, out: &mut Vec<(String, &'v yaml_serde::Value)>) {
        match v.as_mapping() {
            Some(map) => map.iter().for_each(|(k, child)| walk(child, &dotted(prefix, k), out)),
            None => out.push((prefix.to_string(), v)),
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out
}

/// `prefix.key` (the key alone at the top).
fn dotted(prefix: &str, k: &yaml_serde::Value) -> String {
    let k = k.as_str().map(str::to_owned).unwrap_or_else(|| format!("{k:?}"));
    if prefix.is_empty() {
        k
    } else {
        format!("{prefix}.{k}")
    }
}

/// Every dotted key of a YAML mapping (`loss`, `loss.margin`, ...).
fn collect_keys(v: &yaml_serde::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    if let Some(map) = v.as_mapping() {
        for (k, child) in map {
            let key = dotted(prefix, k);
            collect_keys(child, &key, out);
            out.insert(key);
        }
    }
}

/// Set `a.b.c=value` inside a YAML mapping, creating intermediate mappings.
fn apply_override(root: &mut yaml_serde::Value, spec: &str) -> Result<(), ConfigError> {
    use yaml_serde::Value;
    let (key, raw) = spec.split_once('=').ok_or_else(|| ConfigError::Override(spec.into()))?;
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::Override(spec.into()));
    }
    // Bounded before anything is built: a key of 100k parts would nest as deep.
    let parts = key.split('.').take(MAX_YAML_DEPTH + 1).count();
    let shown: String = key.chars().take(60).collect();
    let too_deep = || ConfigError::Parse {
        path: format!("--set {shown}"),
        message: format!("the key and its value nest more than {MAX_YAML_DEPTH} levels deep"),
    };
    // A value that is not YAML is taken as a string (`--set data.root=a: b`), unparsed.
    let parsed = match shape(raw) {
        Ok(d) if parts + d > MAX_YAML_DEPTH => return Err(too_deep()),
        Ok(_) => yaml_serde::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
        Err(Shape::Syntax(_)) => Value::String(raw.into()),
        Err(Shape::Bound(message)) => return Err(ConfigError::Parse { path: format!("--set {shown}"), message }),
    };
    if parts + value_depth(&parsed) > MAX_YAML_DEPTH {
        return Err(too_deep());
    }
    let mut node = root;
    for part in key.split('.') {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("mapping");
        node = map.entry(Value::String(part.into())).or_insert(Value::Null);
    }
    *node = parsed;
    Ok(())
}
