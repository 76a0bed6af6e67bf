//! A small argument reader: positionals, `--flag value` / `--flag=value`, and
//! switches that take no value.

use std::collections::BTreeMap;

use crate::error::CliError;

/// Parsed arguments of one command.
#[derive(Debug, Default)]
pub struct Args {
    /// Arguments that are not flags, in order.
    pub positional: Vec<String>,
    flags: BTreeMap<String, Vec<String>>,
}

impl Args {
    /// Parses `argv`; names in `switches` take no value.
    pub fn parse(argv: &[String], switches: &[&str]) -> Result<Args, CliError> {
        let mut args = Args::default();
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            // `-f FILE` is the one short flag (segment files).
            let flag = if arg == "-f" {
                Some("f")
            } else {
                arg.strip_prefix("--")
            };
            let Some(flag) = flag else {
                args.positional.push(arg.clone());
                continue;
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None if switches.contains(&flag) => (flag.to_owned(), "true".to_owned()),
                None => {
                    let value = it
                        .next()
                        .ok_or_else(|| CliError::User(format!("--{flag} needs a value")))?;
                    (flag.to_owned(), value.clone())
                }
            };
            args.flags.entry(name).or_default().push(value);
        }
        Ok(args)
    }

    /// The last value of `--name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name)?.last().map(String::as_str)
    }

    /// Every value of a repeatable `--name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.flags.get(name).cloned().unwrap_or_default()
    }

    /// True when the switch `--name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }

    /// `--name` parsed as a number, or `default`.
    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, CliError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| CliError::User(format!("--{name} takes a number, not {v:?}"))),
        }
    }

    /// Fails on flags outside `known` (so a typo is an error, not ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), CliError> {
        match self.flags.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(CliError::User(format!("unknown flag --{unknown}"))),
            None => Ok(()),
        }
    }
}

/// A duration such as `90d`, `2h`, `30m`, `15s`, `500ms`, in milliseconds.
pub fn duration_ms(text: &str) -> Result<i64, CliError> {
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        CliError::User(format!("duration {text:?} needs a unit (ms, s, m, h, d)"))
    })?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| CliError::User(format!("invalid duration {text:?}")))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => {
            return Err(CliError::User(format!(
                "unknown unit in duration {text:?} (ms, s, m, h, d, w)"
            )));
        }
    };
    n.checked_mul(unit_ms)
        .ok_or_else(|| CliError::User(format!("duration {text:?} is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_switches_and_positionals() {
        let args = Args::parse(
            &argv("tail --segment a --segment=b --from-now x"),
            &["from-now"],
        )
        .unwrap();
        assert_eq!(args.positional, ["tail", "x"]);
        assert_eq!(args.all("segment"), ["a", "b"]);
        assert!(args.has("from-now"));
        assert!(args.only(&["segment", "from-now"]).is_ok());
        assert!(args.only(&["segment"]).is_err());
        assert!(Args::parse(&argv("--addr"), &[]).is_err());
        assert_eq!(
            Args::parse(&argv("segment apply -f s.yaml"), &[])
                .unwrap()
                .get("f"),
            Some("s.yaml")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("90d").unwrap(), 90 * 86_400_000);
        assert_eq!(duration_ms("500ms").unwrap(), 500);
        assert!(duration_ms("5").is_err());
        assert!(duration_ms("5y").is_err());
    }
}
