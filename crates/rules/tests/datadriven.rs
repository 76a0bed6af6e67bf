//! Data-driven rule tests: every file in `testdata/` is a script of segment
//! definitions, events and clock moves, each followed by the exact output expected
//! (changes, memberships, wake-ups). After every step the harness also checks each
//! user's memberships against the reference evaluator, so a file cannot encode an
//! answer the SPEC semantics disagree with.
//!
//! Format: a command, optional body lines, a `----` line, then the expected output
//! up to a blank line. `#` starts a comment line. Commands:
//!
//! ```text
//! segments                      body: `id: rule` lines (indented lines continue a rule)
//! clock 2026-01-01T00:00:00Z    set the clock (only forwards)
//! track USER EVENT [at=TIME] [id=MSG] [repeat=N every=SPAN] [key=value ...]
//! identify USER [at=TIME] [key=value ...]
//! alias USER PREVIOUS
//! advance SPAN | advance to TIME
//! members                       every user's segments
//! wakeup USER                   the user's next wake-up
//! ```
//!
//! TIME is RFC 3339, `now`, or either followed by `+SPAN`/`-SPAN` terms (`now-90d+1ms`);
//! SPAN is digits with `ms`, `s`, `m`, `h`, `d` or `w`. Values are numbers, "strings",
//! true, false, null, @timestamps and [lists]. `DYNSEG_REWRITE=1` rewrites the
//! expected outputs (review the diff before committing it).

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dynseg_rules::reference::Reference;
use dynseg_rules::{
    Change, Event, EventBody, Limits, Plan, Properties, RuleVersion, SegmentDef, Span, Timestamp,
    UserId, UserState, Value,
};

#[test]
fn testdata() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no test files in {}", dir.display());
    let rewrite = std::env::var_os("DYNSEG_REWRITE").is_some();
    let mut failures = Vec::new();
    for file in &files {
        if let Err(e) = run_file(file, rewrite) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

enum Item {
    Verbatim(String),
    Block {
        line: usize,
        command: Vec<String>,
        expected: Vec<String>,
    },
}

fn parse_file(text: &str) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let mut items = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() || line.starts_with('#') {
            items.push(Item::Verbatim(line.to_owned()));
            i += 1;
            continue;
        }
        let start = i;
        let mut command = Vec::new();
        while i < lines.len() && lines[i] != "----" {
            command.push(lines[i].to_owned());
            i += 1;
        }
        i += 1;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i].to_owned());
            i += 1;
        }
        items.push(Item::Block {
            line: start + 1,
            command,
            expected,
        });
    }
    items
}

fn run_file(path: &Path, rewrite: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let items = parse_file(&text);
    let mut world = World::default();
    let mut failures = Vec::new();
    let mut rewritten = String::new();
    for item in &items {
        match item {
            Item::Verbatim(line) => {
                rewritten.push_str(line);
                rewritten.push('\n');
            }
            Item::Block {
                line,
                command,
                expected,
            } => {
                let here = format!("{}:{line}", path.display());
                let actual = world.run(command).map_err(|e| format!("{here}: {e}"))?;
                world
                    .check_reference()
                    .map_err(|e| format!("{here}: after `{}`: {e}", command[0]))?;
                for l in command {
                    rewritten.push_str(l);
                    rewritten.push('\n');
                }
                rewritten.push_str("----\n");
                for l in &actual {
                    rewritten.push_str(l);
                    rewritten.push('\n');
                }
                if &actual != expected {
                    failures.push(format!(
                        "{here}: `{}`\n  expected:\n    {}\n  actual:\n    {}",
                        command[0],
                        expected.join("\n    "),
                        actual.join("\n    ")
                    ));
                }
            }
        }
    }
    if rewrite {
        std::fs::write(path, rewritten).unwrap();
        return Ok(());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

#[derive(Default)]
struct User {
    state: Option<UserState>,
    events: Vec<Event>,
}

#[derive(Default)]
struct World {
    defs: Vec<SegmentDef>,
    plan: Option<Plan>,
    reference: Option<Reference>,
    version: u64,
    now: Option<Timestamp>,
    users: BTreeMap<String, User>,
    messages: u64,
}

impl World {
    fn now(&self) -> Result<Timestamp, String> {
        self.now.ok_or_else(|| "set the clock first".to_owned())
    }

    fn plan(&self) -> Result<&Plan, String> {
        self.plan
            .as_ref()
            .ok_or_else(|| "define segments first".to_owned())
    }

    fn run(&mut self, command: &[String]) -> Result<Vec<String>, String> {
        let words = split_words(&command[0])?;
        let (verb, args) = words.split_first().ok_or("empty command")?;
        match verb.as_str() {
            "segments" => self.segments(&command[1..]),
            "clock" => {
                let t = self.time(args.first().ok_or("clock needs a time")?)?;
                if self.now.is_some_and(|now| t < now) {
                    return Err("the clock only moves forwards".into());
                }
                self.now = Some(t);
                Ok(Vec::new())
            }
            "track" | "identify" | "alias" => self.event(verb, args),
            "advance" => {
                let now = self.now()?;
                let target = match args {
                    [to, time] if to == "to" => self.time(time)?,
                    [span] => now.plus(parse_span_terms(span)?),
                    _ => return Err("advance SPAN | advance to TIME".into()),
                };
                self.advance(target)
            }
            "members" => {
                let plan = self.plan()?;
                Ok(self
                    .users
                    .iter()
                    .map(|(name, user)| {
                        let state = user.state.as_ref();
                        let ids: Vec<&str> = state
                            .map(|s| plan.members(s).map(|id| id.as_str()).collect())
                            .unwrap_or_default();
                        format!(
                            "{name}: {}",
                            if ids.is_empty() {
                                "-".to_owned()
                            } else {
                                ids.join(" ")
                            }
                        )
                    })
                    .collect())
            }
            "wakeup" => {
                let name = args.first().ok_or("wakeup USER")?;
                let user = self
                    .users
                    .get(name)
                    .ok_or_else(|| format!("no user {name}"))?;
                let wake = user.state.as_ref().and_then(UserState::next_wakeup);
                Ok(vec![wake.map_or("none".to_owned(), |t| t.to_string())])
            }
            other => Err(format!("unknown command {other}")),
        }
    }

    fn segments(&mut self, body: &[String]) -> Result<Vec<String>, String> {
        let mut defs: Vec<SegmentDef> = Vec::new();
        for line in body {
            if line.starts_with(char::is_whitespace) {
                let last = defs
                    .last_mut()
                    .ok_or("a continuation line needs a segment before it")?;
                last.rule.push('\n');
                last.rule.push_str(line.trim());
                continue;
            }
            let (id, rule) = line
                .split_once(':')
                .ok_or_else(|| format!("expected `id: rule`, found {line}"))?;
            defs.push(SegmentDef::new(id.trim(), rule.trim()));
        }
        let version = RuleVersion(self.version + 1);
        let plan = match Plan::compile(&defs, version, &Limits::default()) {
            Ok(plan) => plan,
            Err(e) => return Ok(vec![format!("error: {e}")]),
        };
        let reference = Reference::new(&defs, &Limits::default()).map_err(|e| e.to_string())?;
        self.version += 1;
        let mut out = Vec::new();
        if let Some(old) = &self.plan {
            let migration = plan.migration_from(old);
            let now = self.now()?;
            let mut changes = Vec::new();
            for (name, user) in &mut self.users {
                if let Some(state) = &mut user.state {
                    migration.migrate(state, &UserId::from(name.as_str()), now, &mut changes);
                }
            }
            out.extend(changes.drain(..).map(|c| c.to_string()));
            let backfill: Vec<&str> = migration
                .segments_needing_backfill()
                .map(|s| s.as_str())
                .collect();
            if !backfill.is_empty() {
                out.push(format!("backfill: {}", backfill.join(" ")));
                for (name, user) in &mut self.users {
                    if let Some(state) = &mut user.state {
                        migration.backfill(
                            state,
                            &UserId::from(name.as_str()),
                            &user.events,
                            &mut changes,
                        );
                    }
                }
                out.extend(changes.iter().map(|c| c.to_string()));
            }
        }
        self.plan = Some(plan);
        self.reference = Some(reference);
        self.defs = defs;
        if out.is_empty() {
            out.push("ok".into());
        }
        Ok(out)
    }

    fn event(&mut self, verb: &str, args: &[String]) -> Result<Vec<String>, String> {
        let now = self.now()?;
        let (user, rest) = args.split_first().ok_or("missing user")?;
        let mut at = now;
        let mut repeat = 1u32;
        let mut every = Span(0);
        let mut message_id = None;
        let mut props = Properties::new();
        let mut positional = Vec::new();
        for arg in rest {
            match arg.split_once('=') {
                Some(("at", t)) => at = self.time(t)?,
                Some(("id", id)) => message_id = Some(id.to_owned()),
                Some(("repeat", n)) => repeat = n.parse().map_err(|_| format!("bad repeat {n}"))?,
                Some(("every", span)) => every = parse_span_terms(span)?,
                Some((k, v)) => props.insert(unquote(k), parse_value(v)?),
                None => positional.push(unquote(arg)),
            }
        }
        let plan = self.plan.as_ref().ok_or("define segments first")?;
        let entry = self.users.entry(user.clone()).or_default();
        let mut changes = Vec::new();
        for _ in 0..repeat {
            self.messages += 1;
            let id = message_id
                .clone()
                .unwrap_or_else(|| format!("m{}", self.messages));
            let body = match (verb, positional.as_slice()) {
                ("track", [name]) => EventBody::Track {
                    name: name.as_str().into(),
                    properties: props.clone(),
                },
                ("identify", []) => EventBody::Identify {
                    traits: props.clone(),
                },
                ("alias", [previous]) => EventBody::Alias {
                    previous_id: previous.as_str().into(),
                },
                _ => return Err(format!("bad arguments for {verb}")),
            };
            let event = Event {
                message_id: id.as_str().into(),
                user: user.as_str().into(),
                timestamp: at,
                body,
            };
            let state = entry.state.get_or_insert_with(|| plan.new_state());
            plan.apply(state, &event, now, &mut changes);
            entry.events.push(event);
            at = at.plus(every);
        }
        Ok(render(&changes))
    }

    fn advance(&mut self, target: Timestamp) -> Result<Vec<String>, String> {
        let plan = self.plan.as_ref().ok_or("define segments first")?;
        let mut changes = Vec::new();
        for (name, user) in &mut self.users {
            if let Some(state) = &mut user.state {
                plan.advance(state, &UserId::from(name.as_str()), target, &mut changes);
            }
        }
        // Each user's changes are in order; across users, order by time.
        changes.sort_by_key(|c| c.at);
        self.now = Some(target.max(self.now()?));
        Ok(render(&changes))
    }

    /// Every user's memberships equal the reference evaluator's at `now`.
    fn check_reference(&self) -> Result<(), String> {
        let (Some(plan), Some(reference), Some(now)) = (&self.plan, &self.reference, self.now)
        else {
            return Ok(());
        };
        for (name, user) in &self.users {
            let Some(state) = &user.state else { continue };
            let engine: Vec<&str> = plan.members(state).map(|s| s.as_str()).collect();
            let mut engine_sorted = engine.clone();
            engine_sorted.sort_unstable();
            let expected = reference.members(&user.events, now);
            let expected: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
            if engine_sorted != expected {
                return Err(format!(
                    "user {name} at {now}: engine says {engine_sorted:?}, reference says {expected:?}"
                ));
            }
        }
        Ok(())
    }

    fn time(&self, text: &str) -> Result<Timestamp, String> {
        let split = text
            .find(['+', '-'])
            .filter(|_| text.starts_with("now") || text.starts_with(['+', '-']));
        let (base, terms) = match split {
            Some(i) => text.split_at(i),
            None => (text, ""),
        };
        let base = match base {
            "now" | "" => self.now()?,
            rfc => Timestamp::parse_rfc3339(rfc).map_err(|e| e.to_string())?,
        };
        Ok(base.plus(parse_span_terms(terms)?))
    }
}

fn render(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.to_string()).collect()
}

/// `90d`, `+1h-1ms`: a sum of signed spans.
fn parse_span_terms(text: &str) -> Result<Span, String> {
    let mut total = 0i64;
    let mut rest = text;
    while !rest.is_empty() {
        let (sign, body) = match rest.as_bytes()[0] {
            b'+' => (1, &rest[1..]),
            b'-' => (-1, &rest[1..]),
            _ => (1, rest),
        };
        let digits = body
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("span {text} needs a unit"))?;
        let unit_end = body[digits..]
            .find(['+', '-'])
            .map_or(body.len(), |i| digits + i);
        let amount: i64 = body[..digits]
            .parse()
            .map_err(|_| format!("bad span {text}"))?;
        let per = match &body[digits..unit_end] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            unit => return Err(format!("bad unit {unit} in {text}")),
        };
        total += sign * amount * per;
        rest = &body[unit_end..];
    }
    Ok(Span(total))
}

/// Splits on spaces outside double quotes and brackets.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut depth, mut escaped) = (false, 0, false);
    for c in line.chars() {
        if quoted {
            word.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                word.push(c);
            }
            '[' => {
                depth += 1;
                word.push(c);
            }
            ']' => {
                depth -= 1;
                word.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if quoted || depth != 0 {
        return Err(format!("unbalanced quotes or brackets in {line}"));
    }
    if !word.is_empty() {
        words.push(word);
    }
    Ok(words)
}

fn unquote(text: &str) -> String {
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => text.to_owned(),
    }
}

fn parse_value(text: &str) -> Result<Value, String> {
    Ok(match text {
        "null" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        t if t.starts_with('"') => Value::String(unquote(t).into()),
        t if t.starts_with('@') => {
            Value::Timestamp(Timestamp::parse_rfc3339(&t[1..]).map_err(|e| e.to_string())?)
        }
        t if t.starts_with('[') => {
            let inner = t
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .ok_or("bad list")?;
            let mut items = Vec::new();
            for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                items.push(parse_value(part)?);
            }
            Value::List(items.into())
        }
        t => Value::Number(t.parse().map_err(|_| format!("bad value {t}"))?),
    })
}

#[test]
fn harness_parses_times_and_values() {
    let mut world = World {
        now: Some(Timestamp(1_000_000)),
        ..World::default()
    };
    assert_eq!(world.time("now-1s+1ms").unwrap(), Timestamp(999_001));
    assert_eq!(world.time("+1m").unwrap(), Timestamp(1_060_000));
    assert_eq!(world.time("1970-01-01T00:00:01Z").unwrap(), Timestamp(1000));
    assert_eq!(
        parse_value("[1, \"a\"]").unwrap(),
        Value::List(vec![Value::Number(1.0), Value::from("a")].into())
    );
    assert_eq!(
        split_words("track a \"x y\" k=[1, 2]").unwrap(),
        ["track", "a", "\"x y\"", "k=[1, 2]"]
    );
    world.now = None;
    let mut s = String::new();
    write!(s, "{}", world.time("now").unwrap_err()).unwrap();
    assert_eq!(s, "set the clock first");
}
