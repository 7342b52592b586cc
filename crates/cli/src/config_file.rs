//! `burrow server --config FILE`: a TOML file with one key per server flag,
//! named as the flag without its dashes and with `_` for `-`
//! (`--max-auth-tries 6` is `max_auth_tries = 6`).
//!
//! The file fills in what the command line and the `BURROW_*` variables
//! leave at its default: they override it. Its values go through the same
//! parsers as the flags, so the file accepts exactly what the flags accept,
//! and every mistake is reported with the file, the line and the key.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;

/// Keys that are not settings.
const NOT_SETTINGS: &[&str] = &["config", "check_config", "help"];

/// The server's arguments with the file's settings added for every flag
/// the command line and the environment left at its default. `args` is
/// the whole command line; `at` the index just after `server`.
pub fn apply(cmd: &clap::Command, args: &[OsString], at: usize, path: &Path) -> Result<Vec<OsString>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let server = cmd.find_subcommand("server").expect("the server command exists");
    let given = cmd.clone().try_get_matches_from(args).map_err(|e| e.to_string())?;
    let given = given.subcommand_matches("server").expect("called for `burrow server` only");

    let mut errors: Vec<(usize, String)> = Vec::new();
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let line = line_of(&text, key);
        let here = format!("{}:{line}: {key}", path.display());
        let mut errors = Adder { line, errors: &mut errors };
        if value.is_table() {
            errors.push(format!("{here}: sections are not used: write every key at the top level"));
            continue;
        }
        let Some(arg) =
            server.get_arguments().find(|a| a.get_id() == key.as_str() && !NOT_SETTINGS.contains(&key.as_str()))
        else {
            errors.push(format!(
                "{here}: unknown key; keys are the `burrow server` flags with '_' for '-' (see docs/configuration.md)"
            ));
            continue;
        };
        let long = format!("--{}", arg.get_long().expect("server settings are long flags"));
        let values = match flag_values(value) {
            Ok(v) => v,
            Err(why) => {
                errors.push(format!("{here}: {why}"));
                continue;
            }
        };
        let takes_value = arg.get_action().takes_values();
        let mut words: Vec<OsString> = Vec::new();
        match (takes_value, value) {
            (false, toml::Value::Boolean(true)) => words.push(long.clone().into()),
            (false, toml::Value::Boolean(false)) => {}
            (false, _) => {
                errors.push(format!("{here}: is a switch; write {key} = true or false"));
                continue;
            }
            (true, toml::Value::Boolean(_)) => {
                errors.push(format!("{here}: takes a value, not true or false"));
                continue;
            }
            (true, _) => {
                for v in values {
                    words.push(long.clone().into());
                    words.push(v.into());
                }
            }
        }
        // The value alone, through the flag's own parser.
        let mut trial: Vec<OsString> = vec!["burrow".into(), "server".into()];
        trial.extend(words.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(trial) {
            errors.push(format!("{here}: {}", first_line(&e.to_string())));
            continue;
        }
        let source = given.value_source(arg.get_id().as_str());
        if matches!(source, Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)) {
            continue; // the flag or its variable wins
        }
        extra.extend(words);
    }
    if !errors.is_empty() {
        errors.sort();
        return Err(errors.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("\n"));
    }
    let mut out = args[..at].to_vec();
    out.extend(extra);
    out.extend(args[at..].iter().cloned());
    Ok(out)
}

/// Collects errors with their line, to report them in file order.
struct Adder<'a> {
    line: usize,
    errors: &'a mut Vec<(usize, String)>,
}

impl Adder<'_> {
    fn push(&mut self, e: String) {
        self.errors.push((self.line, e));
    }
}

/// A TOML value as the flag's words: a list repeats the flag.
fn flag_values(value: &toml::Value) -> Result<Vec<String>, String> {
    Ok(match value {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    toml::Value::Array(_) | toml::Value::Table(_) => return Err("a list holds plain values".into()),
                    other => out.extend(flag_values(other)?),
                }
            }
            out
        }
        toml::Value::Datetime(_) => return Err("write times as durations such as \"90d\"".into()),
        toml::Value::Table(_) => return Err("sections are not used: write every key at the top level".into()),
    })
}

/// The line where `key` is set (1-based); 0 if it cannot be found.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            if l.starts_with(&format!("[{key}]")) {
                return true;
            }
            let l = l.strip_prefix('"').unwrap_or(l);
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(['=', '"']))
        })
        .map_or(0, |i| i + 1)
}

/// Clap's message without its "error: " prefix and usage lines.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// The table of docs/configuration.md: every setting with its flag,
/// variable, default and meaning, from the command line's own definition.
#[cfg(test)]
pub fn settings_table(cmd: &clap::Command) -> String {
    let server = cmd.find_subcommand("server").expect("the server command exists");
    let mut out = String::from("| key | flag | variable | default | meaning |\n|---|---|---|---|---|\n");
    for arg in server.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) || arg.is_hide_set() {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let env = arg.get_env().map(|e| format!("`{}`", e.to_string_lossy())).unwrap_or_default();
        let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let default = match (defaults.is_empty(), arg.get_action().takes_values()) {
            (true, false) => "`false`".to_string(),
            (true, true) => "none".to_string(),
            (false, _) => format!("`{}`", defaults.join(", ")),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default().replace('|', "\\|");
        out.push_str(&format!("| `{id}` | `--{long}` | {env} | {default} | {help} |\n"));
    }
    out
}
